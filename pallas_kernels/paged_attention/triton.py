"""Paged attention over an "HND" KV cache: Pallas kernels, Triton lowering.

Computes the contract of docs/contract.md: query row j of sequence i (n rows, context L) sits at
p = L - n + j and attends to keys t with 0 <= t <= p (and t > p - W with a sliding window W); key
t lives at ``pages[block_tables[i, t // BS], h_kv, t % BS]``. Softcap, ALiBi, sinks, float8 KV
with per-KV-head scales. Online softmax in float32, base 2 (``triton_common``: the raw and log2
softmax domains, the gathered K/V loop).

Two kernels:

``paged_attention`` (chunked prefill and mixed batches, this module) -- grid
``(Hkv, num_tiles)`` with ``num_tiles = T // QT + S + 2`` fixed by shapes. A q tile holds
``QT = block_m // G`` query tokens of one segment times the ``G = H // Hkv`` query heads of one
KV head, packed into the M dimension (row r = token r // G, head r % G), so each K/V tile is
loaded once per KV head. The rows are S + 2 segments: the rows before ``cu[0]`` (a
pseudo-sequence of context 0), the S sequences, and the rows past ``cu[S]`` (context 0 too), so
every output row is written exactly once and rows outside every sequence come out as zeros.
Segment g owns tiles ``start_g // QT + g ...`` (at least ceil(n_g / QT) of them); a program
finds its segment by binary search over ``cu_seqlens_q`` on the device (no host sync, no
recompile for a new batch composition). The KV loop runs over [first key any row's window
sees, last key any row sees]: tiles every row fully sees run without masks, the window edge and
the causal diagonal run masked. Tiles are launched latest first (most keys), all KV heads of a
tile before the next one.

``paged_decode`` (``triton_decode.py``, re-exported here) -- one query per sequence, the KV of
long contexts split across programs and merged.

Bad metadata never reads outside the cache: contexts are clamped to what their block-table row
holds and page ids into [0, NB) (``triton_common.context_len``, ``page_rows``); their results
are unspecified, other sequences are unaffected.

Static: head_dim, block_size, group, block sizes, scale, softcap, sliding_window, which optional
inputs exist. Head dims that are not powers of two are padded inside the kernel with masked loads.
All refs are whole arrays (no BlockSpecs): rows, heads and pages are gathered with computed
indices and masked loads/stores, so non-power-of-two head groups and ragged sequences need no
padding copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import triton_common as tc
from pallas_kernels.paged_attention import tuning
from pallas_kernels.paged_attention.triton_common import (
    LOG2E,
    MASK_VALUE,
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_KV_DTYPES,
    SUPPORTED_Q_DTYPES,
    check_supported,
)
from pallas_kernels.paged_attention.triton_decode import paged_decode
from pallas_kernels.paged_attention.tuning import BlockSizes

__all__ = [
    "LOG2E",
    "MASK_VALUE",
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_KV_DTYPES",
    "SUPPORTED_Q_DTYPES",
    "BlockSizes",
    "check_supported",
    "paged_attention",
    "paged_decode",
]


def _prefill_kernel(
    # inputs
    cu_ref,  # i32[S + 1]
    lens_ref,  # i32[S]
    bt_ref,  # i32[S, MB]
    q_ref,  # [T * H, D]
    k_ref,  # [NB * Hkv * BS, D]  (pages viewed as rows)
    v_ref,  # [NB * Hkv * BS, D]
    alibi_ref,  # f32[H] | None
    sinks_ref,  # f32[H] | None
    k_scale_ref,  # f32[Hkv] | None
    v_scale_ref,  # f32[Hkv] | None
    # outputs
    o_ref,  # [T * H, D]
    *lse_refs,  # f32[T * H] (return_lse only)
    num_seqs: int,
    num_tokens: int,
    num_kv_heads: int,
    num_blocks: int,
    max_blocks: int,
    group: int,
    q_per_tile: int,
    num_tiles: int,
    block_m: int,
    block_k: int,
    head_dim: int,
    dp: int,
    block_size: int,
    scale: float,
    softcap: float | None,
    window: int | None,
    cdt,
    heads_inner: bool,
    fold_scale: bool,
    prefetch: bool,
):
    qt = q_per_tile
    # Latest tiles first: under a causal mask they carry the most keys (better tail balance).
    tile_axis = 1 if heads_inner else 0
    tile = num_tiles - 1 - pl.program_id(tile_axis)
    h_kv = pl.program_id(1 - tile_axis)

    # Segment g of this tile: the largest g in [0, S + 1] with start_g // QT + g <= tile, where
    # start_0 = 0 (rows before cu[0]) and start_g = cu[g - 1] (sequence g - 1; g = S + 1: the
    # rows past cu[S]).
    def start(g):
        return jnp.where(g == 0, 0, cu_ref[jnp.maximum(g - 1, 0)])

    def bisect(_, lohi):
        lo, hi = lohi
        mid = tc.idiv(lo + hi, 2)
        ok = tc.idiv(start(mid), qt) + mid <= tile
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    g, _ = lax.fori_loop(
        0, (num_seqs + 2).bit_length(), bisect, (jnp.int32(0), jnp.int32(num_seqs + 2))
    )
    real = (g > 0) & (g <= num_seqs)
    seq = jnp.clip(g - 1, 0, num_seqs - 1)
    q_start = start(g)
    q_end = jnp.where(g > num_seqs, num_tokens, cu_ref[jnp.minimum(g, num_seqs)])
    ctx = jnp.where(real, tc.context_len(lens_ref, seq, max_blocks, block_size), 0)
    tok0 = q_start + (tile - (tc.idiv(q_start, qt) + g)) * qt

    @pl.when(tok0 < q_end)
    def _():
        r = jnp.arange(block_m, dtype=jnp.int32)
        tok_local, head = tc.idiv(r, group), h_kv * group + tc.irem(r, group)
        tok = tok0 + tok_local
        row_ok = (tok_local < qt) & (tok < q_end)
        n = q_end - q_start
        pos = ctx - n + (tok - q_start)  # [M]
        d = jnp.arange(dp, dtype=jnp.int32)
        d_ok = None if dp == head_dim else (d < head_dim)[None, :]
        o_idx = ((tok * (num_kv_heads * group) + head)[:, None], d[None, :])
        o_mask = row_ok[:, None] if d_ok is None else row_ok[:, None] & d_ok
        q = plgpu.load(q_ref.at[o_idx], mask=o_mask, other=0.0).astype(cdt)  # [M, dp]

        slope2 = None if alibi_ref is None else plgpu.load(alibi_ref.at[head]) * LOG2E
        raw = fold_scale and softcap is None and alibi_ref is None and scale > 0
        c = tc.logit_factor(h_kv, k_scale_ref, scale=scale, softcap=softcap, raw=raw)
        if sinks_ref is None:
            m0 = jnp.full((block_m,), MASK_VALUE, jnp.float32)
            l0 = jnp.zeros((block_m,), jnp.float32)
        else:  # the sink is a virtual first key carrying no value
            m0 = tc.sink_start(plgpu.load(sinks_ref.at[head]), c, raw)
            l0 = jnp.ones((block_m,), jnp.float32)
        carry = (jnp.zeros((block_m, dp), jnp.float32), m0, l0)

        # Key range of the tile (in tiles of block_k): rows see [p - W + 1, p] within [0, L).
        p_min = ctx - n + (tok0 - q_start)
        p_max = p_min + jnp.minimum(qt, q_end - tok0) - 1
        hi_blk = tc.cdiv(jnp.maximum(jnp.minimum(ctx, p_max + 1), 0), block_k)
        full_hi = tc.idiv(jnp.maximum(p_min + 1, 0), block_k)  # tiles every row sees entirely
        if window is None:
            lo_blk, full_lo = jnp.int32(0), jnp.int32(0)
        else:  # the KV loop starts at the first tile the window can see
            lo_blk = tc.idiv(jnp.maximum(p_min - window + 1, 0), block_k)
            full_lo = tc.cdiv(jnp.maximum(p_max - window + 1, 0), block_k)
        c0, c1 = tc.split_range(lo_blk, hi_blk, full_lo, full_hi)

        def step(j, carry, k, v, t, masked):
            vis = None
            if masked:
                vis = t[None, :] <= pos[:, None]
                if window is not None:
                    vis = vis & (t[None, :] > pos[:, None] - window)
            return tc.attend_tile(
                carry, q, k, v, t, pos, vis, c, slope2, softcap=softcap, cdt=cdt, raw=raw
            )

        ranges = [(c0, c1, False), (c1, hi_blk, True)]
        if window is not None:
            ranges.insert(0, (lo_blk, c0, True))
        acc, m, l = tc.kv_loop(
            bt_ref,
            k_ref,
            v_ref,
            seq,
            h_kv,
            ctx,
            ranges,
            carry,
            step,
            block_k=block_k,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            num_blocks=num_blocks,
            d_ok=d_ok,
            dp=dp,
            key_ok_fn=lambda t: t < ctx,
            prefetch=prefetch,
        )

        inv = 1.0 / jnp.where(l == 0.0, 1.0, l)  # l == 0 only for rows with no key (acc == 0)
        if v_scale_ref is not None:
            inv = inv * v_scale_ref[h_kv]
        plgpu.store(o_ref.at[o_idx], (acc * inv[:, None]).astype(o_ref.dtype), mask=o_mask)
        if lse_refs:  # epilogue only: once per row, nothing in the KV loop
            sink = None if sinks_ref is None else plgpu.load(sinks_ref.at[head])
            lse = tc.lse_epilogue(m, l, c, raw, sink)
            lse = jnp.where(real, lse, -jnp.inf)  # rows outside every sequence
            plgpu.store(lse_refs[0].at[tok * (num_kv_heads * group) + head], lse, mask=row_ok)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "softcap",
        "sliding_window",
        "interpret",
        "block_sizes",
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
    softcap: float | None,
    sliding_window: int | None,
    alibi_slopes,
    sinks,
    k_scale,
    v_scale,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    return_lse: bool = False,
):
    """Attention of packed queries ``q`` [T, H, D] over the paged cache (interfaces.AttentionKernels).
    ``return_lse``: ``(out, lse f32[T, H])``, the lse written in the kernel's epilogue."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, _ = k_pages.shape
    num_seqs = context_lens.shape[0]
    check_supported(
        head_dim=head_dim, block_size=block_size, q_dtype=q.dtype, kv_dtype=k_pages.dtype
    )
    if num_tokens == 0 or num_seqs == 0:
        out = jnp.zeros(q.shape, q.dtype)
        return (out, jnp.full(q.shape[:2], -jnp.inf, jnp.float32)) if return_lse else out
    group = num_heads // num_kv_heads
    if block_sizes is None and num_tokens <= 2 * num_seqs:
        # Decode-shaped batch (about one query per sequence): a tile of one token's head group, so
        # the kernel streams K/V instead of multiplying mostly-empty 128-row tiles.
        bs = tuning.get_block_sizes(head_dim, q.dtype, k_pages.dtype, "decode")
        block_m = max(16, tuning.next_pow2(group))
    else:
        bs = tuning.get_block_sizes(head_dim, q.dtype, k_pages.dtype, "prefill", block_sizes)
        block_m = max(bs.block_m, tuning.next_pow2(group))
    q_per_tile = block_m // group
    num_tiles = num_tokens // q_per_tile + num_seqs + 2  # S + 2 segments (see the docstring)
    dp = max(64, tuning.next_pow2(head_dim))
    optional, present = tc.optional_inputs(alibi_slopes, sinks, k_scale, v_scale)
    kernel = functools.partial(
        _prefill_kernel,
        num_seqs=num_seqs,
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
        num_blocks=num_blocks,
        max_blocks=block_tables.shape[1],
        group=group,
        q_per_tile=q_per_tile,
        num_tiles=num_tiles,
        block_m=block_m,
        block_k=bs.block_k,
        head_dim=head_dim,
        dp=dp,
        block_size=block_size,
        scale=float(scale),
        softcap=softcap,
        window=sliding_window,
        cdt=tc.compute_dtype(q.dtype, k_pages.dtype),
        heads_inner=bs.heads_inner,
        fold_scale=bs.prefill_fold,
        prefetch=bs.prefill_prefetch,
    )
    out_shape = jax.ShapeDtypeStruct((num_tokens * num_heads, head_dim), q.dtype)
    if return_lse:
        out_shape = (out_shape, jax.ShapeDtypeStruct((num_tokens * num_heads,), jnp.float32))
    out = pl.pallas_call(
        tc.bind_optional(kernel, 6, present),
        grid=(num_kv_heads, num_tiles) if bs.heads_inner else (num_tiles, num_kv_heads),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"paged_prefill_d{head_dim}_bs{block_size}_m{block_m}_k{bs.block_k}",
    )(
        cu_seqlens_q.astype(jnp.int32),  # cu_seqlens_q
        context_lens.astype(jnp.int32),  # context_lens
        block_tables.astype(jnp.int32),  # block_tables
        q.reshape(-1, head_dim),
        tc.pages_as_rows(k_pages),
        tc.pages_as_rows(v_pages),
        *optional,
    )
    if return_lse:
        return out[0].reshape(q.shape), out[1].reshape(q.shape[:2])
    return out.reshape(q.shape)
