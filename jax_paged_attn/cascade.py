"""Shared-prefix (cascade) attention: a prefix common to many requests is read once.

Two levels, as FlashInfer's cascade: ``shared`` (the prefixes, each with the contiguous query
rows of the requests that share it) and ``meta`` (each request's own blocks after the prefix).
Every row of a group sees every key of its group's prefix (non-causal: the prefix lies wholly
before the row); within its request the contract's causal rule holds. The two partial results
are attention *states* ``(out, lse)`` over disjoint key sets, combined exactly by
:func:`jax_paged_attn.merge_attention_states`.

How the prefix is read once: the query rows of a group are folded into the GQA head group of a
single decode query. Under the contract, query head ``h`` reads KV head ``h // (H' / Hkv)``; so
``c`` rows of ``q`` ``[c, H, D]`` reordered to ``[Hkv, c, G, D]`` (``G = H / Hkv``) and seen as
one query with ``H' = Hkv * c * G`` heads keep every head on its own KV head. That query sits at
position ``L - 1`` of a "sequence" whose context is the prefix, so it sees every prefix key: a
non-causal pass over the prefix, computed by the unchanged decode kernels of every backend
(:func:`jax_paged_attn.paged_decode`), which load each KV tile once per (query, KV head) and
multiply it with the whole head group. ``c`` (``fold_rows``) defaults to ``64 // G``: ``c * G``
query heads per KV head fill the 64-row tile of the Mosaic wgmma and of the Triton decode dot,
so a group of ``n`` rows reads its prefix ``ceil(n / c)`` times instead of ``n`` times (64
decode requests of Llama-3-8B, ``G = 4``: 4 reads instead of 64) and runs its dots on full
tensor-core tiles. Larger ``fold_rows`` read the prefix fewer times; the Mosaic decode kernel
takes at most 64 heads per KV head (``auto`` then moves on to Triton).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_paged_attn import _checks
from jax_paged_attn.attention import _options, _validated_q, paged_attention, paged_decode
from jax_paged_attn.cache import KVCache, validated_cache
from jax_paged_attn.metadata import AttentionMetadata, validated
from jax_paged_attn.states import merge_attention_states

__all__ = ["add_sink", "cascade_attention", "shared_prefix"]

_TILE_ROWS = 64  # rows of the decode kernels' q tile: the Mosaic wgmma M, the Triton dot M


def shared_prefix(block_table, prefix_len, num_rows) -> AttentionMetadata:
    """The ``shared`` level of :func:`cascade_attention` for one prefix shared by query rows
    ``0 : num_rows``: block table ``[1, MBp]``, ``context_lens = [prefix_len]``,
    ``cu_seqlens_q = [0, num_rows]``.

    >>> import jax.numpy as jnp
    >>> shared = shared_prefix(jnp.array([7, 2, 5], jnp.int32), 40, 8)  # 40 tokens: 3 blocks of 16
    >>> shared.block_tables.shape, shared.context_lens.tolist(), shared.cu_seqlens_q.tolist()
    ((1, 3), [40], [0, 8])
    """
    table = _checks.int_array("block_table", block_table, ndim=1)
    lens = jnp.asarray(prefix_len, jnp.int32).reshape(1)
    cu = jnp.stack([jnp.int32(0), jnp.asarray(num_rows, jnp.int32)])
    return AttentionMetadata(table[None], lens, cu)


def add_sink(out, lse, sinks, rows=None):
    """Adds the sink logit ``sinks[h]`` to the denominator of a merged state: returns
    ``(out * exp(lse - lse'), lse')`` with ``lse' = logaddexp(lse, sinks[h])``, exactly what the
    kernels compute with the sink in the softmax (``+inf``: the row is 0, ``lse' = +inf``;
    ``-inf``: no change). ``rows`` (bool ``[T]``, optional) limits it to the rows of a sequence;
    the others keep their state. Use it once, after the last merge, so the sink counts once.

    >>> import jax.numpy as jnp
    >>> out, lse = add_sink(jnp.ones((1, 1, 2)), jnp.log(jnp.array([[3.0]])), jnp.log(jnp.ones(1)))
    >>> out.tolist(), round(float(jnp.exp(lse[0, 0])), 4)   # sink weight 1 of 4
    ([[[0.75, 0.75]]], 4.0)
    """
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :], lse.shape)
    if rows is not None:
        sink = jnp.where(rows[:, None], sink, -jnp.inf)
    new = jnp.logaddexp(lse, sink)
    # lse is never +inf (finite logits): with a +inf sink the weight is exp(-inf) = 0.
    w = jnp.where(new > -jnp.inf, jnp.exp(lse - jnp.where(new > -jnp.inf, new, 0.0)), 0.0)
    w = jnp.where(lse > -jnp.inf, w, 0.0)
    scaled = jnp.where(w[..., None] > 0, out.astype(jnp.float32) * w[..., None], 0.0)
    return scaled.astype(out.dtype), new


def _validated_shared(shared) -> AttentionMetadata:
    if not isinstance(shared, AttentionMetadata):
        raise ValueError(
            f"shared must be an AttentionMetadata (the prefixes: block_tables [G, MBp], "
            f"context_lens [G], cu_seqlens_q [G+1] over q's rows), got {type(shared).__name__}"
        )
    tables = _checks.int_array("shared.block_tables", shared.block_tables, ndim=2)
    groups = tables.shape[0]
    lens = _checks.int_array("shared.context_lens", shared.context_lens, ndim=1, shape=(groups,))
    cu = _checks.int_array("shared.cu_seqlens_q", shared.cu_seqlens_q, ndim=1, shape=(groups + 1,))
    return AttentionMetadata(tables, lens, cu)


def _segment(cu, rows):
    """For each row index in ``rows``: the segment ``i`` with ``cu[i] <= row < cu[i+1]``
    (clamped to a valid index) and whether there is one."""
    num = cu.shape[0] - 1
    seg = jnp.searchsorted(cu[1:], rows, side="right", method="compare_all").astype(jnp.int32)
    inside = (seg < num) & (rows >= cu[0])
    return jnp.minimum(seg, num - 1), inside


def cascade_attention(
    q,
    cache: KVCache,
    shared: AttentionMetadata,
    meta: AttentionMetadata,
    *,
    scale=None,
    softcap=None,
    sliding_window=None,
    alibi_slopes=None,
    sinks=None,
    fold_rows: int | None = None,
    backend: str = "auto",
    interpret: bool = False,
    return_lse: bool = False,
):
    """Attention of ``q`` ``[T, H, D]`` over shared prefixes plus each request's own blocks.

    ``shared``: an :class:`AttentionMetadata` of the ``Gp`` prefixes: prefix ``g`` is
    ``shared.context_lens[g]`` tokens in blocks ``shared.block_tables[g]``, and its rows are
    ``shared.cu_seqlens_q[g] : shared.cu_seqlens_q[g+1]`` of ``q`` (each group's rows
    contiguous; :func:`shared_prefix` builds the one-prefix case). ``meta``: the requests'
    suffix metadata over the same rows: ``meta.block_tables[i]`` the blocks after the prefix,
    ``meta.context_lens[i]`` the suffix tokens (this step's included), ``meta.cu_seqlens_q``
    the requests' rows. A row of request ``i`` at suffix position ``p = L_i - n_i + j`` sees
    every key of its group's prefix and suffix keys ``0..p``: with ``P`` the prefix length,
    exactly :func:`paged_attention` over the full table (prefix blocks, then the suffix blocks;
    ``P`` a whole number of blocks) with context ``P + L_i``, for rows with ``p >= -1`` (a chunk
    may start at the prefix's last token, not earlier). Rows outside every request are 0
    (``lse = -inf``); a row of a request outside every group sees its suffix only.

    ``scale``, ``softcap``, ``alibi_slopes`` (positions are the rows' full positions
    ``P + p``: the prefix state's ``lse`` is corrected, its ``out`` needs none), ``sinks``
    (added once, after the merge, to the rows of requests), ``backend``, ``interpret`` mean
    what they mean for :func:`paged_attention`; ``sliding_window`` is rejected (each row would
    see a different part of the prefix). ``fold_rows`` (static int > 0): query rows folded into
    one prefix pass (default ``max(1, 64 // G)``; see the module docstring). ``return_lse=True``
    returns ``(out, lse)``. Both levels' kernels take any backend; use it under ``jax.jit``.

    >>> import jax, jax.numpy as jnp
    >>> from jax_paged_attn import AttentionMetadata, paged_attention
    >>> from jax_paged_attn.testing import random_paged_kv
    >>> # a 32-token prefix (blocks of 16) and 3 requests' suffixes of 5, 9 and 16 tokens
    >>> cache, tables, lens = random_paged_kv(jax.random.key(0), [32, 5, 9, 16], num_kv_heads=2,
    ...                                       head_dim=64, block_size=16, dtype=jnp.float32)
    >>> q = jax.random.normal(jax.random.key(1), (3, 8, 64))      # one decode row per request
    >>> shared = shared_prefix(tables[0], 32, num_rows=3)
    >>> suffix = AttentionMetadata.decode(tables[1:], lens[1:])
    >>> out = cascade_attention(q, cache, shared, suffix, backend="xla")
    >>> full = AttentionMetadata.decode(                           # prefix blocks + suffix blocks
    ...     jnp.concatenate([jnp.tile(tables[:1, :2], (3, 1)), tables[1:]], axis=1), 32 + lens[1:])
    >>> bool(jnp.allclose(out, paged_attention(q, cache, full, backend="xla"), atol=1e-5))
    True
    """
    cache = validated_cache(cache)
    q = _validated_q(q, cache)
    shared = _validated_shared(shared)
    meta = validated(meta)
    opts = _options(q.shape[1], q.shape[2], scale, softcap, sliding_window, alibi_slopes, sinks)
    if opts.sliding_window is not None:
        raise ValueError(
            f"sliding_window ({opts.sliding_window}) is not supported by cascade_attention: "
            "each row would see a different part of the shared prefix; use paged_attention "
            "over the full block tables"
        )
    group = q.shape[1] // cache.num_kv_heads
    if fold_rows is None:
        fold_rows = max(1, _TILE_ROWS // group)
    fold_rows = _checks.static_number("fold_rows", fold_rows, integer=True)
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    _checks.one_of("backend", backend, ("auto", "xla", "triton", "mosaic", "metal"))
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}")
    if q.shape[0] == 0 or meta.num_seqs == 0:  # no rows, or no request a row could be in
        out = jnp.zeros(q.shape, q.dtype)
        return (out, jnp.full(q.shape[:2], -jnp.inf, jnp.float32)) if return_lse else out
    out, lse = _cascade(
        q,
        cache,
        shared,
        meta,
        opts.alibi_slopes,
        opts.sinks,
        scale=opts.scale,
        softcap=opts.softcap,
        fold_rows=min(fold_rows, q.shape[0]),
        backend=backend,
        interpret=interpret,
    )
    return (out, lse) if return_lse else out


@functools.partial(
    jax.jit, static_argnames=("scale", "softcap", "fold_rows", "backend", "interpret")
)
def _cascade(
    q, cache, shared, meta, alibi, sinks, *, scale, softcap, fold_rows, backend, interpret
):
    num_tokens = q.shape[0]
    kw = dict(scale=scale, softcap=softcap, backend=backend, interpret=interpret)
    rows = jnp.arange(num_tokens, dtype=jnp.int32)

    # The requests' own blocks: causal, through the usual entry point.
    suffix_out, suffix_lse = paged_attention(
        q, cache, meta, alibi_slopes=alibi, return_lse=True, **kw
    )
    req, in_req = _segment(meta.cu_seqlens_q, rows)
    n_req = meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]
    pos = meta.context_lens[req] - n_req[req] + (rows - meta.cu_seqlens_q[req])  # suffix p

    num_groups = shared.block_tables.shape[0]
    if num_groups and shared.block_tables.shape[1]:
        prefix_out, prefix_lse = _prefix_states(q, cache, shared, alibi, fold_rows, kw)
        if alibi is not None:  # the folded query sat at P - 1; the row sits at P + pos
            prefix_lse = prefix_lse - alibi[None, :] * (pos + 1).astype(jnp.float32)[:, None]
        prefix_lse = jnp.where(in_req[:, None], prefix_lse, -jnp.inf)
        out, lse = merge_attention_states(suffix_out, suffix_lse, prefix_out, prefix_lse)
    else:
        out, lse = suffix_out, suffix_lse
    if sinks is not None:
        out, lse = add_sink(out, lse, sinks, in_req)
    return out, lse


def _prefix_states(q, cache, shared, alibi, c, kw):
    """States ``(out [T, H, D], lse [T, H])`` of every row over its group's whole prefix.

    The rows of group ``g`` form ``ceil(n_g / c)`` chunks of ``c`` rows; chunk ``s`` becomes
    decode query ``s`` with ``Hkv * c * G`` heads over the prefix's blocks. Chunks are numbered
    on the device from a prefix sum (no host sync, no recompile for new groups), under the
    static bound ``min(T, (T + Gp * (c - 1)) // c)``.
    """
    num_tokens, num_heads, head_dim = q.shape
    hkv = cache.num_kv_heads
    grp = num_heads // hkv
    cu, lens, tables = shared.cu_seqlens_q, shared.context_lens, shared.block_tables
    num_groups = lens.shape[0]
    n_rows = jnp.maximum(cu[1:] - cu[:-1], 0)
    chunks = (n_rows + c - 1) // c  # [Gp]
    chunk_end = jnp.cumsum(chunks)
    num_chunks = max(1, min(num_tokens, (num_tokens + num_groups * (c - 1)) // c))

    s = jnp.arange(num_chunks, dtype=jnp.int32)
    g = jnp.searchsorted(chunk_end, s, side="right", method="compare_all").astype(jnp.int32)
    live = g < num_groups
    g = jnp.minimum(g, num_groups - 1)
    first = (s - (chunk_end[g] - chunks[g])) * c  # first row of chunk s within its group
    j = first[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]  # [NS, c]
    ok = live[:, None] & (j < n_rows[g][:, None])
    src = jnp.clip(cu[g][:, None] + j, 0, num_tokens - 1)
    qc = jnp.where(ok[..., None, None], q[src], jnp.zeros((), q.dtype))  # [NS, c, H, D]
    # [NS, c, Hkv, G, D] -> [NS, Hkv, c, G, D]: head (kv, r, gg) reads KV head kv.
    qf = qc.reshape(num_chunks, c, hkv, grp, head_dim).transpose(0, 2, 1, 3, 4)
    qf = qf.reshape(num_chunks, hkv * c * grp, head_dim)
    slopes = None
    if alibi is not None:
        slopes = jnp.broadcast_to(alibi.reshape(hkv, 1, grp), (hkv, c, grp)).reshape(-1)
    out, lse = paged_decode(
        qf,
        cache,
        tables[g],
        jnp.where(live, lens[g], 0),
        alibi_slopes=slopes,
        return_lse=True,
        **kw,
    )
    out = out.reshape(num_chunks, hkv, c, grp, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_chunks * c, num_heads, head_dim)
    lse = lse.reshape(num_chunks, hkv, c, grp).transpose(0, 2, 1, 3).reshape(-1, num_heads)

    # Row t of group g is row (t - cu[g]) % c of chunk chunk_end[g] - chunks[g] + (t - cu[g]) // c.
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    gt, in_group = _segment(cu, rows)
    k = rows - cu[gt]
    flat = (chunk_end[gt] - chunks[gt] + k // c) * c + k % c
    in_group = in_group & (flat < num_chunks * c)
    flat = jnp.clip(flat, 0, num_chunks * c - 1)
    out = jnp.where(in_group[:, None, None], out[flat], jnp.zeros((), out.dtype))
    lse = jnp.where(in_group[:, None], lse[flat], -jnp.inf)
    return out, lse
