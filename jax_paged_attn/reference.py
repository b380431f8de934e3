"""The ``xla`` backend: pure JAX, runs on every platform, and the readable oracle.

Attention walks the KV cache in chunks of whole blocks with an online softmax, so it never
materialises logits of size ``[T, H, max_context]``. Queries are processed in *q-tiles*: a
tile is up to ``q_tile`` consecutive query rows of one sequence, so each KV block is gathered
once per tile, not once per row. The tiles are enumerated on the device from
``cu_seqlens_q`` (a prefix sum of ``ceil(n_i / q_tile)``) under a static bound, so nothing
syncs with the host and a new batch composition does not recompile.

The fused MoE is in ``reference_moe.py`` (re-exported here): expert-sorted routed rows through
matmuls batched over per-expert slots, memory proportional to the ``T * k`` routed rows.
float32 matmuls run at ``Precision.HIGHEST`` (not TF32 on GPUs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The fused MoE lives in reference_moe.py, re-exported: this module is the xla backend of every
# op (backends.TABLE), so its MoE names stay ``reference.fused_moe`` etc.
from jax_paged_attn.reference_moe import ACTIVATIONS as ACTIVATIONS
from jax_paged_attn.reference_moe import MOE_ACTIVATIONS as MOE_ACTIVATIONS
from jax_paged_attn.reference_moe import fused_moe as fused_moe
from jax_paged_attn.reference_moe import moe_glu as moe_glu
from jax_paged_attn.reference_moe import moe_plan as moe_plan

_HI = lax.Precision.HIGHEST


def _tiles(cu_seqlens_q, context_lens, num_tokens: int, q_tile: int):
    """Enumerates q-tiles: for tile ``i`` its sequence, first row and row count.

    Returns (seq [NT], rows [NT, q_tile] (row index, ``T`` where invalid), pos [NT, q_tile]
    (absolute position of each row in its context, -1 where invalid)).
    """
    num_seqs = context_lens.shape[0]
    n_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [S]
    tiles_per_seq = (n_q + q_tile - 1) // q_tile
    tile_end = jnp.cumsum(tiles_per_seq)  # [S]
    # Each non-empty tile holds >= 1 row and each sequence adds at most one partial tile.
    num_tiles = min(num_tokens, -(-num_tokens // q_tile) + num_seqs)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    # compare_all: one fused op (the default binary search is a while loop on a GPU)
    seq = jnp.searchsorted(tile_end, tile, side="right", method="compare_all").astype(jnp.int32)
    live = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    first_tile = tile_end[seq] - tiles_per_seq[seq]
    j = (tile - first_tile)[:, None] * q_tile + jnp.arange(q_tile, dtype=jnp.int32)[None, :]
    valid = live[:, None] & (j < n_q[seq][:, None])
    rows = jnp.where(valid, cu_seqlens_q[seq][:, None] + j, num_tokens)
    pos = jnp.where(valid, (context_lens[seq] - n_q[seq])[:, None] + j, -1)
    return seq, rows, pos


def _varying_like(xs, tree):
    """Inside ``shard_map`` (check_vma), loop carries must vary over the axes the inputs ``xs``
    (an array or a tuple of arrays) vary over."""
    vma = set()
    for x in xs if isinstance(xs, tuple) else (xs,):
        aval = jax.typeof(x)
        axis_type = getattr(aval, "manual_axis_type", None)  # jax 0.11; older: aval.vma
        vma.update(axis_type.varying if axis_type is not None else getattr(aval, "vma", ()))
    if not vma:
        return tree
    return jax.tree.map(lambda a: lax.pcast(a, tuple(sorted(vma)), to="varying"), tree)


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
    q_tile: int | None = None,
    kv_chunk: int | None = None,
    interpret: bool = False,
    static_loop: bool = False,
    return_lse: bool = False,
    v_head_dim: int | None = None,
):
    """Attention over a paged cache (``interfaces.AttentionKernels``; ``interpret`` is accepted
    for the common signature and ignored: this path runs on every platform). With
    ``return_lse`` it returns ``(out, lse)``, ``lse`` f32 ``[T, H]`` the log of the softmax
    denominator (sink included; ``-inf`` for rows that see nothing, ``+inf`` under a +inf sink).

    ``q_tile`` query rows share each KV gather; ``kv_chunk`` keys are processed per step
    (rounded to whole blocks). ``static_loop`` runs the KV loop over every block of the block
    table (a trip count known at trace time, which reverse-mode autodiff needs) and zeroes K as
    well as V outside the visible keys (so cotangents never meet NaN in unused cache slots);
    by default the loop covers only the blocks some row sees. ``v_head_dim``: values are the
    first ``v_head_dim`` features of ``v_pages`` (MLA: K and V pages are one latent cache) and
    the output is ``[T, H, v_head_dim]``; by default all of them.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_tables, context_lens, cu_seqlens_q = (
        x.astype(jnp.int32) for x in (block_tables, context_lens, cu_seqlens_q)
    )
    num_blocks, num_kv_heads, block_size, _ = k_pages.shape
    v_dim = v_pages.shape[-1] if v_head_dim is None else v_head_dim
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    if q_tile is None:  # one row per tile when the batch looks like decode
        q_tile = 1 if num_tokens <= 2 * context_lens.shape[0] else 16
    if kv_chunk is None:
        # Few, large steps: each gathers about 2^24 K elements (64 MiB in f32), at least 128
        # and at most 4096 keys, so a loop step's fixed cost stays small against its bytes.
        tiles = min(num_tokens, -(-num_tokens // q_tile) + context_lens.shape[0])
        per_key = tiles * num_kv_heads * head_dim
        kv_chunk = max(128, min(4096, max_blocks * block_size, (1 << 24) // per_key))
    blocks_per_step = max(1, min(max_blocks, kv_chunk // block_size))

    seq, rows, pos = _tiles(cu_seqlens_q, context_lens, num_tokens, q_tile)
    num_tiles = seq.shape[0]
    lo = jnp.zeros_like(pos) if sliding_window is None else pos - sliding_window + 1
    lo = jnp.maximum(lo, 0)

    # Half-precision q and pages stay in their dtype for the two matmuls (exact products, f32
    # accumulation); float32 and float8 (scaled) caches compute in float32.
    half = q.dtype == k_pages.dtype and q.dtype != jnp.float32
    compute = q.dtype if half else jnp.float32
    q_rows = jnp.take(q, rows, axis=0, mode="fill", fill_value=0)  # [NT, QT, H, D]
    qt = q_rows.astype(compute).reshape(num_tiles, q_tile, num_kv_heads, group, head_dim)
    slopes = None if alibi_slopes is None else alibi_slopes.reshape(num_kv_heads, group)

    # The KV loop covers the union of what the tiles see, in whole steps of blocks.
    any_row = pos >= 0
    first_block = jnp.min(jnp.where(any_row, lo // block_size, max_blocks))
    last_block = jnp.max(jnp.where(any_row, pos // block_size + 1, 0))
    num_steps = jnp.maximum(last_block - first_block + blocks_per_step - 1, 0) // blocks_per_step

    def dequant(pages, scale_vec):
        x = pages.astype(compute)  # [NT, BPS, Hkv, BS, D]
        if scale_vec is not None:
            x = x * scale_vec[None, None, :, None, None]
        x = jnp.swapaxes(x, 1, 2)  # [NT, Hkv, BPS, BS, D]
        return x.reshape(num_tiles, num_kv_heads, blocks_per_step * block_size, x.shape[-1])

    def visible_keys(blk):  # [NT, QT, K]: which keys of these blocks each row sees
        key = (blk[:, None] * block_size + jnp.arange(block_size)).reshape(-1)
        return (
            (key[None, None, :] <= pos[:, :, None])
            & (key[None, None, :] >= lo[:, :, None])
            & (blk[:, None] < max_blocks).repeat(block_size, 1).reshape(-1)
        )

    def step(i, carry):
        m, l, acc = carry  # [NT, Hkv, G, QT](,D)
        blk = first_block + i * blocks_per_step + jnp.arange(blocks_per_step)
        ids = block_tables[seq][:, jnp.minimum(blk, max_blocks - 1)]  # [NT, BPS]
        ids = jnp.clip(ids, 0, num_blocks - 1)  # ids outside the cache read a real page
        k = dequant(k_pages[ids], k_scale)  # [NT, Hkv, K, D]
        v = dequant(v_pages[ids], v_scale)[..., :v_dim]
        key = (blk[:, None] * block_size + jnp.arange(block_size)).reshape(-1)  # [K]
        visible = visible_keys(blk)  # [NT, QT, K]
        seen = jnp.any(visible, axis=1)[:, None, :, None]  # keys some row of the tile sees
        if static_loop:
            k = jnp.where(seen, k, jnp.zeros((), k.dtype))
        s = (
            jnp.einsum(
                "nqkgd,nksd->nkgqs", qt, k, precision=_HI, preferred_element_type=jnp.float32
            )
            * scale
        )
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        if slopes is not None:
            rel = (key[None, None, :] - pos[:, :, None]).astype(jnp.float32)  # [NT, QT, K]
            s = s + slopes[None, :, :, None, None] * rel[:, None, None, :, :]
        vis = visible[:, None, None, :, :]
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: avoid inf - inf
        p = jnp.exp(s - m_safe[..., None])  # masked logits give exactly 0
        alpha = jnp.exp(m - m_safe)
        # Masked keys may be NaN in the cache (unused slots): zero them, as 0 * NaN = NaN.
        v = jnp.where(seen, v, jnp.zeros((), v.dtype))
        pv = jnp.einsum(
            "nkgqs,nksd->nkgqd",
            p.astype(compute),
            v,
            precision=_HI,
            preferred_element_type=jnp.float32,
        )
        return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    shape = (num_tiles, num_kv_heads, group, q_tile)
    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (v_dim,), jnp.float32),
    )
    init = _varying_like(q, init)
    if static_loop:
        num_steps = -(-max_blocks // blocks_per_step)
    m, l, acc = lax.fori_loop(0, num_steps, step, init)
    if return_lse:  # keys only, then the sink: logaddexp keeps -inf / +inf sinks exact
        seen = l > 0
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        if sinks is not None:
            lse = jnp.logaddexp(lse, sinks.reshape(num_kv_heads, group)[None, :, :, None])
        lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(num_tiles * q_tile, num_heads)
        lse = jnp.full((num_tokens, num_heads), -jnp.inf).at[rows.reshape(-1)].set(lse, mode="drop")
    if sinks is not None:
        # Finite: a +inf sink takes the whole weight (rows exactly 0), -inf none (no sink),
        # without inf - inf.
        fmax = float(jnp.finfo(jnp.float32).max)
        sink = jnp.clip(sinks.reshape(num_kv_heads, group), -fmax, fmax)[None, :, :, None]
        m_fin = jnp.maximum(m, sink)
        l = l * jnp.exp(m - m_fin) + jnp.exp(sink - m_fin)
        acc = acc * jnp.exp(m - m_fin)[..., None]
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(num_tiles * q_tile, num_heads, v_dim)
    result = jnp.zeros((num_tokens, num_heads, v_dim), q.dtype)
    result = result.at[rows.reshape(-1)].set(out.astype(q.dtype), mode="drop")
    return (result, lse) if return_lse else result


def paged_decode(q, k_pages, v_pages, block_tables, context_lens, **kwargs):
    num_seqs = q.shape[0]
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    return paged_attention(q, k_pages, v_pages, block_tables, context_lens, cu, q_tile=1, **kwargs)


def paged_mla_attention(
    q_nope,
    q_pe,
    kv_pages,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    scale: float,
    softcap: float | None,
    kv_scale,
    interpret: bool = False,
    return_lse: bool = False,
    static_loop: bool = False,
):
    """Multi-head latent attention, absorbed form (``interfaces.MLAKernels``): one KV head whose
    keys are the whole ``[R + P]`` rows of ``kv_pages`` ``[NB, BS, R + P]`` and whose values are
    their first ``R`` features, read by :func:`paged_attention` on the same pages."""
    del interpret
    pages = kv_pages[:, None]  # [NB, 1, BS, R + P]: one "KV head"
    s = None if kv_scale is None else jnp.reshape(kv_scale, (1,)).astype(jnp.float32)
    return paged_attention(
        jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1),
        pages,
        pages,
        block_tables,
        context_lens,
        cu_seqlens_q,
        scale=scale,
        softcap=softcap,
        sliding_window=None,
        alibi_slopes=None,
        sinks=None,
        k_scale=s,
        v_scale=s,
        static_loop=static_loop,
        return_lse=return_lse,
        v_head_dim=q_nope.shape[-1],
    )


def write_mla_kv(kv_pages, c_kv, k_pe, slot_mapping, *, scale, interpret=False):
    """MLA cache write (``interfaces.MLAKernels``): row ``[c_kv[i] | k_pe[i]]`` into slot
    ``slot_mapping[i]`` as one XLA scatter; slots ``< 0`` or ``>= NB * BS`` write nothing."""
    del interpret
    nb, bs, _ = kv_pages.shape
    slot_mapping = slot_mapping.astype(jnp.int32)
    row = jnp.concatenate([c_kv.astype(jnp.float32), k_pe.astype(jnp.float32)], axis=-1)
    if kv_pages.dtype == FP8:
        row = jnp.clip(row / scale, -FP8_MAX, FP8_MAX)
    block = jnp.where(slot_mapping < 0, nb, slot_mapping // bs)  # block nb: dropped
    offset = jnp.where(slot_mapping < 0, 0, slot_mapping % bs)
    return kv_pages.at[block, offset].set(row.astype(kv_pages.dtype), mode="drop")


def check_supported(**config) -> None:
    """The xla path runs every configuration the API accepts."""
    del config


FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; stores saturate to +-448


def quantize(x, scale, dtype):
    """Value as stored in a cache of ``dtype`` (float8: ``saturate(x / scale)`` in e4m3)."""
    if dtype == FP8:
        x = x.astype(jnp.float32) / scale[:, None]
        return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)
    return x.astype(dtype)


def _write_pages(pages, x, scale, slot_mapping):
    nb, _, bs, _ = pages.shape
    # Padding slots (< 0) go to block index NB, which mode="drop" discards: a negative index
    # would wrap around instead.
    block = jnp.where(slot_mapping < 0, nb, slot_mapping // bs)
    offset = jnp.where(slot_mapping < 0, 0, slot_mapping % bs)
    return pages.at[block, :, offset].set(quantize(x, scale, pages.dtype), mode="drop")


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, k_scale, v_scale, interpret=False):
    """KV write by slot mapping (``interfaces.KVWriteKernels``) as one XLA scatter per tensor."""
    del interpret
    slot_mapping = slot_mapping.astype(jnp.int32)
    return (
        _write_pages(k_pages, k, k_scale, slot_mapping),
        _write_pages(v_pages, v, v_scale, slot_mapping),
    )
