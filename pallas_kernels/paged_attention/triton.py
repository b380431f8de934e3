"""Paged attention over an "HND" KV cache: Pallas kernels, Triton lowering.

Computes SPEC.md §3: query row j of sequence i (n rows, context L) sits at p = L - n + j and
attends to keys t with 0 <= t <= p (and t > p - W with a sliding window W); key t lives at
``pages[block_tables[i, t // BS], h_kv, t % BS]``. Softcap, ALiBi, sinks, float8 KV with
per-KV-head scales. Online softmax in float32 (base 2: logits are pre-multiplied by log2(e)).

Two kernels:

``paged_attention`` (chunked prefill and mixed batches) -- grid ``(Hkv, num_tiles)`` with
``num_tiles = T // QT + S + 1`` fixed by shapes. A q tile holds ``QT = block_m // G`` query
tokens of one sequence times the ``G = H // Hkv`` query heads of one KV head, packed into the
M dimension (row r = token r // G, head r % G), so each K/V tile is loaded once per KV head.
Sequence i owns tiles ``cu[i] // QT + i ...`` (at least ceil(n_i / QT) of them); a program finds
its sequence by binary search over ``cu_seqlens_q`` on the device (no host sync, no recompile
for a new batch composition). Rows past ``cu[S]`` belong to a pseudo-sequence of context 0 and
come out as zeros, so every output row is written exactly once. The KV loop runs over
[first key any row's window sees, last key any row sees]: tiles every row fully sees run without
masks (the row max taken on the raw q.k, then one exp2(s * c - m)), the window edge and the
causal diagonal run masked. Tiles are launched latest first (most keys), all KV heads of a tile
before the next one.

``paged_decode`` -- one query per sequence; grid ``(S, Hkv, num_splits)``. The q tile is the
head group padded to >= 16 rows. With ``num_splits > 1`` each program covers one slice of the
context and writes an unnormalised f32 partial output, its running max and sum; a small jnp
merge combines them (and adds the sinks).

Static: head_dim, block_size, group, block sizes, scale, softcap, sliding_window, which optional
inputs exist. Head dims that are not powers of two are padded inside the kernel with masked loads.
All refs are whole arrays (no BlockSpecs): rows, heads and pages are gathered with computed
indices and masked loads/stores, so non-power-of-two head groups and ragged sequences need no
padding copies.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import tuning
from pallas_kernels.paged_attention.tuning import BlockSizes

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 80, 96, 128, 192, 256)
SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
SUPPORTED_Q_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_KV_DTYPES = SUPPORTED_Q_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),)

LOG2E = math.log2(math.e)
# Finite, not -inf: a row that has seen no visible key yet has m == MASK_VALUE, and
# exp2(MASK_VALUE - MASK_VALUE) = 1 where (-inf) - (-inf) would be NaN. Masked probabilities
# are additionally zeroed with `where`, so such rows keep l == 0 and come out as exact zeros.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def check_supported(*, head_dim, block_size, q_dtype, kv_dtype) -> None:
    """Raises NotImplementedError for a configuration these kernels cannot run."""
    hint = '; use backend="xla" for other configurations'
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"triton paged attention: {head_dim=} must be one of {SUPPORTED_HEAD_DIMS}{hint}"
        )
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise NotImplementedError(
            f"triton paged attention: {block_size=} must be one of {SUPPORTED_BLOCK_SIZES}{hint}"
        )
    if jnp.dtype(q_dtype) not in SUPPORTED_Q_DTYPES:
        raise NotImplementedError(
            f"triton paged attention: q dtype {jnp.dtype(q_dtype)} must be one "
            f"of {[str(d) for d in SUPPORTED_Q_DTYPES]}{hint}"
        )
    if jnp.dtype(kv_dtype) not in SUPPORTED_KV_DTYPES:
        raise NotImplementedError(
            f"triton paged attention: kv dtype {jnp.dtype(kv_dtype)} must be "
            f"one of {[str(d) for d in SUPPORTED_KV_DTYPES]}{hint}"
        )


# ------------------------------------------------------------------------------------------------
# Shared pieces of the kernel bodies.
# ------------------------------------------------------------------------------------------------


def _bind_optional(kernel, num_fixed: int, present: tuple[bool, ...]):
    """Adapts ``kernel(fixed..., optional..., outputs...)`` to the refs pallas_call passes, which
    omit the optional inputs that are None."""

    def wrapped(*refs):
        fixed, rest = refs[:num_fixed], iter(refs[num_fixed:])
        optional = [next(rest) if p else None for p in present]
        return kernel(*fixed, *optional, *rest)

    return wrapped


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _split_range(b0, b1, f0, f1):
    """[b0, b1) -> masked [b0, c0), unmasked [c0, c1), masked [c1, b1) with [c0, c1) = [f0, f1)
    clamped into [b0, b1)."""
    c0 = jnp.minimum(jnp.maximum(f0, b0), b1)
    c1 = jnp.minimum(jnp.maximum(f1, c0), b1)
    return c0, c1


def _page_rows(bt_ref, seq, h_kv, t, key_ok, *, block_size, num_kv_heads):
    """Rows of key positions ``t`` [BK] of sequence ``seq`` in the [NB * Hkv * BS, D] view.

    Page ids come from the block table per key, so a tile may span several pages or part of one.
    Keys with ``key_ok == False`` read no block-table entry (row of page 0: never loaded).
    """
    blk, off = lax.div(t, block_size), lax.rem(t, block_size)
    if key_ok is None:
        page = plgpu.load(bt_ref.at[seq, blk])
    else:
        page = plgpu.load(bt_ref.at[seq, blk], mask=key_ok, other=0)
    return (page * num_kv_heads + h_kv) * block_size + off  # [BK]


def _load_rows(k_ref, v_ref, row, key_ok, d_ok, *, dp):
    """K and V rows ``row`` [BK]: [BK, dp] each. Row offsets are computed on [BK] vectors, and
    only ``row * D + d`` on the full tile. Keys with ``key_ok == False`` (past the context: NaN in
    unused slots) and padded head-dim columns load as 0 and are never read from memory."""
    d = jnp.arange(dp, dtype=jnp.int32)
    idx = (row[:, None], d[None, :])
    mask = d_ok if key_ok is None else (key_ok[:, None] if d_ok is None else key_ok[:, None] & d_ok)
    if mask is None:
        return plgpu.load(k_ref.at[idx]), plgpu.load(v_ref.at[idx])
    return (
        plgpu.load(k_ref.at[idx], mask=mask, other=0.0),
        plgpu.load(v_ref.at[idx], mask=mask, other=0.0),
    )


def _kv_loop(
    bt_ref,
    k_ref,
    v_ref,
    seq,
    h_kv,
    ctx,
    ranges,
    carry,
    step,
    *,
    block_k,
    block_size,
    num_kv_heads,
    d_ok,
    dp,
    key_ok_fn,
    prefetch,
):
    """Runs ``step(j, carry, k, v, t, masked)`` over the KV tiles of ``ranges``: a list of
    (start, stop, masked) fori_loops run in order, contiguous. ``key_ok_fn(t)`` masks the keys of
    masked tiles. With ``prefetch`` the page rows of tile j + 1 are loaded in iteration j (masked
    by ``t < ctx``) and carried."""
    geo = dict(block_size=block_size, num_kv_heads=num_kv_heads)
    keys = lambda j: j * block_k + jnp.arange(block_k, dtype=jnp.int32)

    if not prefetch:

        def body(j, carry, masked):
            t = keys(j)
            key_ok = key_ok_fn(t) if masked else None
            row = _page_rows(bt_ref, seq, h_kv, t, key_ok, **geo)
            k, v = _load_rows(k_ref, v_ref, row, key_ok, d_ok, dp=dp)
            return step(j, carry, k, v, t, masked)

        for start, stop, masked in ranges:
            carry = lax.fori_loop(start, stop, functools.partial(body, masked=masked), carry)
        return carry

    def body(j, carry_row, masked):
        carry, row = carry_row
        t = keys(j)
        t_next = t + block_k
        row_next = _page_rows(bt_ref, seq, h_kv, t_next, t_next < ctx, **geo)
        key_ok = key_ok_fn(t) if masked else None
        k, v = _load_rows(k_ref, v_ref, row, key_ok, d_ok, dp=dp)
        return step(j, carry, k, v, t, masked), row_next

    t0 = keys(ranges[0][0])
    row = _page_rows(bt_ref, seq, h_kv, t0, t0 < ctx, **geo)
    for start, stop, masked in ranges:
        carry, row = lax.fori_loop(
            start, stop, functools.partial(body, masked=masked), (carry, row)
        )
    return carry


def _attend_tile(carry, q, k, v, t, pos, vis, qk_scale, slope2, *, softcap, cdt, fold=False):
    """One online-softmax step of a q tile [M, dp] against a KV tile [BK, dp] (base 2).

    ``fold`` (static) requires vis, softcap and slope2 None and qk_scale > 0."""
    acc, m, l = carry
    precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    s = plgpu.dot(q, k.astype(cdt), trans_b=True, precision=precision)  # [M, BK] f32
    if fold:  # unmasked, no softcap / ALiBi, qk_scale > 0: max of the raw logits, then scale
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * qk_scale)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * qk_scale - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(cdt), v.astype(cdt), precision=precision)
        return acc, m_new, l
    if softcap is None:
        s = s * qk_scale
    else:  # c * tanh(logit / c), in log2 units
        s = (softcap * LOG2E) * jnp.tanh(s * qk_scale)
    if slope2 is not None:
        s = s + slope2[:, None] * (t[None, :] - pos[:, None]).astype(jnp.float32)
    if vis is not None:
        s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if vis is not None:  # rows that have seen no visible key: exp2(0) = 1 must not count
        p = jnp.where(vis, p, 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(cdt), v.astype(cdt), precision=precision)
    return acc, m_new, l


def _scalars(h_kv, k_scale_ref, *, scale, softcap):
    """The factor applied to q.k: scale (* k_scale) in log2 units, or / softcap before tanh."""
    qk_scale = scale * LOG2E if softcap is None else scale / softcap
    if k_scale_ref is not None:
        qk_scale = qk_scale * k_scale_ref[h_kv]
    return qk_scale


# ------------------------------------------------------------------------------------------------
# Chunked prefill / mixed batches.
# ------------------------------------------------------------------------------------------------


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
    *,
    num_seqs: int,
    num_tokens: int,
    num_kv_heads: int,
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

    # Sequence of this tile: the largest i in [0, S] with cu[i] // QT + i <= tile (i == S: padding).
    def bisect(_, lohi):
        lo, hi = lohi
        mid = lax.div(lo + hi, 2)
        ok = lax.div(cu_ref[mid], qt) + mid <= tile
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    seq, _ = lax.fori_loop(
        0, (num_seqs + 1).bit_length(), bisect, (jnp.int32(0), jnp.int32(num_seqs + 1))
    )
    is_pad = seq == num_seqs
    q_start = cu_ref[seq]
    q_end = jnp.where(is_pad, num_tokens, cu_ref[jnp.minimum(seq + 1, num_seqs)])
    ctx = jnp.where(is_pad, 0, lens_ref[jnp.minimum(seq, num_seqs - 1)])
    tok0 = q_start + (tile - (lax.div(q_start, qt) + seq)) * qt

    @pl.when(tok0 < q_end)
    def _():
        r = jnp.arange(block_m, dtype=jnp.int32)
        tok_local, head = lax.div(r, group), h_kv * group + lax.rem(r, group)
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
        if sinks_ref is None:
            m0 = jnp.full((block_m,), MASK_VALUE, jnp.float32)
            l0 = jnp.zeros((block_m,), jnp.float32)
        else:  # the sink is a virtual first key carrying no value
            m0 = plgpu.load(sinks_ref.at[head]) * LOG2E
            l0 = jnp.ones((block_m,), jnp.float32)
        carry = (jnp.zeros((block_m, dp), jnp.float32), m0, l0)
        qk_scale = _scalars(h_kv, k_scale_ref, scale=scale, softcap=softcap)

        # Key range of the tile (in tiles of block_k): rows see [p - W + 1, p] within [0, L).
        p_min = ctx - n + (tok0 - q_start)
        p_max = p_min + jnp.minimum(qt, q_end - tok0) - 1
        hi_blk = _cdiv(jnp.maximum(jnp.minimum(ctx, p_max + 1), 0), block_k)
        full_hi = lax.div(jnp.maximum(p_min + 1, 0), block_k)  # tiles every row sees entirely
        if window is None:
            lo_blk, full_lo = jnp.int32(0), jnp.int32(0)
        else:  # the KV loop starts at the first tile the window can see
            lo_blk = lax.div(jnp.maximum(p_min - window + 1, 0), block_k)
            full_lo = _cdiv(jnp.maximum(p_max - window + 1, 0), block_k)
        c0, c1 = _split_range(lo_blk, hi_blk, full_lo, full_hi)

        fold = (
            fold_scale and softcap is None and slope2 is None and k_scale_ref is None and scale > 0
        )

        def step(j, carry, k, v, t, masked):
            vis = None
            if masked:
                vis = t[None, :] <= pos[:, None]
                if window is not None:
                    vis = vis & (t[None, :] > pos[:, None] - window)
            return _attend_tile(
                carry,
                q,
                k,
                v,
                t,
                pos,
                vis,
                qk_scale,
                slope2,
                softcap=softcap,
                cdt=cdt,
                fold=fold and not masked,
            )

        ranges = [(c0, c1, False), (c1, hi_blk, True)]
        if window is not None:
            ranges.insert(0, (lo_blk, c0, True))
        acc, _, l = _kv_loop(
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
            d_ok=d_ok,
            dp=dp,
            key_ok_fn=lambda t: t < ctx,
            prefetch=prefetch,
        )

        inv = 1.0 / jnp.where(l == 0.0, 1.0, l)  # l == 0 only for rows with no key (acc == 0)
        if v_scale_ref is not None:
            inv = inv * v_scale_ref[h_kv]
        plgpu.store(o_ref.at[o_idx], (acc * inv[:, None]).astype(o_ref.dtype), mask=o_mask)


def _rows(pages):
    """[NB, Hkv, BS, D] -> [NB * Hkv * BS, D]: a free (row-major) view for 1-D row offsets."""
    return pages.reshape(-1, pages.shape[-1])


def _compute_dtype(q_dtype, kv_dtype):
    if jnp.dtype(kv_dtype) == jnp.float8_e4m3fn:
        return jnp.dtype(q_dtype)
    return jnp.promote_types(q_dtype, kv_dtype)


def _optional(alibi_slopes, sinks, k_scale, v_scale):
    ops = (alibi_slopes, sinks, k_scale, v_scale)
    present = tuple(x is not None for x in ops)
    return [x.astype(jnp.float32) for x in ops if x is not None], present


@functools.partial(
    jax.jit, static_argnames=("scale", "softcap", "sliding_window", "interpret", "block_sizes")
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
):
    """Attention of packed queries ``q`` [T, H, D] over the paged cache (interfaces.AttentionKernels)."""
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_pages.shape
    num_seqs = context_lens.shape[0]
    check_supported(
        head_dim=head_dim, block_size=block_size, q_dtype=q.dtype, kv_dtype=k_pages.dtype
    )
    if num_tokens == 0 or num_seqs == 0:
        return jnp.zeros(q.shape, q.dtype)
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
    num_tiles = num_tokens // q_per_tile + num_seqs + 1
    dp = max(64, tuning.next_pow2(head_dim))
    optional, present = _optional(alibi_slopes, sinks, k_scale, v_scale)
    kernel = functools.partial(
        _prefill_kernel,
        num_seqs=num_seqs,
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
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
        cdt=_compute_dtype(q.dtype, k_pages.dtype),
        heads_inner=bs.heads_inner,
        fold_scale=bs.prefill_fold,
        prefetch=bs.prefill_prefetch,
    )
    out = pl.pallas_call(
        _bind_optional(kernel, 6, present),
        grid=(num_kv_heads, num_tiles) if bs.heads_inner else (num_tiles, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((num_tokens * num_heads, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"paged_prefill_d{head_dim}_bs{block_size}_m{block_m}_k{bs.block_k}",
    )(
        cu_seqlens_q.astype(jnp.int32),  # cu_seqlens_q
        context_lens.astype(jnp.int32),  # context_lens
        block_tables.astype(jnp.int32),  # block_tables
        q.reshape(-1, head_dim),
        _rows(k_pages),
        _rows(v_pages),
        *optional,
    )
    return out.reshape(q.shape)


# ------------------------------------------------------------------------------------------------
# Decode (one query per sequence), optionally split along the context.
# ------------------------------------------------------------------------------------------------


def _decode_kernel(
    # inputs
    lens_ref,  # i32[S]
    bt_ref,  # i32[S, MB]
    q_ref,  # [S * H, D]
    k_ref,  # [NB * Hkv * BS, D]  (pages viewed as rows)
    v_ref,  # [NB * Hkv * BS, D]
    alibi_ref,  # f32[H] | None
    sinks_ref,  # f32[H] | None
    k_scale_ref,  # f32[Hkv] | None
    v_scale_ref,  # f32[Hkv] | None
    # outputs
    o_ref,  # [S * H, D] (one split) | f32[NSPLIT * S * H, D] unnormalised partials
    *split_refs,  # f32[NSPLIT * S * H] running max (log2 units) and sum (splits only)
    num_seqs: int,
    num_kv_heads: int,
    group: int,
    rows: int,
    num_splits: int,
    block_k: int,
    head_dim: int,
    dp: int,
    block_size: int,
    scale: float,
    softcap: float | None,
    window: int | None,
    cdt,
    fold_scale: bool,
    prefetch: bool,
):
    seq, h_kv, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = jnp.arange(rows, dtype=jnp.int32)
    row_ok = r < group  # the head group padded to >= 16 rows (dot tiles)
    row = seq * (num_kv_heads * group) + h_kv * group + r  # row of q / out [S * H, D]
    d = jnp.arange(dp, dtype=jnp.int32)
    d_ok = None if dp == head_dim else (d < head_dim)[None, :]
    row_mask = row_ok[:, None] if d_ok is None else row_ok[:, None] & d_ok
    q = plgpu.load(q_ref.at[row[:, None], d[None, :]], mask=row_mask, other=0.0).astype(cdt)

    ctx = lens_ref[seq]
    pos = jnp.full((rows,), ctx - 1, jnp.int32)
    slope2 = (
        None
        if alibi_ref is None
        else (plgpu.load(alibi_ref.at[h_kv * group + r], mask=row_ok, other=0.0) * LOG2E)
    )
    if sinks_ref is None or num_splits > 1:  # with splits the merge adds the sinks
        m0 = jnp.full((rows,), MASK_VALUE, jnp.float32)
        l0 = jnp.zeros((rows,), jnp.float32)
    else:
        m0 = plgpu.load(sinks_ref.at[h_kv * group + r], mask=row_ok, other=0.0) * LOG2E
        l0 = jnp.ones((rows,), jnp.float32)
    carry = (jnp.zeros((rows, dp), jnp.float32), m0, l0)
    qk_scale = _scalars(h_kv, k_scale_ref, scale=scale, softcap=softcap)

    # Keys [lo, L) (a window starts the loop at its first tile), this split's share of the tiles.
    lo = jnp.int32(0) if window is None else jnp.maximum(ctx - window, 0)
    lo_blk, hi_blk = lax.div(lo, block_k), _cdiv(ctx, block_k)
    if num_splits == 1:
        b0, b1 = lo_blk, hi_blk
    else:
        per = _cdiv(hi_blk - lo_blk, num_splits)
        b0 = lo_blk + split * per
        b1 = jnp.minimum(hi_blk, b0 + per)
    c0, c1 = _split_range(b0, b1, _cdiv(lo, block_k), lax.div(ctx, block_k))

    fold = fold_scale and softcap is None and slope2 is None and k_scale_ref is None and scale > 0
    key_ok_fn = (lambda t: t < ctx) if window is None else (lambda t: (t < ctx) & (t >= lo))

    def step(j, carry, k, v, t, masked):
        vis = key_ok_fn(t)[None, :] if masked else None
        return _attend_tile(
            carry,
            q,
            k,
            v,
            t,
            pos,
            vis,
            qk_scale,
            slope2,
            softcap=softcap,
            cdt=cdt,
            fold=fold and not masked,
        )

    ranges = [(c0, c1, False), (c1, b1, True)]
    if window is not None:
        ranges.insert(0, (b0, c0, True))
    acc, m, l = _kv_loop(
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
        d_ok=d_ok,
        dp=dp,
        key_ok_fn=key_ok_fn,
        prefetch=prefetch,
    )

    vs = 1.0 if v_scale_ref is None else v_scale_ref[h_kv]
    if num_splits == 1:
        inv = vs / jnp.where(l == 0.0, 1.0, l)  # l == 0 only when no key is visible (acc == 0)
        plgpu.store(
            o_ref.at[row[:, None], d[None, :]],
            (acc * inv[:, None]).astype(o_ref.dtype),
            mask=row_mask,
        )
    else:
        m_ref, l_ref = split_refs
        part = split * (num_seqs * num_kv_heads * group) + row
        plgpu.store(o_ref.at[part[:, None], d[None, :]], acc * vs, mask=row_mask)
        plgpu.store(m_ref.at[part], m, mask=row_ok)
        plgpu.store(l_ref.at[part], l, mask=row_ok)


def _merge_splits(o, m, l, sinks, out_dtype):
    """Combines split partials: o f32[NS, S, H, D] (unnormalised), m, l f32[NS, S, H]."""
    m_max = jnp.max(m, axis=0)
    if sinks is not None:
        sink2 = sinks.astype(jnp.float32)[None, :] * LOG2E
        m_max = jnp.maximum(m_max, sink2)
    w = jnp.exp2(m - m_max[None])  # empty splits: m = MASK_VALUE -> weight 0
    l_tot = jnp.sum(w * l, axis=0)
    if sinks is not None:
        l_tot = l_tot + jnp.exp2(sink2 - m_max)
    out = jnp.sum(w[..., None] * o, axis=0) / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]
    return out.astype(out_dtype)


@functools.partial(
    jax.jit, static_argnames=("scale", "softcap", "sliding_window", "interpret", "block_sizes")
)
def paged_decode(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
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
):
    """Decode attention: ``q`` [S, H, D], one query per sequence at position L - 1."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_pages.shape
    check_supported(
        head_dim=head_dim, block_size=block_size, q_dtype=q.dtype, kv_dtype=k_pages.dtype
    )
    if num_seqs == 0:
        return jnp.zeros(q.shape, q.dtype)
    group = num_heads // num_kv_heads
    bs = tuning.get_block_sizes(head_dim, q.dtype, k_pages.dtype, "decode", block_sizes)
    max_context = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_context = min(max_context, sliding_window + bs.block_k)
    num_splits = bs.num_splits or tuning.choose_num_splits(
        num_seqs, num_kv_heads, max_context, bs.block_k
    )
    rows = max(16, tuning.next_pow2(group))
    dp = max(64, tuning.next_pow2(head_dim))
    optional, present = _optional(alibi_slopes, sinks, k_scale, v_scale)
    rows_out = num_seqs * num_heads
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows_out, head_dim), q.dtype)
    else:
        out_shape = (
            jax.ShapeDtypeStruct((num_splits * rows_out, head_dim), jnp.float32),  # o parts
            jax.ShapeDtypeStruct((num_splits * rows_out,), jnp.float32),  # m
            jax.ShapeDtypeStruct((num_splits * rows_out,), jnp.float32),
        )  # l
    kernel = functools.partial(
        _decode_kernel,
        num_seqs=num_seqs,
        num_kv_heads=num_kv_heads,
        group=group,
        rows=rows,
        num_splits=num_splits,
        block_k=bs.block_k,
        head_dim=head_dim,
        dp=dp,
        block_size=block_size,
        scale=float(scale),
        softcap=softcap,
        window=sliding_window,
        cdt=_compute_dtype(q.dtype, k_pages.dtype),
        fold_scale=bs.decode_fold,
        prefetch=bs.decode_prefetch,
    )
    res = pl.pallas_call(
        _bind_optional(kernel, 5, present),
        grid=(num_seqs, num_kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"paged_decode_d{head_dim}_bs{block_size}_k{bs.block_k}_s{num_splits}",
    )(
        context_lens.astype(jnp.int32),  # context_lens
        block_tables.astype(jnp.int32),  # block_tables
        q.reshape(-1, head_dim),
        _rows(k_pages),
        _rows(v_pages),
        *optional,
    )
    if num_splits == 1:
        return res.reshape(q.shape)
    o, m, l = res
    parts = (num_splits, num_seqs, num_heads)
    return _merge_splits(
        o.reshape(*parts, head_dim), m.reshape(parts), l.reshape(parts), sinks, q.dtype
    )
