"""Paged decode for Hopper with Pallas Mosaic GPU: one query per sequence, q [S, H, D].

The kernel is ``mosaic._kernel`` in decode mode. Grid ``(Hkv, S, splits)``: a CTA takes the G
query heads that share one KV head as the 64 rows of its wgmma tiles (zero-padded; G <= 64), and
one balanced contiguous share of the sequence's KV tiles (``splits`` from shapes:
``default_num_splits`` minimises the wave-quantised time with one resident CTA per SM; shares of
>= 8192 keys at head_dim 128 use 128-key tiles, 2 stages). With one split and no sinks the kernel
normalises its rows and writes q.dtype directly (no merge). Otherwise each CTA writes its unnormalised output (f32; q.dtype at head_dim 256,
where f32 staging does not fit in shared memory) and the running max / sum of
its rows, always (an empty share writes zeros and the finite mask max); ``_merge`` combines the
shares in jnp (with the sinks: one more logit in the denominator) and zeroes rows of sequences
with no key (L == 0). Static: as ``mosaic``, plus ``num_splits``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import mosaic

_NUM_SMS = 132   # H100 SXM


_CTA_OVERHEAD_TILES = 2   # pipeline fill + partial store of one CTA, in KV tiles (H100)
_MAX_SPLITS = 64
_LONG_SHARE = 8192        # keys per CTA from which decode uses 128-key tiles (head_dim 128)


def default_num_splits(num_seqs, num_kv_heads, max_context, block_kv, window=None,
                       ctas_per_sm=1):
  """Splits that minimise the wave-quantised time: waves x (tiles per CTA + overhead).

  One decode CTA per SM is resident (its K/V ring takes most of shared memory), so a grid of
  Hkv x S x P CTAs runs in cdiv(Hkv S P, 132) waves of cdiv(tiles, P) tiles each; a wave that
  is only partly full still takes a full CTA's time (each SM streams at ~1/132 of HBM).
  """
  tiles = -(-max_context // block_kv)
  if window is not None:
    tiles = min(tiles, -(-window // block_kv) + 1)
  tiles = max(tiles, 1)
  pairs = max(num_seqs * num_kv_heads, 1)
  slots = _NUM_SMS * ctas_per_sm
  best = None
  for p in range(1, min(tiles, _MAX_SPLITS) + 1):
    waves = -(-pairs * p // slots)
    cost = waves * (-(-tiles // p) + _CTA_OVERHEAD_TILES) + (p > 1) * _CTA_OVERHEAD_TILES
    if best is None or cost < best[0]:
      best = (cost, p)
  return best[1]


def _merge(o, ml, context_lens, sinks, num_heads, dtype):
  """Splits -> one output: o f32[S, Hkv, P, G, D], ml f32[S, Hkv, P, 2, 64] (log2 domain)."""
  s, hkv, _, grp, d = o.shape
  m, l = ml[:, :, :, 0, :grp], ml[:, :, :, 1, :grp]            # [S, Hkv, P, G]
  m_all = m.max(axis=2)                                          # [S, Hkv, G]
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(1, hkv, grp) * mosaic._LOG2E
    m_all = jnp.maximum(m_all, sink)
  w = jnp.exp2(m - m_all[:, :, None])
  num = jnp.einsum("shpg,shpgd->shgd", w, o.astype(jnp.float32))
  den = (w * l).sum(axis=2)
  if sinks is not None:
    den = den + jnp.exp2(sink - m_all)
  seen = (context_lens > 0)[:, None, None] & (den > 0)
  out = jnp.where(seen[..., None], num / jnp.where(seen, den, 1.0)[..., None], 0.0)
  return out.reshape(s, num_heads, d).astype(dtype)


@functools.partial(jax.jit, static_argnames=(
    "scale", "softcap", "sliding_window", "interpret", "block_sizes", "num_splits", "fuse"))
def paged_decode(q, k_pages, v_pages, block_tables, context_lens, *, scale: float,
                 softcap: float | None = None, sliding_window: int | None = None,
                 alibi_slopes=None, sinks=None, k_scale=None, v_scale=None,
                 interpret: bool = False, block_sizes: mosaic.BlockSizes | None = None,
                 num_splits: int | None = None, fuse: bool = True):
  """q [S, H, D] (query i at position context_lens[i] - 1) -> [S, H, D] in q.dtype."""
  if k_scale is not None or v_scale is not None:
    raise NotImplementedError('mosaic paged decode: float8 KV caches (k_scale/v_scale) are '
                              'not covered; use backend="triton" or backend="xla"')
  num_seqs, num_heads, head_dim = q.shape
  _, num_kv_heads, block_size, _ = k_pages.shape
  grp = num_heads // num_kv_heads
  max_blocks = block_tables.shape[1]
  probe = mosaic.make_static(
      decode=True, q_dtype=q.dtype, num_heads=num_heads, k_pages=k_pages,
      max_blocks=max_blocks, scale=scale, softcap=softcap, sliding_window=sliding_window,
      alibi_slopes=alibi_slopes, sinks=sinks, num_splits=1, interpret=interpret,
      block_sizes=block_sizes)
  max_context = max_blocks * block_size
  if num_splits is None:
    num_splits = default_num_splits(num_seqs, num_kv_heads, max_context,
                                    probe.bs.block_kv, sliding_window)
    if block_sizes is None and head_dim == 128 and max_context // num_splits >= _LONG_SHARE:
      # Long shares stream better as 128-key tiles, 2 stages (H100: 8 x 32768 +7% over 64 x 4).
      probe = dataclasses.replace(probe, bs=mosaic.BlockSizes(128, 2, 1))
      num_splits = default_num_splits(num_seqs, num_kv_heads, max_context, 128, sliding_window)
  fused = fuse and num_splits == 1 and sinks is None   # normalise in the kernel, no merge
  st = probe.__class__(**{**probe.__dict__, "num_splits": int(num_splits), "fused": fused})
  # The group of G heads becomes 64 wgmma rows: [S, Hkv, 64, D], rows >= G are zero.
  qp = jnp.zeros((num_seqs, num_kv_heads, mosaic.BLOCK_Q, head_dim), q.dtype)
  qp = qp.at[:, :, :grp].set(q.reshape(num_seqs, num_kv_heads, grp, head_dim))
  args = [context_lens.astype(jnp.int32), block_tables.astype(jnp.int32), qp, k_pages, v_pages]
  if alibi_slopes is not None:
    slopes = jnp.zeros((num_kv_heads, mosaic.BLOCK_Q), jnp.float32)
    args.append(slopes.at[:, :grp].set(
        alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, grp)))
  if fused:
    call = mosaic.build_call(
        st, jax.ShapeDtypeStruct((num_seqs, num_kv_heads, grp, head_dim), q.dtype),
        (num_kv_heads, num_seqs, 1), ("g", "seq", "split"), q.dtype)
    return call(*args).reshape(num_seqs, num_heads, head_dim)
  out_type = (
      jax.ShapeDtypeStruct((num_seqs, num_kv_heads, num_splits, grp, head_dim),
                           mosaic.partial_dtype(head_dim, q.dtype)),
      jax.ShapeDtypeStruct((num_seqs, num_kv_heads, num_splits, 2, mosaic.BLOCK_Q),
                           jnp.float32),
  )
  call = mosaic.build_call(st, out_type, (num_kv_heads, num_seqs, num_splits),
                           ("g", "seq", "split"), q.dtype)
  o, ml = call(*args)
  return _merge(o, ml, context_lens, sinks, num_heads, q.dtype)
