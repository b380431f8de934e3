// Fused MoE decode GEMV, first half: for token-expert pair q = t * K + j with e = ids[t, j],
// g = x[t] . Wg[e][:, c] + bg[e][c], u = x[t] . Wu[e][:, c] + bu[e][c] and h[q, c] = glu(g, u)
// for c < I, in f32: act(g) * u, or (ACT 3, gpt-oss swigluoai) with g' = min(g, LIMIT),
// (clamp(u, -LIMIT, LIMIT) + 1) * g' * sigmoid(ALPHA * g').
// W is [E, HD, 2I] (gate = columns [0, I), up = [I, 2I)), b_gate_up f32[E, 2I] when HAS_BIAS;
// thread c walks the HD rows, so neighbouring threads read neighbouring columns. Ids outside
// [0, E) give h = 0. Grid (ceil(I / 64) * 64, T * K). Header constants: HD, INTER, ACT (0 silu,
// 1 gelu erf, 2 gelu tanh, 3 swigluoai), HAS_BIAS, SWIGLU_ALPHA, SWIGLU_LIMIT, x_t, w_t.
// iparams: [T, K, E].
const uint c = thread_position_in_grid.x;
const uint q = thread_position_in_grid.y;
const int K = iparams[1];
const int E = iparams[2];
if (c < uint(INTER)) {
  const int t = int(q) / K;
  const int e = topk_ids[q];
  float hval = 0.0f;
  if (e >= 0 && e < E) {
    const device w_t* wg = w_gate_up + size_t(e) * HD * (2 * INTER) + c;
    const device x_t* xr = x + size_t(t) * HD;
    float g = 0.0f, u = 0.0f;
    for (int i = 0; i < HD; ++i) {
      const float xi = float(xr[i]);
      g += xi * float(wg[size_t(i) * (2 * INTER)]);
      u += xi * float(wg[size_t(i) * (2 * INTER) + INTER]);
    }
#if HAS_BIAS
    g += b_gate_up[size_t(e) * (2 * INTER) + c];
    u += b_gate_up[size_t(e) * (2 * INTER) + INTER + c];
#endif
#if ACT == 3
    g = min(g, SWIGLU_LIMIT);
    u = clamp(u, -SWIGLU_LIMIT, SWIGLU_LIMIT);
    hval = (u + 1.0f) * (g / (1.0f + exp(-SWIGLU_ALPHA * g)));
#else
#if ACT == 0
    const float a = g / (1.0f + exp(-g));
#elif ACT == 1
    const float a = 0.5f * g * (1.0f + erf_f32(g * 0.70710678118654752f));
#else
    const float a = 0.5f * g * (1.0f + precise::tanh(0.79788456080286536f * (g + 0.044715f * g * g * g)));
#endif
    hval = a * u;
#endif
  }
  h[size_t(q) * INTER + c] = hval;
}
