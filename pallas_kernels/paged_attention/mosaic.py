"""Paged attention for Hopper with Pallas Mosaic GPU: chunked prefill, mixed batches, decode.

What it computes (SPEC.md §3): for query row j of sequence i (n rows, context L) at position
p = L - n + j, softmax over keys t in [max(0, p - W + 1), p] of
scale·q·k (softcap, ALiBi, sinks), keys gathered from the paged cache
``pages[block_tables[i, t // BS], h // G, t % BS]``; f32 softmax, output in q.dtype.

Structure (FA3, as ``jax.experimental.pallas.ops.gpu.attention_mgpu``): one CTA holds
``num_wgs`` compute warpgroups and one memory warpgroup. The memory warpgroup walks the KV
tiles of the CTA's sequence: a tile of ``block_kv`` keys is ``block_kv // BS`` TMA copies of
whole pages (one page of one KV head is a contiguous [BS, D] tile), or one slice of a page when
BS > block_kv, into a ``num_stages``-deep ring guarded by barriers. Compute warpgroups run
QK^T and PV on wgmma with an f32 online softmax (log2 domain).

Grids (all bounds static, from shapes):
* prefill / mixed: ``(Hkv * G // num_wgs, NT)``. The q rows (all sequences packed) are cut into
  tiles of 64 rows that never cross a sequence; ``_plan_tiles`` enumerates them in jnp with a
  prefix sum over ``cu_seqlens_q`` (plus one pseudo-sequence with L = 0 for the padding rows
  past ``cu_seqlens_q[S]``, so they come out as zeros). Tiles start on multiples of 8 rows (TMA
  into the tiled q buffer); NT = cdiv(T + 70 (S + 1), 64) bounds the count; spare tiles store
  nothing. GQA: the ``num_wgs`` warpgroups of a CTA are query heads sharing
  one KV head, so each K/V page is loaded once for them. Each row is stored exactly once
  (a logarithmic ladder of TMA stores, as ``ragged_dot_mgpu``, writes only the tile's rows).
* decode (``mosaic_decode.py``): ``(Hkv, S, splits)``; the GQA group is the M dimension of the
  wgmma (padded to 64 rows), the context is split across CTAs and merged in jnp (one split:
  normalised in the kernel). The o staging buffer shares the K/V ring (a RefUnion): it is
  written only after every K/V tile was consumed.

Static: head_dim, block_size, the block sizes, scale, softcap, window, which of ALiBi/sinks.
Masking: the KV loop of a tile ends at its last row's diagonal and starts at its first row's
window, runs unmasked where every key is visible to every row, and masks elsewhere with a
finite value (``_MASK``: -inf would give NaN in exp2(m_old - m_new) for a row that has seen
nothing yet). Unused cache slots may hold NaN, and 0 * NaN = NaN in PV, so the V rows past
the last visible key are zeroed in shared memory before the final PV.

Interpreter (``interpret=True``): Pallas's Mosaic GPU interpreter lacks wgmma with a register
lhs and ``pl.run_state`` of accumulators, so there (only) P goes through shared memory and the
PV product lands in a fresh accumulator that is added in registers (``_pv``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_Q = 64                     # rows per compute warpgroup = the wgmma M
_MASK = -1e30                    # finite mask logit (log2 units), see the docstring
_LOG2E = math.log2(math.e)
_SMEM_BYTES = 232448             # H100 dynamic shared memory per CTA (227 KiB)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """KV tile, pipeline depth and compute warpgroups per CTA (prefill: query heads per CTA)."""
  block_kv: int = 128
  num_stages: int = 2
  num_wgs: int = 2

  def __post_init__(self):
    if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
      raise ValueError(f"{self.block_kv=} must be 64, 128, 192 or 256")
    if self.num_stages < 2:
      raise ValueError(f"{self.num_stages=} must be at least 2")
    if self.num_wgs not in (1, 2):
      raise ValueError(f"{self.num_wgs=} must be 1 or 2")


# head_dim -> (prefill, decode); shared memory of each is checked by _smem_bytes.
_TABLE = {
    64: (BlockSizes(128, 3, 2), BlockSizes(128, 4, 1)),
    128: (BlockSizes(128, 2, 2), BlockSizes(64, 4, 1)),
    256: (BlockSizes(64, 2, 1), BlockSizes(64, 2, 1)),
}


def block_sizes_for(head_dim: int, num_groups: int, decode: bool) -> BlockSizes:
  bs = _TABLE[head_dim][int(decode)]
  if not decode and num_groups % bs.num_wgs:   # odd GQA ratio: one query head per CTA
    bs = dataclasses.replace(bs, num_wgs=1)
  return bs


def partial_dtype(head_dim: int, q_dtype):
  """Decode partial outputs: f32, except at head_dim 256 where f32 staging does not fit."""
  return jnp.dtype(jnp.float32) if head_dim <= 128 else jnp.dtype(q_dtype)


def _smem_bytes(bs: BlockSizes, head_dim: int, q_dtype, decode: bool) -> int:
  itemsize = jnp.dtype(q_dtype).itemsize
  q = bs.num_wgs * BLOCK_Q * head_dim * itemsize
  kv = 2 * bs.num_stages * bs.block_kv * head_dim * itemsize
  o_item = partial_dtype(head_dim, q_dtype).itemsize if decode else itemsize
  o = bs.num_wgs * BLOCK_Q * head_dim * o_item
  if decode:   # o staging shares the K/V ring (used only after the KV loop)
    return q + max(kv, o) + 2 * BLOCK_Q * 4 + 1024
  return q + kv + o + 1024   # + barriers


def check_supported(*, head_dim, block_size, q_dtype, kv_dtype) -> None:
  hint = 'use backend="triton" or backend="xla" for this configuration'
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise NotImplementedError(
        f"mosaic paged attention: {head_dim=} must be one of {SUPPORTED_HEAD_DIMS}; {hint}")
  if block_size not in SUPPORTED_BLOCK_SIZES:
    raise NotImplementedError(
        f"mosaic paged attention: {block_size=} must be one of {SUPPORTED_BLOCK_SIZES}; {hint}")
  if jnp.dtype(q_dtype) not in SUPPORTED_DTYPES:
    raise NotImplementedError(
        f"mosaic paged attention: {q_dtype=} must be bfloat16 or float16; {hint}")
  if jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
    raise NotImplementedError(
        f"mosaic paged attention: the KV cache dtype ({jnp.dtype(kv_dtype)}) must equal "
        f"q.dtype ({jnp.dtype(q_dtype)}) (float8 caches are not covered); {hint}")


@dataclasses.dataclass(frozen=True)
class _Static:
  decode: bool
  num_groups: int        # G = H // Hkv
  head_dim: int
  block_size: int
  max_blocks: int        # MB
  num_pages: int         # NB
  bs: BlockSizes
  scale: float
  softcap: float | None
  window: int | None
  has_alibi: bool
  has_sinks: bool
  num_splits: int
  interpret: bool
  fused: bool = False    # decode, one split: normalised q.dtype output, no merge, no m/l


def _cdiv(a, b):
  return lax.div(a + (b - 1), b)   # a >= 0 everywhere it is used


def kv_steps(p_first, p_last, kv_len, window, block_kv):
  """KV tile range of rows at positions [p_first, p_last] (jnp scalars or arrays).

  Returns (begin, end, full_lo, full_hi, kv_end): tiles [begin, end) hold visible keys, tiles
  in [full_lo, full_hi) need no mask, keys >= kv_end are never visible.
  """
  kv_end = jnp.clip(p_last + 1, 0, kv_len)
  first_key = jnp.zeros_like(kv_end) if window is None else jnp.maximum(p_first - window + 1, 0)
  first_key = jnp.minimum(first_key, kv_end)
  begin = lax.div(first_key, block_kv)
  end = jnp.maximum(_cdiv(kv_end, block_kv), begin)
  full_lo = begin if window is None else _cdiv(jnp.maximum(p_last - window + 1, 0), block_kv)
  full_lo = jnp.clip(full_lo, begin, end)
  full_hi = jnp.clip(lax.div(jnp.maximum(p_first + 1, 0), block_kv), full_lo, end)
  return begin, end, full_lo, full_hi, kv_end


# Columns of the per-tile table built by _plan_tiles.
_SEQ, _LEN, _ROW0, _LO, _HI, _POS0, _BEGIN, _END, _FULL_LO, _FULL_HI, _KV_END = range(11)


def _plan_tiles(cu_seqlens_q, context_lens, num_rows, window, block_kv):
  """i32[NT, 11]: the 64-row query tiles of every sequence (heaviest first).

  Tile rows are q rows [row0, row0 + 64) with valid rows [row0 + lo, row0 + hi); row r sits
  at position pos0 + r. row0 is a multiple of 8 (a TMA into the (8, 64)-tiled q buffer must
  start on a tile row) and at most num_rows - 64 (num_rows is a multiple of 8 and >= 64), so
  loads never leave q. Tiles of a segment start at its first row rounded down to 8.
  """
  num_seqs = context_lens.shape[0]
  num_tiles = -(-(num_rows + 70 * (num_seqs + 1)) // BLOCK_Q)   # >= sum cdiv(n_s + 7, 64)
  cu = jnp.clip(cu_seqlens_q.astype(jnp.int32), 0, num_rows)
  cu = jnp.concatenate([cu, jnp.array([num_rows], jnp.int32)])          # + padding segment
  cu = jnp.maximum(cu, lax.cummax(cu))                                  # non-decreasing
  lens = jnp.concatenate([context_lens.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
  n = cu[1:] - cu[:-1]
  first = cu[:-1] - cu[:-1] % 8
  tiles = jnp.where(n > 0, (cu[1:] - first + BLOCK_Q - 1) // BLOCK_Q, 0)
  tile_end = jnp.cumsum(tiles)
  b = jnp.arange(num_tiles, dtype=jnp.int32)
  seg = jnp.minimum(jnp.searchsorted(tile_end, b, side="right"), num_seqs).astype(jnp.int32)
  real = b < tile_end[-1]
  r_tile = first[seg] + (b - (tile_end[seg] - tiles[seg])) * BLOCK_Q
  row0 = jnp.clip(r_tile, 0, num_rows - BLOCK_Q)
  lo = jnp.where(real, jnp.maximum(r_tile, cu[seg]) - row0, 0)
  hi = jnp.where(real, jnp.minimum(r_tile + BLOCK_Q, cu[seg + 1]) - row0, 0)
  kv_len = jnp.where(real, lens[seg], 0)
  pos0 = kv_len - n[seg] + (row0 - cu[seg])
  steps = kv_steps(pos0 + lo, pos0 + hi - 1, kv_len, window, block_kv)
  seq = jnp.minimum(seg, num_seqs - 1)       # the padding segment reads no page (L = 0)
  info = jnp.stack([seq, kv_len, row0, lo, hi, pos0, *steps], axis=1).astype(jnp.int32)
  return info[::-1]   # causal: the longest KV loops start first


def _pv(acc, p16, v_ref, p_smem, after_issue, interpret):
  """acc + p16 @ v_ref on wgmma; ``after_issue`` runs while the wgmma is in flight."""
  if interpret:
    p_smem[...] = p16
    plgpu.commit_smem()

    def scoped(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_ref)
      after_issue()
      return acc_ref[...]
    return acc + pl.run_scoped(scoped, plgpu.ACC(acc.shape, jnp.float32))

  def body(acc_ref):
    plgpu.wgmma(acc_ref, p16, v_ref)
    after_issue()
  return pl.run_state(body)(plgpu.ACC.init(acc))


def _kernel(*refs, st: _Static):
  nw, bk, stages = st.bs.num_wgs, st.bs.block_kv, st.bs.num_stages
  d, page, grp = st.head_dim, st.block_size, st.num_groups
  refs = list(refs)
  # inputs
  info_ref = refs.pop(0)        # prefill: i32[NT, 11] (_plan_tiles); decode: i32[S] lens
  bt_ref = refs.pop(0)          # i32[S, MB]
  q_ref = refs.pop(0)           # prefill: [T, H, D]; decode: [S, Hkv, 64, D] (group padded)
  k_ref = refs.pop(0)           # [NB, Hkv, BS, D]
  v_ref = refs.pop(0)           # [NB, Hkv, BS, D]
  alibi_ref = refs.pop(0) if st.has_alibi else None   # prefill: f32[H]; decode: f32[Hkv, 64]
  sinks_ref = refs.pop(0) if (st.has_sinks and not st.decode) else None   # f32[H]
  # outputs
  o_ref = refs.pop(0)           # prefill: [T, H, D]; decode: f32[S, Hkv, splits, G, D]
  #                               (fused decode: [S, Hkv, G, D] in q.dtype)
  ml_ref = refs.pop(0) if (st.decode and not st.fused) else None   # f32[S, Hkv, splits, 2, 64]
  # scratch
  q_smem2 = refs.pop(0)         # [nw, 64, D]
  if st.decode:                 # o staging aliases the K/V ring (RefUnion), see build_call
    (k_smem, v_smem), o_smem2 = refs.pop(0)
  else:
    k_smem = refs.pop(0)        # [stages, bk, D]
    v_smem = refs.pop(0)        # [stages, bk, D]
    o_smem2 = refs.pop(0)       # [nw, 64, D] (f32 in decode), unswizzled for partial stores
  ml_smem = refs.pop(0) if st.decode else None   # f32[2, 64]
  p_smem2 = refs.pop(0) if st.interpret else None  # [nw, 64, bk], interpreter only
  q_bar, k_bar, v_bar, k_free, v_free = refs[:5]
  sched_bar = refs[5] if nw == 2 else None

  wg = lax.axis_index("wg")
  if st.decode:
    kv_head, seq, split = lax.axis_index("g"), lax.axis_index("seq"), lax.axis_index("split")
    kv_len = info_ref[seq]
    p_row = kv_len - 1                       # every row (a query head) sits at L - 1
    begin, end, full_lo, full_hi, kv_end = kv_steps(p_row, p_row, kv_len, st.window, bk)
    if st.num_splits > 1:   # balanced shares: sizes differ by at most one tile
      n = end - begin
      begin, end = (begin + lax.div(split * n, st.num_splits),
                    begin + lax.div((split + 1) * n, st.num_splits))
    head0 = kv_head * grp
  else:
    hp, tile = lax.axis_index("hp"), lax.axis_index("tile")
    per_kv = grp // nw
    kv_head = lax.div(hp, per_kv)
    head0 = kv_head * grp + lax.rem(hp, per_kv) * nw
    row = lambda c: info_ref[tile, c]
    seq, kv_len, row0, lo, hi, pos0 = (row(c) for c in (_SEQ, _LEN, _ROW0, _LO, _HI, _POS0))
    row0 = pl.multiple_of(row0, 8)
    begin, end, full_lo, full_hi, kv_end = (
        row(c) for c in (_BEGIN, _END, _FULL_LO, _FULL_HI, _KV_END))

  def sched():
    if nw == 2:   # FA3 ping-pong: the two warpgroups take turns on the tensor cores
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)

  @pl.when(wg < nw)
  def _compute():
    if nw == 2:
      plgpu.set_max_registers(232, action="increase")
    q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
    p_smem = p_smem2.at[wg] if st.interpret else None
    head = head0 + wg
    if st.decode:
      plgpu.copy_gmem_to_smem(q_ref.at[seq, kv_head], q_smem, q_bar.at[wg])
      if st.has_alibi:
        plgpu.copy_gmem_to_smem(alibi_ref.at[kv_head], ml_smem.at[0], q_bar.at[wg])
    else:
      plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, BLOCK_Q), head], q_smem, q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])

    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = wgmma_layout.reduce(1)
    shape = (BLOCK_Q, bk)
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wgmma_layout)
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma_layout)
    pos = p_row if st.decode else rows + pos0          # query position per logit row
    if st.has_alibi:
      if st.decode:
        slope = plgpu.load(ml_smem.at[0], layout=row_layout) * _LOG2E
        slope = lax.broadcast_in_dim(slope, shape, [0])
      else:
        slope = alibi_ref[head] * _LOG2E

    m_init = jnp.full((BLOCK_Q,), _MASK, jnp.float32)
    l_init = jnp.full((BLOCK_Q,), 0.0, jnp.float32)
    if st.has_sinks and not st.decode:   # the sink is one more logit with no value
      m_init = jnp.full((BLOCK_Q,), sinks_ref[head] * _LOG2E, jnp.float32)
      l_init = l_init + 1.0
    m_i = plgpu.layout_cast(m_init, row_layout)
    l_i = plgpu.layout_cast(l_init, row_layout)
    acc = plgpu.layout_cast(jnp.full((BLOCK_Q, d), 0, jnp.float32), wgmma_layout)

    @pl.when(begin < end)
    def _():
      plgpu.barrier_wait(k_bar.at[0])

    if nw == 2:
      pl.when(wg == 1)(sched)

    def kv_step(step, carry, masked: bool):
      acc, m_i, l_i = carry
      slot = lax.rem(step - begin, stages)

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
        sched()
        return acc_ref[...]
      s = pl.run_scoped(compute_qk, plgpu.ACC(shape, jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])

      key = cols + step * bk
      if st.softcap is not None:    # c·tanh(scale·s / c), in log2 units
        s = jnp.tanh(s * (st.scale / st.softcap)) * (st.softcap * _LOG2E)
      else:
        s = s * (st.scale * _LOG2E)
      if st.has_alibi:
        s = s + slope * (key - pos).astype(jnp.float32)
      if masked:
        visible = key <= pos
        if st.window is not None:
          visible = jnp.logical_and(visible, key > pos - st.window)
        s = jnp.where(visible, s, _MASK)

      m_new = jnp.maximum(m_i, s.max(axis=1))
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha
      p16 = p.astype(q_smem.dtype)
      if nw == 2 and d <= 128:
        l_i = l_i + p.sum(axis=1)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      if nw == 2:
        plgpu.barrier_arrive(sched_bar)   # softmax done
      plgpu.barrier_wait(v_bar.at[slot])
      if nw == 2:
        plgpu.barrier_wait(sched_bar)     # tensor cores free
      if not (nw == 2 and d <= 128):
        l_i = l_i + p.sum(axis=1)

      if masked:
        # Keys >= kv_end of the last tile: zero their V rows (NaN slots, pages never loaded).
        # Both warpgroups write the same zeros, so their overlap is harmless.
        @pl.when(kv_end < (step + 1) * bk)
        def _zero_tail():
          vt = v_smem.at[slot]
          v_rows = plgpu.broadcasted_iota(jnp.int32, (bk, d), 0, layout=wgmma_layout)
          v = plgpu.load(vt, layout=wgmma_layout)
          vt[...] = jnp.where(v_rows + step * bk < kv_end, v, jnp.zeros_like(v))
          plgpu.commit_smem()

      def wait_next_k():
        nxt = step + 1

        @pl.when(nxt < end)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(nxt - begin, stages)])
      acc = _pv(acc, p16, v_smem.at[slot], p_smem, wait_next_k, st.interpret)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_i

    carry = (acc, m_i, l_i)
    lo_full = jnp.clip(full_lo, begin, end)     # decode: the split's part of the ranges
    hi_full = jnp.clip(full_hi, lo_full, end)
    carry = lax.fori_loop(begin, lo_full, functools.partial(kv_step, masked=True), carry)
    carry = lax.fori_loop(lo_full, hi_full, functools.partial(kv_step, masked=False), carry)
    carry = lax.fori_loop(hi_full, end, functools.partial(kv_step, masked=True), carry)
    acc, m_i, l_i = carry
    if nw == 2:
      pl.when(wg == 0)(sched)

    if st.fused:    # one split: normalise here; L == 0 (l == 0) gives exact zeros
      l_pos = l_i > 0
      inv_l = jnp.where(l_pos, 1.0 / jnp.where(l_pos, l_i, 1.0), 0.0)
      o_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(o_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, grp)], o_ref.at[seq, kv_head])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return

    if st.decode:   # unnormalised partials; mosaic_decode merges the splits
      o_smem[...] = acc.astype(o_smem.dtype)
      ml_smem[0] = m_i
      ml_smem[1] = l_i
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, grp)], o_ref.at[seq, kv_head, split])
      plgpu.copy_smem_to_gmem(ml_smem, ml_ref.at[seq, kv_head, split])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return

    # Rows at p < 0 (padding, n > L) see no key: exactly 0.
    o_rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, d), 0, layout=wgmma_layout)
    inv_l = lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
    out = jnp.where(o_rows + pos0 >= 0, acc * inv_l, 0.0)
    o_smem[...] = out.astype(o_smem.dtype)
    plgpu.commit_smem()
    count, start = hi - lo, lo
    size = BLOCK_Q
    while size:   # store exactly rows [lo, hi): 64, 32, ..., 1-row TMA stores
      @pl.when((count & size) != 0)
      def _store(start=start, size=size):
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)],
                                o_ref.at[pl.ds(row0 + start, size), head])
      start = start + (count & size)
      size //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  @pl.when(wg == nw)
  def _memory():
    if nw == 2:
      plgpu.set_max_registers(40, action="decrease")
    num_pages = _cdiv(kv_len, page)
    copies = max(1, bk // page)
    rows_per_copy = min(bk, page)

    def page_ids(step):
      ids = []
      for c in range(copies):
        key0 = step * bk + c * rows_per_copy
        # Pages past the context hold anything: load a real page instead (masked anyway).
        idx = jnp.minimum(lax.div(key0, page), num_pages - 1)
        ids.append(jnp.clip(bt_ref[seq, idx], 0, st.num_pages - 1))
      return ids

    def issue(src_ref, dst, bar, step, ids):
      off = 0 if page <= bk else lax.rem(step, page // bk) * bk   # provably bk-aligned
      for c, pid in enumerate(ids):
        plgpu.copy_gmem_to_smem(src_ref.at[pid, kv_head, pl.ds(off, rows_per_copy)],
                                dst.at[pl.ds(c * rows_per_copy, rows_per_copy)], bar)

    @pl.loop(0, end - begin)
    def _(i):
      slot = lax.rem(i, stages)
      # The page ids are read once for K and V, before waiting for the slot: their latency
      # overlaps the wait instead of delaying the copies.
      ids = page_ids(begin + i)

      @pl.when(i >= stages)
      def _():
        plgpu.barrier_wait(k_free.at[slot])
      issue(k_ref, k_smem.at[slot], k_bar.at[slot], begin + i, ids)

      @pl.when(i >= stages)
      def _():
        plgpu.barrier_wait(v_free.at[slot])
      issue(v_ref, v_smem.at[slot], v_bar.at[slot], begin + i, ids)

    # Observe the last releases too, so no barrier phase is left unobserved at exit.
    @pl.loop(jnp.maximum(end - begin - stages, 0), end - begin)
    def _(i):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])


def build_call(st: _Static, out_type, grid, grid_names, dtype):
  """The plgpu.kernel of both modes (decode grids over (Hkv, S, splits))."""
  nw, bk, stages, d = st.bs.num_wgs, st.bs.block_kv, st.bs.num_stages, st.head_dim
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  copies = max(1, bk // st.block_size)
  ring = [plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled),   # k ring
          plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled)]   # v ring
  o_dtype = dtype if (st.fused or not st.decode) else partial_dtype(d, dtype)
  o_scratch = plgpu.SMEM((nw, BLOCK_Q, d), o_dtype)                  # o
  scratch = [plgpu.SMEM((nw, BLOCK_Q, d), dtype, transforms=swizzled)]   # q
  if st.decode:   # o is staged only after every K/V tile was consumed: share the ring
    scratch.append(plgpu.RefUnion(ring, o_scratch))
  else:
    scratch += [*ring, o_scratch]
  if st.decode:
    scratch.append(plgpu.SMEM((2, BLOCK_Q), jnp.float32))              # m, l (ALiBi slopes)
  if st.interpret:
    scratch.append(plgpu.SMEM((nw, BLOCK_Q, bk), dtype, transforms=swizzled))   # p
  q_arrivals = 2 if (st.decode and st.has_alibi) else 1
  scratch += [
      plgpu.Barrier(num_arrivals=q_arrivals, num_barriers=nw),
      plgpu.Barrier(num_arrivals=copies, num_barriers=stages),        # k ready
      plgpu.Barrier(num_arrivals=copies, num_barriers=stages),        # v ready
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),            # k consumed
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),            # v consumed
  ]
  if nw == 2:
    scratch.append(plgpu.Barrier(num_arrivals=nw))                    # schedule
  return plgpu.kernel(
      functools.partial(_kernel, st=st),
      out_type=out_type,
      grid=grid,
      grid_names=grid_names,
      num_threads=nw + 1,
      thread_name="wg",
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if st.interpret else None,
  )


def make_static(*, decode, q_dtype, num_heads, k_pages, max_blocks, scale, softcap,
                sliding_window, alibi_slopes, sinks, num_splits, interpret, block_sizes):
  num_pages, num_kv_heads, block_size, head_dim = k_pages.shape
  check_supported(head_dim=head_dim, block_size=block_size, q_dtype=q_dtype,
                  kv_dtype=k_pages.dtype)
  grp = num_heads // num_kv_heads
  if decode and grp > BLOCK_Q:
    raise NotImplementedError(f"mosaic paged decode: {grp=} query heads per KV head must be "
                              f"<= {BLOCK_Q}; use backend=\"triton\" or backend=\"xla\"")
  bs = block_sizes or block_sizes_for(head_dim, grp, decode)
  if not decode and grp % bs.num_wgs:
    raise ValueError(f"{bs.num_wgs=} must divide the GQA ratio {grp}")
  smem = _smem_bytes(bs, head_dim, q_dtype, decode)
  if smem > _SMEM_BYTES:
    raise ValueError(f"{bs} needs {smem} bytes of shared memory (> {_SMEM_BYTES})")
  return _Static(decode=decode, num_groups=grp, head_dim=head_dim, block_size=block_size,
                 max_blocks=max_blocks, num_pages=num_pages, bs=bs, scale=float(scale),
                 softcap=None if softcap is None else float(softcap),
                 window=None if sliding_window is None else int(sliding_window),
                 has_alibi=alibi_slopes is not None, has_sinks=sinks is not None,
                 num_splits=num_splits, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=(
    "scale", "softcap", "sliding_window", "interpret", "block_sizes"))
def paged_attention(q, k_pages, v_pages, block_tables, context_lens, cu_seqlens_q, *,
                    scale: float, softcap: float | None = None,
                    sliding_window: int | None = None, alibi_slopes=None, sinks=None,
                    k_scale=None, v_scale=None, interpret: bool = False,
                    block_sizes: BlockSizes | None = None):
  """Chunked prefill / mixed batch over the paged cache: q [T, H, D] -> [T, H, D]."""
  if k_scale is not None or v_scale is not None:
    raise NotImplementedError('mosaic paged attention: float8 KV caches (k_scale/v_scale) are '
                              'not covered; use backend="triton" or backend="xla"')
  num_rows, num_heads, head_dim = q.shape
  st = make_static(decode=False, q_dtype=q.dtype, num_heads=num_heads, k_pages=k_pages,
                   max_blocks=block_tables.shape[1], scale=scale, softcap=softcap,
                   sliding_window=sliding_window, alibi_slopes=alibi_slopes, sinks=sinks,
                   num_splits=1, interpret=interpret, block_sizes=block_sizes)
  padded = max(-(-num_rows // 8) * 8, BLOCK_Q)   # see _plan_tiles; pads only odd/tiny T
  qp = q if padded == num_rows else jnp.pad(q, ((0, padded - num_rows), (0, 0), (0, 0)))
  info = _plan_tiles(cu_seqlens_q, context_lens, padded, st.window, st.bs.block_kv)
  args = [info, block_tables.astype(jnp.int32), qp, k_pages, v_pages]
  if alibi_slopes is not None:
    args.append(alibi_slopes.astype(jnp.float32))
  if sinks is not None:
    args.append(sinks.astype(jnp.float32))
  grid = (num_heads // st.bs.num_wgs, info.shape[0])
  call = build_call(st, jax.ShapeDtypeStruct(qp.shape, q.dtype), grid, ("hp", "tile"), q.dtype)
  return call(*args)[:num_rows]


def paged_decode(q, k_pages, v_pages, block_tables, context_lens, **kwargs):
  """One query per sequence: q [S, H, D] -> [S, H, D] (see ``mosaic_decode``)."""
  from pallas_kernels.paged_attention import mosaic_decode
  return mosaic_decode.paged_decode(q, k_pages, v_pages, block_tables, context_lens, **kwargs)
