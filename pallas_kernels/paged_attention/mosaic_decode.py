"""Paged decode for Hopper with Pallas Mosaic GPU: one query per sequence, q [S, H, D].

The kernel is ``mosaic._kernel`` in decode mode. Grid ``(Hkv, S, splits)``: a CTA takes the G
query heads that share one KV head as the 64 rows of its wgmma tiles (zero-padded; G <= 64), and
one contiguous share of the sequence's KV tiles (``splits`` from shapes, so that about two CTAs
per SM are resident). Each CTA writes its unnormalised output (f32; q.dtype at head_dim 256,
where f32 staging does not fit in shared memory) and the running max / sum of
its rows, always (an empty share writes zeros and the finite mask max); ``_merge`` combines the
shares in jnp (with the sinks: one more logit in the denominator) and zeroes rows of sequences
with no key (L == 0). Static: as ``mosaic``, plus ``num_splits``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import mosaic

_NUM_SMS = 132   # H100 SXM


def default_num_splits(num_seqs, num_kv_heads, max_context, block_kv, window=None):
  tiles = -(-max_context // block_kv)
  if window is not None:
    tiles = min(tiles, -(-window // block_kv) + 1)
  want = -(-2 * _NUM_SMS // max(num_seqs * num_kv_heads, 1))
  return max(1, min(want, tiles))


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
    "scale", "softcap", "sliding_window", "interpret", "block_sizes", "num_splits"))
def paged_decode(q, k_pages, v_pages, block_tables, context_lens, *, scale: float,
                 softcap: float | None = None, sliding_window: int | None = None,
                 alibi_slopes=None, sinks=None, k_scale=None, v_scale=None,
                 interpret: bool = False, block_sizes: mosaic.BlockSizes | None = None,
                 num_splits: int | None = None):
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
  if num_splits is None:
    num_splits = default_num_splits(num_seqs, num_kv_heads, max_blocks * block_size,
                                    probe.bs.block_kv, sliding_window)
  st = probe.__class__(**{**probe.__dict__, "num_splits": int(num_splits)})
  # The group of G heads becomes 64 wgmma rows: [S, Hkv, 64, D], rows >= G are zero.
  qp = jnp.zeros((num_seqs, num_kv_heads, mosaic.BLOCK_Q, head_dim), q.dtype)
  qp = qp.at[:, :, :grp].set(q.reshape(num_seqs, num_kv_heads, grp, head_dim))
  args = [context_lens.astype(jnp.int32), block_tables.astype(jnp.int32), qp, k_pages, v_pages]
  if alibi_slopes is not None:
    slopes = jnp.zeros((num_kv_heads, mosaic.BLOCK_Q), jnp.float32)
    args.append(slopes.at[:, :grp].set(
        alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, grp)))
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
