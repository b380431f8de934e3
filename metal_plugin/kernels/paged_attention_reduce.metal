// Combines the partitions of paged decode: partition j carries its normalised output o_j,
// max logit m_j and exp-sum l_j; with M = max_j m_j (and the sink), w_j = l_j * exp(m_j - M)
// and out = sum_j w_j o_j / (sum_j w_j + exp(sink - M)). Empty partitions have l_j = 0.
// One simdgroup per (query head, row); lane owns dims d = lane + 32 i.
// WRITE_LSE: also lse[r, h] = log(denominator), the sink included (the sink alone when no
// partition saw a key; +inf under a +inf sink), from M and the weights: no pass over the keys.
// Header constants: HEAD_DIM, NUM_PARTS, WRITE_LSE, q_t. iparams: [H, has_sinks].
const uint lane = thread_index_in_simdgroup;
const uint h = threadgroup_position_in_grid.y;
const uint r = threadgroup_position_in_grid.z;
const int H = iparams[0];
const int has_sinks = iparams[1];
const uint row = (r * uint(H) + h) * NUM_PARTS;

float M = -INFINITY;
for (int j = 0; j < NUM_PARTS; ++j) if (part_l[row + j] > 0.0f) M = max(M, part_m[row + j]);
float denom = 0.0f;
float w[NUM_PARTS];
for (int j = 0; j < NUM_PARTS; ++j) {
  w[j] = (part_l[row + j] > 0.0f) ? part_l[row + j] * exp(part_m[row + j] - M) : 0.0f;
  denom += w[j];
}
float M_all = M;                             // the max denom is relative to
if (has_sinks != 0 && denom > 0.0f) {
  const float sk = clamp(sinks[h], -FLT_MAX, FLT_MAX);  // +inf: the row is exactly 0
  const float M2 = max(M, sk);
  const float c = exp(M - M2);
  for (int j = 0; j < NUM_PARTS; ++j) w[j] *= c;
  denom = denom * c + exp(sk - M2);
  M_all = M2;
}
#if WRITE_LSE
if (lane == 0) {
  // ">= FLT_MAX", not "== INFINITY": fast math may fold comparisons with infinities.
  float row_lse = (denom > 0.0f) ? M_all + log(denom) : -INFINITY;
  if (has_sinks != 0 && (denom == 0.0f || sinks[h] >= FLT_MAX)) row_lse = sinks[h];
  lse[r * uint(H) + h] = row_lse;
}
#endif
const float inv = (denom > 0.0f) ? 1.0f / denom : 0.0f;
for (int d = int(lane); d < HEAD_DIM; d += 32) {
  float o = 0.0f;
  for (int j = 0; j < NUM_PARTS; ++j) {
    if (w[j] > 0.0f) o += w[j] * part_out[(row + j) * HEAD_DIM + d];
  }
  out[(r * uint(H) + h) * HEAD_DIM + d] = q_t(o * inv);
}
