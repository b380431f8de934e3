"""Paged-KV-cache cases: a host-side builder with its float64 oracle, and a device-side one.

Layout (``jax_paged_attn.cache``): pages ``[NB, Hkv, BS, D]``; token ``t`` of sequence ``i``
lives in block ``block_tables[i, t // BS]`` at offset ``t % BS``, i.e. slot
``block * BS + offset``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_attn import AttentionMetadata, KVCache
from jax_paged_attn.testing import oracle

FP8 = jnp.float8_e4m3fn


def stored_values(x, dtype, scale=None) -> np.ndarray:
    """float64 values a cache of ``dtype`` holds after writing ``x`` (float8: per-head scale)."""
    return oracle.dequantized(x, dtype, scale)


def nan_cache(
    num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, scale=None, v_scale=None
) -> KVCache:
    """A cache from the API whose every slot holds NaN until written (float8: per-KV-head
    ``scale`` for K, and for V unless ``v_scale`` is given)."""
    kw = {}
    if jnp.dtype(kv_dtype) == FP8:
        kw = dict(k_scale=scale, v_scale=scale if v_scale is None else v_scale)
    cache = KVCache.init(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, **kw)
    nan = jnp.full(cache.k.shape, jnp.nan, cache.dtype)
    return dataclasses.replace(cache, k=nan, v=nan + 0)


@dataclasses.dataclass
class Case:
    """A batch over a cache, with the float64 values the oracle needs."""

    q: jax.Array  # [T, H, D]; rows past cu_seqlens_q[S] hold NaN
    cache: KVCache
    meta: AttentionMetadata
    k_seqs: list  # float64 [L_i, Hkv, D]: what the cache holds, dequantised
    v_seqs: list
    context_lens: np.ndarray
    cu_seqlens_q: np.ndarray
    new_k: np.ndarray  # the step's new tokens [T, Hkv, D] (float32), for layer tests
    new_v: np.ndarray

    def reference(self, **opts) -> np.ndarray:
        """float64 oracle output ``[T, H, D]`` for attention options ``opts`` (``scale``,
        ``softcap``, ``sliding_window``, ``alibi_slopes``, ``sinks``)."""
        return oracle.attention(
            self.q.astype(jnp.float32),
            self.k_seqs,
            self.v_seqs,
            self.context_lens,
            self.cu_seqlens_q,
            **opts,
        )


def _place(cache: KVCache, k, v, slots) -> KVCache:
    """``write_kv`` with the oracle's rounding: token ``i`` lands in block ``slots[i] // BS`` at
    offset ``slots[i] % BS`` as ``oracle.stored`` (exact IEEE division for float8), so the cache
    holds exactly what the oracle reads whatever the library's own write rounds to (XLA turns a
    division by a broadcast scale into a multiply by its reciprocal)."""
    block, offset = slots // cache.block_size, slots % cache.block_size
    pages = []
    for old, x, scale in ((cache.k, k, cache.k_scale), (cache.v, v, cache.v_scale)):
        new = oracle.stored(x, cache.dtype, None if scale is None else np.asarray(scale))
        pages.append(old.at[block, :, offset].set(jnp.asarray(new)))
    return dataclasses.replace(cache, k=pages[0], v=pages[1])


def build_case(
    rng: np.random.Generator,
    seqs,
    *,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    block_size=16,
    dtype=jnp.float32,
    kv_dtype=None,
    pad_rows=0,
    spare_blocks=3,
    write_new_only=False,
    num_blocks=None,
    max_blocks=None,
    junk_tables=False,
) -> Case:
    """A batch of sequences ``[(q_len, kv_len), ...]`` over a cache from the API.

    Blocks are a random permutation of the cache; block-table entries past each context and
    every unused page and slot hold NaN pages, so any read out of range shows up as NaN.
    Query rows past the last sequence (``pad_rows``) are NaN too. With ``write_new_only`` the
    cache holds only the context *before* this step (for the layer, which writes the rest).
    ``num_blocks`` and ``max_blocks`` fix the cache's and the block table's sizes (default:
    what the batch needs plus ``spare_blocks`` NaN pages, and one entry more than the longest
    sequence needs), e.g. to keep shapes equal across cases. With ``junk_tables`` the table
    entries past each sequence's pages hold random ids, most outside ``[0, num_blocks)`` and
    some negative (the metadata contract: those entries are never read and may hold anything).
    """
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    num_seqs = len(seqs)
    nblk = [math.ceil(kv / block_size) for _, kv in seqs]  # pages per sequence
    need_blocks = max(nblk + [1]) + 1
    if max_blocks is None:
        max_blocks = need_blocks
    if max_blocks < max(nblk + [1]):
        raise ValueError(f"max_blocks={max_blocks} < {max(nblk)} blocks of the longest sequence")
    used_blocks = sum(nblk)
    if num_blocks is None:
        num_blocks = used_blocks + spare_blocks
    if num_blocks <= used_blocks:
        raise ValueError(f"num_blocks={num_blocks} leaves no spare page ({used_blocks} used)")
    # Sequence i takes the next nblk[i] pages of a random permutation; the rest stay NaN and
    # every table entry past a sequence's pages points at one of them.
    perm = rng.permutation(num_blocks)
    used, spare = perm[:used_blocks], perm[used_blocks:]
    if junk_tables:
        tables = rng.integers(-5, 10 * num_blocks + 10, (num_seqs, max_blocks)).astype(np.int32)
    else:
        tables = rng.choice(spare, size=(num_seqs, max_blocks)).astype(np.int32)
    offset = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = used[offset : offset + n]
        offset += n
    k_scale = v_scale = None
    if jnp.dtype(kv_dtype) == FP8:  # small enough that the largest draws saturate at +-448
        k_scale, v_scale = rng.uniform(0.004, 0.02, size=(2, num_kv_heads)).astype(np.float32)
    cache = nan_cache(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, k_scale, v_scale)

    q_lens = np.array([n for n, _ in seqs], np.int32)
    context_lens = np.array([kv for _, kv in seqs], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(cu[-1]) + pad_rows
    k_seqs, v_seqs, slots, ks, vs = [], [], [], [], []
    new_k = np.zeros((num_tokens, num_kv_heads, head_dim), np.float32)
    new_v = np.zeros_like(new_k)
    step_slots = np.full((num_tokens,), -1, np.int32)
    for i, (n, ctx) in enumerate(seqs):
        k = rng.standard_normal((ctx, num_kv_heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((ctx, num_kv_heads, head_dim)).astype(np.float32)
        pos = np.arange(ctx)
        # token t -> block tables[i, t // BS], offset t % BS
        seq_slots = tables[i, pos // block_size] * block_size + pos % block_size
        k_seqs.append(stored_values(k, kv_dtype, k_scale))
        v_seqs.append(stored_values(v, kv_dtype, v_scale))
        # This step's tokens are the last min(n, ctx) of the context (rows with p < 0 have none).
        first_new = max(ctx - n, 0)
        keep = slice(0, first_new) if write_new_only else slice(0, ctx)
        slots.append(seq_slots[keep])
        ks.append(k[keep])
        vs.append(v[keep])
        rows = slice(cu[i] + (n - (ctx - first_new)), cu[i + 1])
        new_k[rows], new_v[rows] = k[first_new:], v[first_new:]
        step_slots[rows] = seq_slots[first_new:]
    if slots and sum(len(s) for s in slots):
        cache = _place(cache, np.concatenate(ks), np.concatenate(vs), np.concatenate(slots))
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
    q[int(cu[-1]) :] = np.nan
    meta = AttentionMetadata(
        jnp.asarray(tables), jnp.asarray(context_lens), jnp.asarray(cu), jnp.asarray(step_slots)
    )
    return Case(jnp.asarray(q, dtype), cache, meta, k_seqs, v_seqs, context_lens, cu, new_k, new_v)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "poison"))
def _random_pages(key, fill, scale, *, shape, dtype, poison):
    """Random pages ``shape`` in ``dtype`` (float8: ``x / scale[h]``, saturated); with
    ``poison`` slot ``o`` of page ``b`` is NaN unless ``o < fill[b]``. One fused pass."""
    dtype = jnp.dtype(dtype)
    x = jax.random.normal(key, shape, jnp.bfloat16 if dtype == FP8 else dtype)
    if dtype == FP8:
        s = scale[None, :, None, None]  # per KV head
        x = jnp.clip(x.astype(jnp.float32) / s, -oracle.FP8_MAX, oracle.FP8_MAX).astype(dtype)
    if poison:
        live = jnp.arange(shape[2])[None, None, :, None] < fill[:, None, None, None]
        x = jnp.where(live, x, jnp.array(jnp.nan, dtype))
    return x


def random_paged_kv(
    key,
    context_lens,
    *,
    num_kv_heads,
    head_dim,
    block_size,
    dtype=jnp.bfloat16,
    num_blocks=None,
    permute=True,
    poison_unused=True,
    max_blocks=None,
):
    """A cache of random K/V for sequences of ``context_lens`` tokens, built on the device.

    Returns ``(cache, block_tables i32[S, MB], context_lens i32[S])``. K and V are standard
    normal draws of ``jax.random`` on the default device (no host round trip: a cache of a few
    GB takes one fused pass). Sequence ``i`` owns ``ceil(L_i / BS)`` pages, taken in order from a
    random permutation of the blocks (``permute``) or from ``0, 1, ...``. Table entries past a
    sequence's pages point at a spare page. With ``poison_unused`` every slot no sequence
    holds (the tail of a last page, every spare page) is NaN, so a kernel that reads one shows
    it. float8_e4m3fn caches store ``x / scale`` with per-KV-head scales in ``[1/64, 1/32]``
    (|x| up to 7 stays below float8's 448).

    ``num_blocks`` defaults to the pages the sequences need plus one spare page; ``max_blocks``
    (table width) to the pages of the longest sequence.

    >>> import jax, jax.numpy as jnp
    >>> cache, tables, lens = random_paged_kv(jax.random.key(0), [40, 0, 16], num_kv_heads=2,
    ...                                       head_dim=64, block_size=16)
    >>> cache.k.shape, tables.shape  # 3 + 0 + 1 pages and a spare one; 3 pages at most
    ((5, 2, 16, 64), (3, 3))
    >>> bool(jnp.isnan(cache.k[tables[0, 2], :, 8:]).all())  # tokens 40..47 do not exist
    True
    """
    lens = np.asarray(context_lens, np.int64).reshape(-1)
    if lens.size == 0 or lens.min() < 0:
        raise ValueError(f"context_lens must be a non-empty list of lengths >= 0, got {lens}")
    pages = -(-lens // block_size)  # pages per sequence
    used = int(pages.sum())
    widest = max(int(pages.max()), 1)
    max_blocks = widest if max_blocks is None else int(max_blocks)
    if max_blocks < widest:
        raise ValueError(f"max_blocks={max_blocks} < {widest} pages of the longest sequence")
    num_blocks = used + 1 if num_blocks is None else int(num_blocks)
    if num_blocks < max(used, 1):
        raise ValueError(f"num_blocks={num_blocks} < {used} pages the sequences need")
    dtype = jnp.dtype(dtype)
    k_order, k_k, k_v, k_scale = jax.random.split(key, 4)

    # order[n] is the block of the n-th page handed out; sequence i gets pages
    # first[i] .. first[i] + pages[i] - 1 of that order (first = exclusive cumulative sum).
    if permute:
        order = jax.random.permutation(k_order, num_blocks).astype(jnp.int32)
    else:
        order = jnp.arange(num_blocks, dtype=jnp.int32)
    first = np.cumsum(pages) - pages
    j = np.arange(max_blocks)
    handed = first[:, None] + j[None, :]  # [S, MB]: index into order
    spare = used % num_blocks  # order[used] is a page no sequence holds (when one is left)
    handed = np.where(j[None, :] < pages[:, None], handed, spare)
    block_tables = order[jnp.asarray(handed, jnp.int32)]

    # Tokens in the n-th page handed out: page j of sequence i holds min(BS, L_i - j * BS).
    owner = np.repeat(np.arange(lens.size), pages)
    page_in_seq = np.arange(used) - first[owner]
    tokens = np.minimum(block_size, lens[owner] - page_in_seq * block_size)
    fill = jnp.zeros((num_blocks,), jnp.int32).at[order[:used]].set(jnp.asarray(tokens, jnp.int32))

    scales = (None, None)
    if dtype == FP8:
        scales = tuple(
            jax.random.uniform(s, (num_kv_heads,), jnp.float32, 1 / 64, 1 / 32)
            for s in jax.random.split(k_scale)
        )
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k, v = (
        _random_pages(kk, fill, s, shape=shape, dtype=dtype.name, poison=poison_unused)
        for kk, s in ((k_k, scales[0]), (k_v, scales[1]))
    )
    cache = KVCache(k, v, *scales)
    return cache, block_tables, jnp.asarray(lens, jnp.int32)
