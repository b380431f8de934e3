"""Paged decode for Hopper with Pallas Mosaic GPU: one query per sequence, q [S, H, D].

The kernel is ``mosaic._kernel`` in decode mode. A pair is one (sequence, KV head): the G query
heads that share the KV head are the 64 rows of the wgmma tiles. The grid is persistent (one CTA
per SM by default), in one of two ways:

* whole pairs (when there are at least as many pairs as CTAs): each pair is one item, the CTAs
  take them in ``mosaic.snake_items`` order and normalise in the kernel (no merge);
* stream-K (fewer pairs than CTAs, e.g. a few long contexts): CTA c takes the flat KV tiles
  [c T / C, (c + 1) T / C) of T = pairs x tiles, so every CTA streams the same number of tiles
  (C: a whole number of CTAs per pair where that idles few SMs, ``even_split_ctas``);
  a pair's tiles span a few CTAs (``mosaic.stream_ctas``), each writing an unnormalised partial
  (f32; q.dtype at head_dim 256, where f32 staging does not fit in shared memory) and the
  running max / sum of its rows into its slot, and ``_merge`` combines the slots in jnp.

Either way the memory warpgroup streams one item's pages right after the last one's, with no
pipeline refill or wave tail in between. With sinks, whole pairs also go through the merge (the
sink is one more logit in its denominator); ``_merge`` zeroes rows of sequences with no key.

q is read in place: the G heads of a pair are G consecutive rows of the flat q [S H, D]; the
kernel loads the 64 rows around them (from a multiple of 8) and uses only those
(``mosaic.decode_rows``), so no padded copy of q is made (S H < 64 or not a multiple of 8: q is
padded to that, a few rows). Static: as ``mosaic``, plus ``stream`` and ``num_ctas``.

Measured (H100, benchmarks/NOTES.md "Session 3" and "Session 4"): 64-key tiles in 3 stages,
whole pairs at 64 x 4096 and stream-K over 128 CTAs (2 per pair) at 8 x 32768, each 1.00x the
Triton kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import mosaic


def check_supported(
    *, head_dim, block_size, q_dtype, kv_dtype, return_lse=False, num_groups=1
) -> None:
    """The attention kernel's limits (it runs in decode mode), and the GQA group must fit the
    wgmma's 64 rows."""
    mosaic.check_supported(
        head_dim=head_dim, block_size=block_size, q_dtype=q_dtype, kv_dtype=kv_dtype
    )
    if num_groups > mosaic.BLOCK_Q:
        raise NotImplementedError(
            f"mosaic paged decode: {num_groups} query heads per KV head must be <= "
            f'{mosaic.BLOCK_Q}; use backend="triton" or backend="xla"'
        )


def even_split_ctas(num_pairs, num_ctas):
    """Stream-K grid: the largest multiple of ``num_pairs`` up to ``num_ctas`` (each pair split
    over the same whole number of CTAs, so a CTA's share rarely spans two pairs) when it idles at
    most 1/32 of the CTAs, else ``num_ctas``. HBM saturates before all SMs stream, and the share
    crossing a pair costs an epilogue, a q load and a partial slot: 8 x 32768 measured 0.7-1.5%
    faster on 128 CTAs than on 132 (benchmarks/NOTES.md, Session 4)."""
    even = num_pairs * (num_ctas // num_pairs)
    return even if even >= num_ctas - num_ctas // 32 else num_ctas


def stream_plan(num_pairs, tiles, num_ctas):
    """Stream-K: (slots per pair, valid bool[num_pairs, slots]); slot s of pair p is written by
    CTA first_cta(p) + s, and only the valid ones are."""
    first, last = mosaic.stream_ctas(np.arange(num_pairs), tiles, num_pairs, num_ctas)
    slots = int((last - first).max()) + 1
    return slots, np.arange(slots)[None, :] <= (last - first)[:, None]


def _merge(o, ml, valid, r_off, context_lens, sinks, num_heads, dtype, c, return_lse=False):
    """Slots -> one output: o f32[S, Hkv, P, G, D], ml f32[S, Hkv, P, 2, 64] (the kernel's units:
    ``c`` is the raw domain's factor to log2 units, None in log2 units, as
    ``mosaic.raw_factor``), valid bool[S, Hkv, P] (the slots some CTA wrote; the others are
    never read); the group's rows of ml start at r_off[S, Hkv] (``mosaic.decode_rows``).
    ``return_lse``: also the rows' lse f32[S, H], from the merged max and sum (no KV pass)."""
    s, hkv, _, grp, d = o.shape
    rows = (r_off[:, :, None] + jnp.arange(grp))[:, :, None, None, :]  # [S, Hkv, 1, 1, G]
    ml = jnp.take_along_axis(ml, rows, axis=4)
    keep = valid[..., None]
    m = jnp.where(keep, ml[:, :, :, 0], mosaic.MASK)  # [S, Hkv, P, G]
    l = jnp.where(keep, ml[:, :, :, 1], 0.0)
    m_all = m.max(axis=2)  # [S, Hkv, G]
    scale = 1.0 if c is None else c  # the slots weigh as the kernel weighs its tiles
    if sinks is not None:  # clamped finite: +inf gives w = 0, den = 1, rows exactly 0
        sink = mosaic.sink_start(sinks.astype(jnp.float32).reshape(1, hkv, grp), c)
        m_all = jnp.maximum(m_all, sink)
    w = jnp.exp2((m - m_all[:, :, None]) * scale)
    # Elementwise + reductions only (as the Triton merge), so XLA fuses the merge into few kernels.
    num = jnp.sum(w[..., None] * jnp.where(keep[..., None], o.astype(jnp.float32), 0), axis=2)
    den = (w * l).sum(axis=2)
    if sinks is not None:
        den = den + jnp.exp2((sink - m_all) * scale)
    seen = (context_lens > 0)[:, None, None] & (den > 0)
    out = jnp.where(seen[..., None], num / jnp.where(seen, den, 1.0)[..., None], 0.0)
    out = out.reshape(s, num_heads, d).astype(dtype)
    if not return_lse:
        return out
    sink = None if sinks is None else sinks.astype(jnp.float32).reshape(1, hkv, grp)
    return out, mosaic.lse_of_ml(m_all, den, c, sink).reshape(s, num_heads)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "softcap",
        "sliding_window",
        "interpret",
        "block_sizes",
        "stream",
        "num_ctas",
        "fuse",
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
    softcap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    interpret: bool = False,
    block_sizes: mosaic.BlockSizes | None = None,
    stream: bool | None = None,
    num_ctas: int | None = None,
    fuse: bool = True,
    return_lse: bool = False,
):
    """q [S, H, D] (query i at position context_lens[i] - 1) -> [S, H, D] in q.dtype.

    ``stream``: stream-K (None: when there are fewer (seq, KV head) pairs than CTAs);
    ``num_ctas``: the persistent grid (None: as many as fit, one per SM); ``fuse=False`` sends
    whole pairs through the merge too (for tests). ``return_lse``: also the rows' lse
    f32[S, H]: whole pairs then write their m and l in the epilogue (the unfused path) and the
    merge turns the written m and l into the lse.
    """
    if k_scale is not None or v_scale is not None:
        raise NotImplementedError(
            "mosaic paged decode: float8 KV caches (k_scale/v_scale) are "
            'not covered; use backend="triton" or backend="xla"'
        )
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_pages.shape
    grp = num_heads // num_kv_heads
    pairs = num_seqs * num_kv_heads
    st = mosaic.make_static(
        decode=True,
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
    max_context = block_tables.shape[1] * block_size

    def slots_for(bs):
        return num_ctas or mosaic.num_sms() * mosaic.ctas_per_sm(bs, head_dim, q.dtype, True)

    stream = pairs < slots_for(st.bs) if stream is None else stream
    if stream:
        bk = st.bs.block_kv
        tiles = -(-max_context // bk)
        if sliding_window is not None:
            tiles = min(tiles, -(-sliding_window // bk) + 1)
        ctas = slots_for(st.bs)
        ctas = min(ctas if num_ctas else even_split_ctas(pairs, ctas), pairs * tiles)
        num_slots, valid = stream_plan(pairs, tiles, ctas)
        st = dataclasses.replace(st, stream_tiles=tiles, num_splits=num_slots)
    else:
        ctas = min(slots_for(st.bs), pairs)
        valid = np.ones((pairs, 1), bool)
    # Normalise in the kernel, no merge (the lse needs the m and l of the unfused epilogue).
    fused = fuse and not stream and sinks is None and not return_lse
    # q in place as flat rows [S H, D]; padded only to >= 64 rows, a multiple of 8.
    q_rows = max(-(-num_seqs * num_heads // 8) * 8, mosaic.BLOCK_Q)
    qf = q.reshape(num_seqs * num_heads, head_dim)
    qf = jnp.pad(qf, ((0, q_rows - qf.shape[0]), (0, 0))) if q_rows > qf.shape[0] else qf
    st = dataclasses.replace(st, fused=fused, num_ctas=int(ctas), q_rows=q_rows)
    args = [context_lens.astype(jnp.int32), block_tables.astype(jnp.int32), qf, k_pages, v_pages]
    if alibi_slopes is not None:  # the slope of every flat q row
        slopes = jnp.tile(alibi_slopes.astype(jnp.float32), num_seqs)
        args.append(jnp.pad(slopes, (0, q_rows - slopes.shape[0])))
    grid, names = (st.num_ctas,), ("cta",)
    if fused:
        call = mosaic.build_call(
            st, jax.ShapeDtypeStruct((q_rows, head_dim), q.dtype), grid, names, q.dtype
        )
        return call(*args)[: num_seqs * num_heads].reshape(num_seqs, num_heads, head_dim)
    p = st.num_splits
    out_type = (
        jax.ShapeDtypeStruct(
            (num_seqs, num_kv_heads, p, grp, head_dim), mosaic.partial_dtype(head_dim, q.dtype)
        ),
        jax.ShapeDtypeStruct((num_seqs, num_kv_heads, p, 2, mosaic.BLOCK_Q), jnp.float32),
    )
    o, ml = mosaic.build_call(st, out_type, grid, names, q.dtype)(*args)
    seqs, heads = jnp.meshgrid(jnp.arange(num_seqs), jnp.arange(num_kv_heads), indexing="ij")
    _, r_off, _ = mosaic.decode_rows(seqs, heads, num_kv_heads, grp, q_rows)
    valid = jnp.asarray(valid.reshape(num_seqs, num_kv_heads, p))
    return _merge(
        o,
        ml,
        valid,
        r_off,
        context_lens,
        sinks,
        num_heads,
        q.dtype,
        mosaic.raw_factor(st),
        return_lse,
    )
