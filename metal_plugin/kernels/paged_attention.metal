// Paged attention over an "HND" cache: decode, chunked prefill and mixed batches.
// Threadgroup (x, y, z) = (partition, query head, query row); NSG simdgroups of 32 lanes.
// Row r belongs to sequence i with cu[i] <= r < cu[i+1] (binary search); it sits at
// p = L - n + (r - cu[i]) and sees keys max(0, p-W+1) <= t <= p: the per-query causal
// mask inside a chunk. Rows before cu[0] or at or past cu[S] see no key (zeros). L is at
// most what the block-table row holds (MB * BLOCK_SIZE); block ids arrive clamped into the
// cache (ops.py), so bad metadata never reads outside it. Partition x covers keys
// [x*PART, (x+1)*PART).
// Each simdgroup takes chunks of 32 keys (chunk c = sg, sg+NSG, ...): lane j scores key
// base+j against q (held in threadgroup memory), one simd_max per chunk drives the online
// softmax, then every lane accumulates its HEAD_DIM/32 output dims over the chunk's keys.
// Masked keys are never loaded (K or V), so NaN in unused slots and pages cannot leak.
// DIRECT_OUT: write the normalised output (sinks included) in q's dtype. Otherwise write
// this partition's normalised partial output, max logit and exp-sum for the reduce kernel.
// WRITE_LSE (DIRECT_OUT only): also write the row's log softmax denominator lse[r, h] (the
// sink included; the sink alone for a row of a sequence that sees no key; -inf for rows
// outside every sequence; +inf under a +inf sink), once per row after the key loop.
// Header constants: HEAD_DIM, BLOCK_SIZE, NSG, PART, DIRECT_OUT, WRITE_LSE, KV_FP8, q_t, kv_t.
// iparams: [S, R, H, HKV, MB, window (0 = none), has_sinks]; fparams: [scale, softcap (0 = none)].
const uint part = threadgroup_position_in_grid.x;
const uint h = threadgroup_position_in_grid.y;
const uint r = threadgroup_position_in_grid.z;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const int S = iparams[0];
const int H = iparams[2];
const int HKV = iparams[3];
const int MB = iparams[4];
const int W = iparams[5];
const int has_sinks = iparams[6];
const float scale = fparams[0];
const float softcap = fparams[1];
const uint kvh = h / uint(H / HKV);
constexpr int DPL = (HEAD_DIM + 31) / 32;   // output dims per lane: d = lane + 32 * i < HEAD_DIM

threadgroup float q_sh[HEAD_DIM];
threadgroup float probs[NSG][32];
threadgroup float sg_m[NSG];
threadgroup float sg_l[NSG];
threadgroup float sg_acc[NSG][HEAD_DIM];

// Which sequence owns row r; rows before cu[0] or at or past cu[S] are padding (no keys).
int seq = -1;
int qpos = -1;
if (int(r) >= cu_seqlens_q[0] && int(r) < cu_seqlens_q[S]) {
  int lo = 0, hi = S - 1;                   // first i with cu[i+1] > r
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (cu_seqlens_q[mid + 1] > int(r)) hi = mid; else lo = mid + 1;
  }
  seq = lo;
  const int n = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq];
  qpos = min(context_lens[seq], MB * BLOCK_SIZE) - n + (int(r) - cu_seqlens_q[seq]);
}
// Visible keys of this partition: [k_lo, k_hi], empty when k_lo > k_hi.
int k_lo = max(int(part) * PART, (W > 0) ? qpos - W + 1 : 0);
int k_hi = min(int(part + 1) * PART - 1, qpos);
k_lo = max(k_lo, 0);

for (uint d = tid; d < uint(HEAD_DIM); d += NSG * 32) {
  q_sh[d] = (seq >= 0) ? float(q[(r * uint(H) + h) * HEAD_DIM + d]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

const float slope = alibi_slopes[h];
#if KV_FP8
const float ks = k_scale[kvh];
const float vs = v_scale[kvh];
#endif
float m = -INFINITY;
float l = 0.0f;                              // this lane's share of the exp-sum
float acc[DPL];
for (int i = 0; i < DPL; ++i) acc[i] = 0.0f;

for (int base = k_lo + int(sg) * 32; base <= k_hi; base += NSG * 32) {
  const int t = base + int(lane);
  const bool valid = t <= k_hi;
  float s = -INFINITY;
  if (valid) {
    const int blk = block_tables[seq * MB + t / BLOCK_SIZE];
    const device kv_t* kp = k_pages + ((size_t(blk) * HKV + kvh) * BLOCK_SIZE + t % BLOCK_SIZE) * HEAD_DIM;
    float dot = 0.0f;
    for (int d = 0; d < HEAD_DIM; ++d) {
#if KV_FP8
      dot += q_sh[d] * e4m3_to_float(kp[d]);
#else
      dot += q_sh[d] * float(kp[d]);
#endif
    }
#if KV_FP8
    dot *= ks;
#endif
    s = dot * scale;
    if (softcap > 0.0f) s = softcap * precise::tanh(s / softcap);
    s += slope * float(t - qpos);
  }
  const float m_new = max(m, simd_max(s));  // finite: lane 0 is always valid
  const float alpha = exp(m - m_new);       // 0 on the first chunk (m = -inf)
  const float pr = valid ? exp(s - m_new) : 0.0f;
  l = l * alpha + pr;
  for (int i = 0; i < DPL; ++i) acc[i] *= alpha;
  probs[sg][lane] = pr;
  simdgroup_barrier(mem_flags::mem_threadgroup);
  const int nvalid = min(32, k_hi - base + 1);
  for (int j = 0; j < nvalid; ++j) {
    const int tj = base + j;
    const int blk = block_tables[seq * MB + tj / BLOCK_SIZE];
    const device kv_t* vp = v_pages + ((size_t(blk) * HKV + kvh) * BLOCK_SIZE + tj % BLOCK_SIZE) * HEAD_DIM;
    const float pj = probs[sg][j];
    for (int i = 0; i < DPL; ++i) {
      const uint d = lane + 32 * i;
      if (HEAD_DIM % 32 != 0 && d >= uint(HEAD_DIM)) break;
#if KV_FP8
      acc[i] += pj * (e4m3_to_float(vp[d]) * vs);
#else
      acc[i] += pj * float(vp[d]);
#endif
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);   // probs is rewritten next chunk
  m = m_new;
}
l = simd_sum(l);

// Combine the simdgroups of this threadgroup.
if (lane == 0) { sg_m[sg] = m; sg_l[sg] = l; }
for (int i = 0; i < DPL; ++i) {
  if (lane + 32 * i < uint(HEAD_DIM)) sg_acc[sg][lane + 32 * i] = acc[i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float M = -INFINITY;
for (int g = 0; g < NSG; ++g) if (sg_l[g] > 0.0f) M = max(M, sg_m[g]);
float lsum = 0.0f;
for (int g = 0; g < NSG; ++g) if (sg_l[g] > 0.0f) lsum += sg_l[g] * exp(sg_m[g] - M);
#if DIRECT_OUT
// The sink joins the denominator only; rows without keys still come out as exact zeros.
// Clamped finite: -inf is no sink, +inf takes the whole weight (the row is exactly 0).
float rescale = 1.0f;
float M_all = M;                             // the max the denominator lsum is relative to
if (has_sinks != 0 && lsum > 0.0f) {
  const float sk = clamp(sinks[h], -FLT_MAX, FLT_MAX);
  const float M2 = max(M, sk);
  rescale = exp(M - M2);
  lsum = lsum * rescale + exp(sk - M2);
  M_all = M2;
}
#if WRITE_LSE
if (tid == 0) {
  // ">= FLT_MAX", not "== INFINITY": fast math may fold comparisons with infinities.
  float row_lse = (lsum > 0.0f) ? M_all + log(lsum) : -INFINITY;
  if (has_sinks != 0 && seq >= 0 && (lsum == 0.0f || sinks[h] >= FLT_MAX)) row_lse = sinks[h];
  lse[r * uint(H) + h] = row_lse;
}
#endif
const float inv = (lsum > 0.0f) ? rescale / lsum : 0.0f;
#else
const float inv = (lsum > 0.0f) ? 1.0f / lsum : 0.0f;
#endif
for (uint d = tid; d < uint(HEAD_DIM); d += NSG * 32) {
  float o = 0.0f;
  for (int g = 0; g < NSG; ++g) if (sg_l[g] > 0.0f) o += sg_acc[g][d] * exp(sg_m[g] - M);
#if DIRECT_OUT
  out[(r * uint(H) + h) * HEAD_DIM + d] = q_t(o * inv);
#else
  part_out[((r * uint(H) + h) * threadgroups_per_grid.x + part) * HEAD_DIM + d] = o * inv;
#endif
}
#if !DIRECT_OUT
if (tid == 0) {
  const uint pi = (r * uint(H) + h) * threadgroups_per_grid.x + part;
  part_m[pi] = (lsum > 0.0f) ? M : -INFINITY;
  part_l[pi] = lsum;
}
#endif
