"""Paged decode over an "HND" KV cache: Pallas kernel, Triton lowering.

One query per sequence (at position L - 1); grid ``(S, Hkv, num_splits)``. The q tile is the
head group padded to >= 16 rows. With ``num_splits > 1`` each program covers one slice of the
context and writes an unnormalised f32 partial output, its running max (in the loop's units,
``triton_common``) and sum; a small jnp merge combines them (and adds the sinks). The shared
pieces (gathered K/V loop, softmax step, clamps of bad metadata) live in ``triton_common``;
``triton.paged_decode`` is this module's entry point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import triton_common as tc
from pallas_kernels.paged_attention import tuning
from pallas_kernels.paged_attention.triton_common import LOG2E, MASK_VALUE, check_supported
from pallas_kernels.paged_attention.tuning import BlockSizes


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
    *extra_refs,  # one split: f32[S * H] lse (return_lse only); splits: f32[NSPLIT * S * H]
    # running max (loop units) and sum
    num_seqs: int,
    num_kv_heads: int,
    num_blocks: int,
    max_blocks: int,
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

    ctx = tc.context_len(lens_ref, seq, max_blocks, block_size)
    pos = jnp.full((rows,), ctx - 1, jnp.int32)
    slope2 = (
        None
        if alibi_ref is None
        else (plgpu.load(alibi_ref.at[h_kv * group + r], mask=row_ok, other=0.0) * LOG2E)
    )
    raw = fold_scale and softcap is None and alibi_ref is None and scale > 0
    c = tc.logit_factor(h_kv, k_scale_ref, scale=scale, softcap=softcap, raw=raw)
    if sinks_ref is None or num_splits > 1:  # with splits the merge adds the sinks
        m0 = jnp.full((rows,), MASK_VALUE, jnp.float32)
        l0 = jnp.zeros((rows,), jnp.float32)
    else:
        sink = plgpu.load(sinks_ref.at[h_kv * group + r], mask=row_ok, other=0.0)
        m0 = tc.sink_start(sink, c, raw)
        l0 = jnp.ones((rows,), jnp.float32)
    carry = (jnp.zeros((rows, dp), jnp.float32), m0, l0)

    # Keys [lo, L) (a window starts the loop at its first tile), this split's share of the tiles.
    lo = jnp.int32(0) if window is None else jnp.maximum(ctx - window, 0)
    lo_blk, hi_blk = tc.idiv(lo, block_k), tc.cdiv(ctx, block_k)
    if num_splits == 1:
        b0, b1 = lo_blk, hi_blk
    else:
        per = tc.cdiv(hi_blk - lo_blk, num_splits)
        b0 = lo_blk + split * per
        b1 = jnp.minimum(hi_blk, b0 + per)
    c0, c1 = tc.split_range(b0, b1, tc.cdiv(lo, block_k), tc.idiv(ctx, block_k))

    key_ok_fn = (lambda t: t < ctx) if window is None else (lambda t: (t < ctx) & (t >= lo))

    def step(j, carry, k, v, t, masked):
        vis = key_ok_fn(t)[None, :] if masked else None
        return tc.attend_tile(
            carry, q, k, v, t, pos, vis, c, slope2, softcap=softcap, cdt=cdt, raw=raw
        )

    ranges = [(c0, c1, False), (c1, b1, True)]
    if window is not None:
        ranges.insert(0, (b0, c0, True))
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
        if extra_refs:  # return_lse: the epilogue writes each row's lse once
            plgpu.store(
                extra_refs[0].at[row],
                tc.lse_epilogue(m, l, c, raw, None if sinks_ref is None else sink),
                mask=row_ok,
            )
    else:
        m_ref, l_ref = extra_refs
        part = split * (num_seqs * num_kv_heads * group) + row
        plgpu.store(o_ref.at[part[:, None], d[None, :]], acc * vs, mask=row_mask)
        plgpu.store(m_ref.at[part], m, mask=row_ok)
        plgpu.store(l_ref.at[part], l, mask=row_ok)


def _merge_splits(o, m, l, sinks, c, raw, out_dtype, return_lse=False):
    """Combines split partials: o f32[NS, S, H, D] (unnormalised), m, l f32[NS, S, H]; m in the
    loop's units, ``c`` f32[H] its factor to log2 units (raw domain; else 1), so the merge
    weighs the splits exactly as the loop weighs tiles. ``return_lse``: also the rows' lse
    f32[S, H], from the merged max and sum (no pass over the KV)."""
    m_max = jnp.max(m, axis=0)
    if sinks is not None:
        sink = tc.sink_start(sinks.astype(jnp.float32), c, raw)[None, :]
        m_max = jnp.maximum(m_max, sink)
    w = jnp.exp2((m - m_max[None]) * c)  # empty splits: m = MASK_VALUE -> weight 0
    l_tot = jnp.sum(w * l, axis=0)
    if sinks is not None:  # a +inf sink: m_max = -MASK_VALUE, w = 0, l_tot = 1: rows are 0
        l_tot = l_tot + jnp.exp2((sink - m_max) * c)
    out = jnp.sum(w[..., None] * o, axis=0) / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]
    if return_lse:  # m_max * c: log2 units in both domains (c == 1 outside the raw domain)
        sink = None if sinks is None else sinks.astype(jnp.float32)[None, :]
        return out.astype(out_dtype), tc.lse_epilogue(m_max, l_tot, c, True, sink)
    return out.astype(out_dtype)


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
    return_lse: bool = False,
):
    """Decode attention: ``q`` [S, H, D], one query per sequence at position L - 1.
    ``return_lse``: ``(out, lse f32[S, H])``, from the single split's epilogue or the merge."""
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, _ = k_pages.shape
    check_supported(
        head_dim=head_dim, block_size=block_size, q_dtype=q.dtype, kv_dtype=k_pages.dtype
    )
    if num_seqs == 0:
        out = jnp.zeros(q.shape, q.dtype)
        return (out, jnp.full(q.shape[:2], -jnp.inf, jnp.float32)) if return_lse else out
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
    optional, present = tc.optional_inputs(alibi_slopes, sinks, k_scale, v_scale)
    rows_out = num_seqs * num_heads
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows_out, head_dim), q.dtype)
        if return_lse:
            out_shape = (out_shape, jax.ShapeDtypeStruct((rows_out,), jnp.float32))
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
        num_blocks=num_blocks,
        max_blocks=block_tables.shape[1],
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
        cdt=tc.compute_dtype(q.dtype, k_pages.dtype),
        fold_scale=bs.decode_fold,
        prefetch=bs.decode_prefetch,
    )
    res = pl.pallas_call(
        tc.bind_optional(kernel, 5, present),
        grid=(num_seqs, num_kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"paged_decode_d{head_dim}_bs{block_size}_k{bs.block_k}_s{num_splits}",
    )(
        context_lens.astype(jnp.int32),  # context_lens
        block_tables.astype(jnp.int32),  # block_tables
        q.reshape(-1, head_dim),
        tc.pages_as_rows(k_pages),
        tc.pages_as_rows(v_pages),
        *optional,
    )
    if num_splits == 1:
        if return_lse:
            return res[0].reshape(q.shape), res[1].reshape(q.shape[:2])
        return res.reshape(q.shape)
    o, m, l = res
    parts = (num_splits, num_seqs, num_heads)
    raw = bs.decode_fold and softcap is None and alibi_slopes is None and scale > 0
    c = jnp.ones((num_heads,), jnp.float32)
    if raw:
        c = c * (scale * LOG2E)
        if k_scale is not None:
            c = c * jnp.repeat(k_scale.astype(jnp.float32), group)
    return _merge_splits(
        o.reshape(*parts, head_dim),
        m.reshape(parts),
        l.reshape(parts),
        sinks,
        c,
        raw,
        q.dtype,
        return_lse,
    )
