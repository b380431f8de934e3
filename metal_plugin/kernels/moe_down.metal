// Fused MoE decode GEMV, second half: y[t, c] = sum_j w[t, j] * (h[t*K + j] . Wd[e_j][:, c]
// + bd[e_j][c]), f32 accumulation, stored in x's dtype. Wd is [E, INTER, HD], b_down
// f32[E, HD] when HAS_BIAS; thread c walks the INTER rows. Pairs whose id is outside [0, E)
// are skipped (they contribute zero).
// Grid (ceil(HD / 64) * 64, T). Header constants: HD, INTER, HAS_BIAS, x_t, w_t.
// iparams: [T, K, E].
const uint c = thread_position_in_grid.x;
const uint t = thread_position_in_grid.y;
const int K = iparams[1];
const int E = iparams[2];
if (c < uint(HD)) {
  float y = 0.0f;
  for (int j = 0; j < K; ++j) {
    const int e = topk_ids[t * uint(K) + j];
    if (e < 0 || e >= E) continue;
    const device w_t* wd = w_down + size_t(e) * INTER * HD + c;
    const device float* hr = h + (size_t(t) * K + j) * INTER;
    float s = 0.0f;
    for (int i = 0; i < INTER; ++i) s += hr[i] * float(wd[size_t(i) * HD]);
#if HAS_BIAS
    s += b_down[size_t(e) * HD + c];
#endif
    y += topk_weights[t * uint(K) + j] * s;
  }
  out[size_t(t) * HD + c] = x_t(y);
}
