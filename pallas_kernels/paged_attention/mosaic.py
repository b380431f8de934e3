"""Paged attention for Hopper with Pallas Mosaic GPU: chunked prefill, mixed batches, decode.

What it computes (docs/contract.md): for query row j of sequence i (n rows, context L) at position
p = L - n + j, softmax over keys t in [max(0, p - W + 1), p] of
scale·q·k (softcap, ALiBi, sinks), keys gathered from the paged cache
``pages[block_tables[i, t // BS], h // G, t % BS]``; f32 softmax, output in q.dtype.

Structure (FA3, as ``jax.experimental.pallas.ops.gpu.attention_mgpu``): one CTA holds
``num_wgs`` compute warpgroups and one memory warpgroup, of which one warp walks the KV
tiles of the CTA's items: a tile of ``block_kv`` keys is ``block_kv // BS`` TMA copies of
whole pages (one page of one KV head is a contiguous [BS, D] tile), or one slice of a page when
BS > block_kv, into a ``num_stages``-deep ring guarded by barriers. Compute warpgroups run
QK^T and PV on wgmma with an f32 online softmax (base 2; raw q.k units without softcap and
ALiBi, see ``mosaic_plan.logit_factor``).

Work comes in items, and the grid is a list of CTAs that each run one or more items
(``mosaic_items.for_each_item``; all bounds static, from shapes). The memory warpgroup's ring runs on from
one item to the next, and a CTA loads the next item's q during an item's epilogue.
* prefill / mixed: an item is one 64-row q tile for ``num_wgs`` query heads; items
  ``(H / num_wgs) x NT``. The q rows (all sequences packed) are cut into tiles of 64 rows that
  never cross a sequence; ``plan_tiles`` enumerates them heaviest first in jnp with a prefix
  sum over ``cu_seqlens_q`` (plus two pseudo-sequences with L = 0 for the rows before
  ``cu_seqlens_q[0]`` and past ``cu_seqlens_q[S]``, so they come out as zeros). Tiles start on
  multiples of 8 rows (TMA into the tiled q buffer); NT = cdiv(T + 70 (S + 2), 64) bounds the
  count; spare tiles store
  nothing. GQA: the ``num_wgs`` warpgroups of a CTA are query heads sharing one KV head, so
  each K/V page is loaded once for them. Each row is stored exactly once (a logarithmic ladder
  of TMA stores, as ``ragged_dot_mgpu``, writes only the tile's rows). By default one item per
  CTA (the hardware schedules the grid): 132 persistent CTAs in ``snake_items`` order measured
  4-13% slower (benchmarks/NOTES.md, Session 3).
* decode (``mosaic_decode.py``): an item is one (seq, KV head), or a share of its tiles
  (stream-K); the GQA group is the M dimension of the wgmma, read in place from the flat q
  (``decode_rows``); persistent CTAs, one per SM.

Static: head_dim, block_size, the block sizes, scale, softcap, window, which of ALiBi/sinks.
Masking: the KV loop of a tile ends at its last row's diagonal and starts at its first row's
window, runs unmasked where every key is visible to every row, and masks elsewhere with -inf
logits; the running max starts at a finite ``MASK`` (an -inf max would give NaN in
exp2(m_old - m_new) for a row that has seen nothing yet). Without softcap and ALiBi the max and
the logits stay in raw q.k units and p = exp2((s - m) * c): the largest logit weighs exactly 1
at any scale (a folded exp2(s * c - m), one FMA, overflows once |m| >~ 2^31: scale 1e6 with
|q.k| ~ 1e4; ``mosaic_plan.logit_factor``). Sinks start the running max, clamped finite (+inf:
the row is exactly 0). Unused cache slots may hold NaN, and 0 * NaN = NaN in PV, so the V rows
past the last visible key are zeroed in shared memory before the final PV.

Bad metadata never reads outside the cache: page ids are clamped into [0, NB) where the memory
warpgroup reads them, contexts to what their block-table row holds (``plan_tiles``,
``mosaic_items.decode_item``); results for such a sequence are unspecified.

Interpreter (``interpret=True``): Pallas's Mosaic GPU interpreter lacks wgmma with a register
lhs and ``pl.run_state`` of accumulators, so there (only) P goes through shared memory and the
PV product lands in a fresh accumulator that is added in registers (``_pv``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_attention.mosaic_items import Item, for_each_item
from pallas_kernels.paged_attention.mosaic_plan import (
    BLOCK_Q,
    LOG2E,
    MASK,
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    BlockSizes,
    Info,
    Static,
    block_sizes_for,
    cdiv,
    check_supported,
    ctas_per_sm,
    decode_rows,
    fold_max,
    idiv,
    irem,
    kv_steps,
    logit_factor,
    lse_of_ml,
    make_static,
    num_items,
    num_sms,
    partial_dtype,
    plan_tiles,
    raw_factor,
    sink_start,
    snake_items,
    stream_ctas,
    tile_lse,
)

# The planning names are part of this module's interface (tests, probes, mosaic_decode).
__all__ = [
    "BLOCK_Q",
    "LOG2E",
    "MASK",
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "BlockSizes",
    "Info",
    "Static",
    "block_sizes_for",
    "build_call",
    "cdiv",
    "check_supported",
    "ctas_per_sm",
    "decode_rows",
    "idiv",
    "irem",
    "kv_steps",
    "logit_factor",
    "make_static",
    "num_items",
    "num_sms",
    "paged_attention",
    "partial_dtype",
    "plan_tiles",
    "lse_of_ml",
    "raw_factor",
    "sink_start",
    "snake_items",
    "stream_ctas",
]


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


def _kernel(*refs, st: Static):
    nw, bk, stages = st.bs.num_wgs, st.bs.block_kv, st.bs.num_stages
    d, page, grp = st.head_dim, st.block_size, st.num_groups
    refs = list(refs)
    # inputs
    info_ref = refs.pop(0)  # prefill: i32[NT, 11] (plan_tiles); decode: i32[S] lens
    bt_ref = refs.pop(0)  # i32[S, MB]
    q_ref = refs.pop(0)  # prefill: [T, H, D]; decode: [R, D] (flat q, R >= S H)
    k_ref = refs.pop(0)  # [NB, Hkv, BS, D]
    v_ref = refs.pop(0)  # [NB, Hkv, BS, D]
    alibi_ref = refs.pop(0) if st.has_alibi else None  # prefill: f32[H]; decode: f32[R]
    sinks_ref = refs.pop(0) if (st.has_sinks and not st.decode) else None  # f32[H]
    # outputs
    o_ref = refs.pop(0)  # prefill: [T, H, D]; decode: f32[S, Hkv, splits, G, D]
    #                               (fused decode: [R, D] in q.dtype)
    ml_ref = refs.pop(0) if (st.decode and not st.fused) else None  # f32[S, Hkv, splits, 2, 64]
    tile_ml_ref = refs.pop(0) if st.lse else None  # prefill lse: f32[NT, H, 2, 64], m and l
    # scratch
    q_smem2 = refs.pop(0)  # [nw, 64, D]
    k_smem = refs.pop(0)  # [stages, bk, D]
    v_smem = refs.pop(0)  # [stages, bk, D]
    o_smem2 = refs.pop(0)  # [nw, 64, D] (decode: partial dtype), unswizzled: row stores
    ml_smem = refs.pop(0) if st.decode else None  # f32[2, 64]: m and l
    slope_smem = refs.pop(0) if (st.decode and st.has_alibi) else None  # f32[64]
    tile_ml_smem2 = refs.pop(0) if st.lse else None  # f32[nw, 2, 64]
    p_smem2 = refs.pop(0) if st.interpret else None  # [nw, 64, bk], interpreter only
    q_bar, k_bar, v_bar, k_free, v_free = refs[:5]
    sched_bar = refs[5] if nw == 2 else None

    wg = lax.axis_index("wg").astype(jnp.int32)  # int64 in the interpreter under x64

    def sched():
        if nw == 2:  # FA3 ping-pong: the two warpgroups take turns on the tensor cores
            plgpu.barrier_arrive(sched_bar)
            plgpu.barrier_wait(sched_bar)

    @pl.when(wg < nw)
    def _compute():
        if nw == 2:
            plgpu.set_max_registers(232, action="increase")
        q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
        p_smem = p_smem2.at[wg] if st.interpret else None
        wgmma_layout = plgpu.Layout.WGMMA
        c = logit_factor(st)  # static: c = scale·log2(e) kept out of s, or None
        c_raw = raw_factor(st)  # m in raw q.k units ("raw" softmax), or None: log2 units
        fold = c is not None and c_raw is None
        row_layout = wgmma_layout.reduce(1)
        shape = (BLOCK_Q, bk)

        def load_q(it: Item):
            """Issues the item's q tile (decode: and its rows' ALiBi slopes) on q_bar."""
            row0 = pl.multiple_of(it.row0, 8)
            if st.decode:
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, BLOCK_Q)], q_smem, q_bar.at[wg])
                if st.has_alibi:
                    plgpu.copy_gmem_to_smem(
                        alibi_ref.at[pl.ds(row0, BLOCK_Q)], slope_smem, q_bar.at[wg]
                    )
            else:
                plgpu.copy_gmem_to_smem(
                    q_ref.at[pl.ds(row0, BLOCK_Q), it.head0 + wg], q_smem, q_bar.at[wg]
                )

        def attend(j, it: Item, next_item, has_next, g0):
            """Item j's KV loop and epilogue; its first tile sits in ring slot g0 % stages. The next
            item's q is loaded during this one's epilogue."""
            begin, end, kv_end = it.begin, it.end, it.kv_end
            head = None if st.decode else it.head0 + wg
            if isinstance(j, int):  # one item per CTA
                load_q(it)
            else:
                pl.when(j == 0)(lambda: load_q(it))
            plgpu.barrier_wait(q_bar.at[wg])

            rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wgmma_layout)
            cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma_layout)
            pos = it.pos0 if st.decode else rows + it.pos0  # query position per logit row
            if st.has_alibi:
                if st.decode:
                    slope = plgpu.load(slope_smem, layout=row_layout) * LOG2E
                    slope = lax.broadcast_in_dim(slope, shape, [0])
                else:
                    slope = alibi_ref[head] * LOG2E

            m_init = jnp.full((BLOCK_Q,), MASK, jnp.float32)
            l_init = jnp.full((BLOCK_Q,), 0.0, jnp.float32)
            if st.has_sinks and not st.decode:  # the sink is one more logit with no value
                m_init = jnp.full((BLOCK_Q,), sink_start(sinks_ref[head], c_raw), jnp.float32)
                l_init = l_init + 1.0
            m_i = plgpu.layout_cast(m_init, row_layout)
            l_i = plgpu.layout_cast(l_init, row_layout)
            acc = plgpu.layout_cast(jnp.full((BLOCK_Q, d), 0, jnp.float32), wgmma_layout)
            slot_of = lambda step: irem(g0 + step - begin, stages)

            @pl.when(begin < end)
            def _():
                plgpu.barrier_wait(k_bar.at[slot_of(begin)])

            if nw == 2:
                pl.when(wg == 1)(sched)

            def kv_step(step, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = slot_of(step)

                def compute_qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                    sched()
                    return acc_ref[...]

                s = pl.run_scoped(compute_qk, plgpu.ACC(shape, jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])

                # Logits in log2 units are s * scale·log2(e). Without softcap or ALiBi that factor
                # (c_raw) stays out of s and m (raw q.k units): p = exp2((s - m) * c_raw), exact
                # at any scale (logit_factor). Else s is taken to log2 units first.
                key = cols + step * bk
                if st.softcap is not None:  # softcap·tanh(scale·s / softcap), in log2 units
                    s = jnp.tanh(s * (st.scale / st.softcap)) * (st.softcap * LOG2E)
                if st.has_alibi:
                    s = s * (st.scale * LOG2E) if st.softcap is None else s
                    s = s + slope * (key - pos).astype(jnp.float32)
                if masked:
                    visible = key <= pos
                    if st.window is not None:
                        visible = jnp.logical_and(visible, key > pos - st.window)
                    # -inf is safe here: m starts finite (MASK), so m_new is finite.
                    s = jnp.where(visible, s, -jnp.inf)

                if fold:  # one FMA and a min per logit, m in log2 units (see logit_factor)
                    m_new = jnp.maximum(m_i, fold_max(s.max(axis=1) * c))
                    t = s * c - lax.broadcast_in_dim(m_new, shape, [0])
                    p = jnp.exp2(jnp.minimum(t, 0.0))
                    alpha = jnp.exp2(m_i - m_new)
                elif c_raw is None:
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [0]))
                    alpha = jnp.exp2(m_i - m_new)
                else:  # one subtraction and one multiply per logit (see logit_factor)
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    p = jnp.exp2((s - lax.broadcast_in_dim(m_new, shape, [0])) * c_raw)
                    alpha = jnp.exp2((m_i - m_new) * c_raw)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha
                p16 = p.astype(q_smem.dtype)
                if nw == 2 and d <= 128:
                    l_i = l_i + p.sum(axis=1)
                    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                if nw == 2:
                    plgpu.barrier_arrive(sched_bar)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                if nw == 2:
                    plgpu.barrier_wait(sched_bar)  # tensor cores free
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
                        plgpu.barrier_wait(k_bar.at[slot_of(nxt)])

                acc = _pv(acc, p16, v_smem.at[slot], p_smem, wait_next_k, st.interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            lo_full = jnp.clip(it.full_lo, begin, end)  # decode: the split's part of the ranges
            hi_full = jnp.clip(it.full_hi, lo_full, end)
            carry = lax.fori_loop(begin, lo_full, functools.partial(kv_step, masked=True), carry)
            carry = lax.fori_loop(lo_full, hi_full, functools.partial(kv_step, masked=False), carry)
            carry = lax.fori_loop(hi_full, end, functools.partial(kv_step, masked=True), carry)
            acc, m_i, l_i = carry
            if nw == 2:
                pl.when(wg == 0)(sched)
            # q_smem's last reader (QK) has finished. The next item is built only here, so its
            # scalars hold no registers during the KV loop.
            if has_next is not False:
                pl.when(has_next)(lambda: load_q(next_item()))
            _epilogue(it, acc, m_i, l_i, head)
            return g0 + (end - begin)

        def _epilogue(it, acc, m_i, l_i, head):
            if st.fused:  # one split: normalise here; L == 0 (l == 0) gives exact zeros
                l_pos = l_i > 0
                inv_l = jnp.where(l_pos, 1.0 / jnp.where(l_pos, l_i, 1.0), 0.0)
                o_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(
                    o_smem.dtype
                )
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(it.r_off, grp)], o_ref.at[pl.ds(it.q_start, grp)]
                )
            elif st.decode:  # unnormalised partials (m in the kernel's units); merged in jnp
                o_smem[...] = acc.astype(o_smem.dtype)
                ml_smem[0] = m_i
                ml_smem[1] = l_i
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(it.r_off, grp)], o_ref.at[it.seq, it.kv_head, it.split]
                )
                plgpu.copy_smem_to_gmem(ml_smem, ml_ref.at[it.seq, it.kv_head, it.split])
            else:
                # Rows at p < 0 (padding, n > L) see no key: exactly 0.
                o_rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, d), 0, layout=wgmma_layout)
                inv_l = lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
                out = jnp.where(o_rows + it.pos0 >= 0, acc * inv_l, 0.0)
                o_smem[...] = out.astype(o_smem.dtype)
                if st.lse:  # the tile's final m and l, once per row (the lse: lse_of_ml)
                    tile_ml_smem2[wg, 0] = m_i
                    tile_ml_smem2[wg, 1] = l_i
                plgpu.commit_smem()
                if st.lse:
                    plgpu.copy_smem_to_gmem(tile_ml_smem2.at[wg], tile_ml_ref.at[it.tile, head])
                count, start = it.hi - it.lo, it.lo
                size = BLOCK_Q
                while size:  # store exactly rows [lo, hi): 64, 32, ..., 1-row TMA stores

                    @pl.when((count & size) != 0)
                    def _store(start=start, size=size):
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[pl.ds(start, size)],
                            o_ref.at[pl.ds(it.row0 + start, size), head],
                        )

                    start = start + (count & size)
                    size //= 2
            # The next item overwrites the o / ml staging only after this returns.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        for_each_item(st, info_ref, attend, with_next=True)

    @pl.when(wg == nw)
    def _memory():
        if nw == 2:
            plgpu.set_max_registers(40, action="decrease")
        copies = max(1, bk // page)
        rows_per_copy = min(bk, page)

        def stream(it: Item, g0):
            """Issues the item's K/V tiles into ring slots g0, g0 + 1, ... (mod stages)."""
            num_pages = cdiv(it.kv_len, page)

            def page_ids(step):
                ids = []
                for c in range(copies):
                    key0 = step * bk + c * rows_per_copy
                    # Pages past the context hold anything: load a real page instead (masked anyway).
                    idx = jnp.minimum(idiv(key0, page), num_pages - 1)
                    ids.append(jnp.clip(bt_ref[it.seq, idx], 0, st.num_pages - 1))
                return ids

            def issue(src_ref, dst, bar, step, ids):
                off = 0 if page <= bk else irem(step, page // bk) * bk  # provably bk-aligned
                for c, pid in enumerate(ids):
                    plgpu.copy_gmem_to_smem(
                        src_ref.at[pid, it.kv_head, pl.ds(off, rows_per_copy)],
                        dst.at[pl.ds(c * rows_per_copy, rows_per_copy)],
                        bar,
                    )

            @pl.loop(0, it.end - it.begin)
            def _(i):
                g = g0 + i
                slot = irem(g, stages)
                # The page ids are read once for K and V, before waiting for the slot: their latency
                # overlaps the wait instead of delaying the copies.
                ids = page_ids(it.begin + i)

                @pl.when(g >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                issue(k_ref, k_smem.at[slot], k_bar.at[slot], it.begin + i, ids)

                @pl.when(g >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                issue(v_ref, v_smem.at[slot], v_bar.at[slot], it.begin + i, ids)

            return g0 + (it.end - it.begin)

        # One warp streams (the other three idle): a 16-token page is one copy, 16 per 128-key
        # tile, and each copy's index math and barrier arrivals would otherwise take issue slots
        # on all four warps' schedulers from the compute warpgroups.
        @plgpu.warp_map
        def _(warp):
            @pl.when(warp == 0)
            def _():
                total = for_each_item(st, info_ref, stream)

                # Observe the last releases too, so no barrier phase is left unobserved at exit.
                @pl.loop(jnp.maximum(total - stages, 0), total)
                def _(g):
                    slot = irem(g, stages)
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])


def build_call(st: Static, out_type, grid, grid_names, dtype):
    """The plgpu.kernel of both modes (decode grids over (num_ctas,), persistent)."""
    nw, bk, stages, d = st.bs.num_wgs, st.bs.block_kv, st.bs.num_stages, st.head_dim
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    copies = max(1, bk // st.block_size)
    o_dtype = dtype if (st.fused or not st.decode) else partial_dtype(d, dtype)
    scratch = [
        plgpu.SMEM((nw, BLOCK_Q, d), dtype, transforms=swizzled),  # q
        plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled),  # k ring
        plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled),  # v ring
        plgpu.SMEM((nw, BLOCK_Q, d), o_dtype),  # o
    ]
    if st.decode:
        scratch.append(plgpu.SMEM((2, BLOCK_Q), jnp.float32))  # m, l
        if st.has_alibi:
            scratch.append(plgpu.SMEM((BLOCK_Q,), jnp.float32))  # ALiBi slope of each row
    if st.lse:
        scratch.append(plgpu.SMEM((nw, 2, BLOCK_Q), jnp.float32))  # m, l of each warpgroup
    if st.interpret:
        scratch.append(plgpu.SMEM((nw, BLOCK_Q, bk), dtype, transforms=swizzled))  # p
    q_arrivals = 2 if (st.decode and st.has_alibi) else 1
    scratch += [
        plgpu.Barrier(num_arrivals=q_arrivals, num_barriers=nw),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # k ready
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # v ready
        plgpu.Barrier(num_arrivals=nw, num_barriers=stages),  # k consumed
        plgpu.Barrier(num_arrivals=nw, num_barriers=stages),  # v consumed
    ]
    if nw == 2:
        scratch.append(plgpu.Barrier(num_arrivals=nw))  # schedule
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


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "softcap",
        "sliding_window",
        "interpret",
        "block_sizes",
        "num_ctas",
        "return_lse",
    ),
)
def paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    num_ctas: int | None = None,
    return_lse: bool = False,
):
    """Chunked prefill / mixed batch over the paged cache: q [T, H, D] -> [T, H, D].
    ``return_lse``: also the rows' lse f32[T, H], from the m and l each tile's epilogue writes."""
    if k_scale is not None or v_scale is not None:
        raise NotImplementedError(
            "mosaic paged attention: float8 KV caches (k_scale/v_scale) are "
            'not covered; use backend="triton" or backend="xla"'
        )
    num_rows, num_heads, head_dim = q.shape
    st = make_static(
        decode=False,
        q_dtype=q.dtype,
        num_heads=num_heads,
        k_pages=k_pages,
        max_blocks=block_tables.shape[1],
        scale=scale,
        softcap=softcap,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        num_splits=1,
        interpret=interpret,
        block_sizes=block_sizes,
    )
    padded = max(-(-num_rows // 8) * 8, BLOCK_Q)  # see plan_tiles; pads only odd/tiny T
    qp = q if padded == num_rows else jnp.pad(q, ((0, padded - num_rows), (0, 0), (0, 0)))
    info = plan_tiles(
        cu_seqlens_q,
        context_lens,
        padded,
        st.window,
        st.bs.block_kv,
        max_context=st.max_blocks * st.block_size,
    )
    args = [info, block_tables.astype(jnp.int32), qp, k_pages, v_pages]
    if alibi_slopes is not None:
        args.append(alibi_slopes.astype(jnp.float32))
    if sinks is not None:
        args.append(sinks.astype(jnp.float32))
    # One item per CTA by default: persistent CTAs measured 4-8% slower here (NOTES.md).
    items = num_items(st, info.shape[0])
    st = dataclasses.replace(st, num_ctas=int(min(num_ctas or items, items)), lse=return_lse)
    out_type = jax.ShapeDtypeStruct(qp.shape, q.dtype)
    if return_lse:
        ml_type = jax.ShapeDtypeStruct((info.shape[0], num_heads, 2, BLOCK_Q), jnp.float32)
        out_type = (out_type, ml_type)
    call = build_call(st, out_type, (st.num_ctas,), ("cta",), q.dtype)
    if not return_lse:
        return call(*args)[:num_rows]
    out, tile_ml = call(*args)
    return out[:num_rows], tile_lse(tile_ml, info, cu_seqlens_q, sinks, st, padded)[:num_rows]
