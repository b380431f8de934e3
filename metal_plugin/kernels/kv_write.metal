// KV write, conversion half: turns this step's k, v rows [T, HKV, HEAD_DIM] into the
// cache's storage type (float8: saturate(x / scale) to +-448, then e4m3 bytes). The
// custom call cannot alias the cache (outputs arrive uninitialised), so placing the rows
// at their slots is an XLA scatter, which updates the donated cache in place.
// Padding tokens (slot < 0) get zero rows, which the scatter drops.
// One simdgroup per (KV head, token). Header constants: HEAD_DIM, KV_FP8, src_t, kv_t.
const uint lane = thread_index_in_simdgroup;
const uint kh = threadgroup_position_in_grid.y;
const uint t = threadgroup_position_in_grid.z;
const uint HKV = threadgroups_per_grid.y;
const bool keep = slot_mapping[t] >= 0;
const size_t row = (size_t(t) * HKV + kh) * HEAD_DIM;
#if KV_FP8
const float ksc = k_scale[kh];
const float vsc = v_scale[kh];
#endif
for (int d = int(lane); d < HEAD_DIM; d += 32) {
  const float kx = keep ? float(k[row + d]) : 0.0f;
  const float vx = keep ? float(v[row + d]) : 0.0f;
#if KV_FP8
  k_rows[row + d] = float_to_e4m3(clamp(kx / ksc, -448.0f, 448.0f));
  v_rows[row + d] = float_to_e4m3(clamp(vx / vsc, -448.0f, 448.0f));
#else
  k_rows[row + d] = kv_t(kx);
  v_rows[row + d] = kv_t(vx);
#endif
}
