"""Context-parallel paged decode with ``jax.shard_map``: each device holds part of every
sequence's KV and the devices' attention states are merged.

Layout over one mesh axis of ``n`` devices (:func:`context_parallel_specs`):

- ``cache``: pages ``[n * NBl, Hkv, BS, D]`` sharded ``P(axis)`` on the block axis: device ``d``
  holds blocks ``d * NBl : (d + 1) * NBl``, its own pool (float8 scales are replicated);
- ``block_tables`` ``i32[n, S, MBl]`` and ``context_lens`` ``i32[n, S]``, sharded ``P(axis)``:
  row ``d`` is device ``d``'s share of each sequence, its block ids *local* to its pool
  (``0 .. NBl - 1``) and ``context_lens[d, i]`` tokens of sequence ``i`` (0: it holds none);
- sequence ``i`` is the concatenation of the devices' shares in device order (device 0's tokens
  first), ``L_i = sum_d context_lens[d, i]`` tokens; the order only matters for ALiBi;
- ``q`` ``[S, H, D]`` is replicated, and so are ``out`` (and ``lse``).

Each device runs :func:`jax_paged_attn.paged_decode` on its share with ``return_lse=True`` (the
unchanged single-device kernels), then :func:`merge_states_across` combines the states with one
``pmax`` of ``lse`` and one ``psum`` of the rescaled outputs and denominators: every device ends
with the full result, the meaning of ``paged_decode`` over the whole context. A device that holds
nothing of a sequence has ``lse = -inf`` there and contributes nothing. Sinks are added once,
after the merge; ALiBi biases are relative to each device's share and corrected in its ``lse``
(``slope * (offset_d + L_d - L)``). :func:`split_context` turns a single-device batch into this
layout (each sequence's blocks in ``n`` contiguous runs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_paged_attn import _checks
from jax_paged_attn.attention import _options, _validated_q, paged_decode
from jax_paged_attn.cache import KVCache, validated_cache
from jax_paged_attn.cascade import add_sink

__all__ = [
    "ContextParallelSpecs",
    "context_parallel_decode",
    "context_parallel_specs",
    "merge_states_across",
    "split_context",
]


@dataclasses.dataclass(frozen=True)
class ContextParallelSpecs:
    """PartitionSpecs of context-parallel decode (for ``jax.device_put`` or your own
    ``shard_map``).

    Attributes:
      q: ``[S, H, D]`` queries (and ``out``, ``lse``): ``P()``, replicated.
      cache: a :class:`KVCache` of specs: pages ``P(axis)`` (block axis), float8 scales ``P()``.
      block_tables: ``[n, S, MBl]``: ``P(axis)``.
      context_lens: ``[n, S]``: ``P(axis)``.
      heads: ``[H]`` vectors (``alibi_slopes``, ``sinks``): ``P()``.
    """

    q: P
    cache: KVCache
    block_tables: P
    context_lens: P
    heads: P

    def shardings(self, mesh: Mesh):
        """The same tree of specs as ``NamedSharding`` s."""
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s), self, is_leaf=lambda s: isinstance(s, P)
        )


jax.tree_util.register_dataclass(
    ContextParallelSpecs,
    data_fields=["q", "cache", "block_tables", "context_lens", "heads"],
    meta_fields=[],
)


def context_parallel_specs(mesh: Mesh, axis: str, *, float8: bool = False) -> ContextParallelSpecs:
    """The specs of the layout above for mesh axis ``axis`` (``float8=True``: with the scales').

    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh
    >>> specs = context_parallel_specs(Mesh(np.array(jax.devices()[:1]), ("cp",)), "cp")
    >>> specs.cache.k, specs.block_tables, specs.q
    (P('cp',), P('cp',), P())
    """
    _checks.mesh_axis_size(mesh, axis)
    scale = P() if float8 else None
    return ContextParallelSpecs(
        q=P(),
        cache=KVCache(P(axis), P(axis), scale, scale),
        block_tables=P(axis),
        context_lens=P(axis),
        heads=P(),
    )


def merge_states_across(out, lse, axis):
    """Inside ``shard_map``: merges the attention states ``(out [T, H, D], lse [T, H])`` of the
    devices of mesh axis ``axis`` (each over its own keys) into the state over all of them, on
    every device: ``lse = log(sum_d exp(lse_d))``, ``out = sum_d exp(lse_d - lse) * out_d``
    (float32, in ``out.dtype``). One ``pmax`` of ``lse`` and one ``psum`` of ``[T, H, D + 1]``.
    A device with ``lse = -inf`` (no key) contributes nothing, even a NaN ``out``; rows no device
    saw are 0 with ``lse = -inf``. An ``lse`` of ``+inf`` (a ``+inf`` sink) is not mergeable: add
    sinks after the merge (``cascade.add_sink``)."""
    lse = lse.astype(jnp.float32)
    m = lax.pmax(lse, axis)
    seen = m > -jnp.inf
    safe = jnp.where(seen, m, 0.0)
    w = jnp.where(seen, jnp.exp(lse - safe), 0.0)  # exp(-inf) = 0: empty devices drop out
    o = jnp.where(w[..., None] > 0, out.astype(jnp.float32), 0.0) * w[..., None]
    total = lax.psum(jnp.concatenate([o, w[..., None]], axis=-1), axis)
    num, den = total[..., :-1], total[..., -1]
    has = den > 0
    merged = jnp.where(has[..., None], num / jnp.where(has, den, 1.0)[..., None], 0.0)
    return merged.astype(out.dtype), jnp.where(
        has, safe + jnp.log(jnp.where(has, den, 1.0)), -jnp.inf
    )


def context_parallel_decode(
    mesh: Mesh,
    axis: str,
    *,
    scale=None,
    softcap=None,
    sliding_window=None,
    backend: str = "auto",
    interpret: bool = False,
    return_lse: bool = False,
):
    """Context-parallel :func:`paged_decode` over mesh axis ``axis`` (layout: module docstring).

    Returns ``f(q, cache, block_tables, context_lens, *, alibi_slopes=None, sinks=None)`` ->
    ``out`` ``[S, H, D]`` (``(out, lse)`` with ``return_lse``), replicated on every device, with
    the meaning of ``paged_decode`` over each sequence's whole context (the devices' shares in
    device order). ``scale``, ``softcap``, ``backend``, ``interpret`` as for ``paged_decode``;
    ``sliding_window`` is rejected (a window would cut each device's share at a different,
    per-sequence place). ``ValueError`` naming the argument for a cache whose blocks do not split
    over the axis or tables / lengths without one row per device. Usable under ``jax.jit``.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh
    >>> from jax_paged_attn.testing import random_paged_kv
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("cp",))
    >>> cache, tables, lens = random_paged_kv(jax.random.key(0), [40, 7], num_kv_heads=2,
    ...                                       head_dim=64, block_size=16, dtype=jnp.float32)
    >>> cp_cache, cp_tables, cp_lens = split_context(cache, tables, lens, num_devices=1)
    >>> q = jax.random.normal(jax.random.key(1), (2, 4, 64))
    >>> out = jax.jit(context_parallel_decode(mesh, "cp", backend="xla"))(
    ...     q, cp_cache, cp_tables, cp_lens)
    >>> bool(jnp.allclose(out, paged_decode(q, cache, tables, lens, backend="xla"), atol=1e-5))
    True
    """
    n = _checks.mesh_axis_size(mesh, axis)
    if sliding_window is not None:
        raise ValueError(
            f"sliding_window ({sliding_window}) is not supported by context-parallel decode: "
            "a window would end each device's share at a different place per sequence; "
            "windowed layers keep their few keys on one device (paged_decode)"
        )
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    _checks.one_of("backend", backend, ("auto", "xla", "triton", "mosaic", "metal"))
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}")

    def decode(q, cache, block_tables, context_lens, *, alibi_slopes=None, sinks=None):
        cache = validated_cache(cache)
        q = _validated_q(q, cache)
        num_seqs = q.shape[0]
        if cache.num_blocks % n:
            raise ValueError(
                f"cache has {cache.num_blocks} blocks, which must be a multiple of the {n} "
                f"devices of mesh axis {axis!r} (each device holds num_blocks / {n})"
            )
        block_tables = _checks.int_array("block_tables", block_tables, ndim=3)
        if block_tables.shape[:2] != (n, num_seqs):
            raise ValueError(
                f"block_tables must have shape [{n}, {num_seqs}, MBl] (one table per device of "
                f"axis {axis!r}, one row per query), got {tuple(block_tables.shape)}"
            )
        context_lens = _checks.int_array("context_lens", context_lens, ndim=2, shape=(n, num_seqs))
        opts = _options(q.shape[1], q.shape[2], scale, softcap, None, alibi_slopes, sinks)
        specs = context_parallel_specs(mesh, axis, float8=cache.is_float8)

        def local(q, cache, tables, lens, alibi, sinks):
            tables, lens = tables[0], lens[0]
            out, lse = paged_decode(
                q,
                cache,
                tables,
                lens,
                scale=opts.scale,
                softcap=opts.softcap,
                alibi_slopes=alibi,
                backend=backend,
                interpret=interpret,
                return_lse=True,
            )
            if alibi is not None:  # biases relative to this share's end: to the sequence's
                every = lax.all_gather(lens, axis)  # [n, S]
                before = jnp.arange(n)[:, None] < lax.axis_index(axis)
                offset = jnp.sum(jnp.where(before, every, 0), axis=0)
                shift = (offset + lens - jnp.sum(every, axis=0)).astype(jnp.float32)
                lse = lse + alibi[None, :] * shift[:, None]
            out, lse = merge_states_across(out, lse, axis)
            if sinks is not None:  # once, after the merge
                out, lse = add_sink(out, lse, sinks)
            return out, lse

        vec = lambda x: None if x is None else specs.heads  # noqa: E731
        out, lse = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(
                specs.q,
                specs.cache,
                specs.block_tables,
                specs.context_lens,
                vec(opts.alibi_slopes),
                vec(opts.sinks),
            ),
            out_specs=(specs.q, specs.q),
            check_vma=False,
        )(q, cache, block_tables, context_lens, opts.alibi_slopes, opts.sinks)
        return (out, lse) if return_lse else out

    return decode


def split_context(cache: KVCache, block_tables, context_lens, num_devices: int):
    """A single-device decode batch in the context-parallel layout of ``num_devices`` devices.

    Each sequence's block-table row is cut into ``num_devices`` runs of ``per = ceil(MB / n)``
    entries; device ``d`` takes run ``d`` (tokens ``d * per * BS ...``), copied into its own pool
    of ``S * per`` blocks (sequence ``i``'s run at local blocks ``i * per ...``). Returns
    ``(cache [n * S * per, Hkv, BS, D], block_tables i32[n, S, per], context_lens i32[n, S])``;
    a sequence of at most ``per * BS`` tokens lies wholly on device 0. Pages past a context are
    zeros. For tests, examples and moving a batch; a server allocates in this layout directly.

    >>> import jax.numpy as jnp
    >>> cache = KVCache.init(8, 16, 1, 64, jnp.float32)
    >>> # 40 tokens in blocks 5, 2, 7 (the last holds 8) and 10 tokens in block 0, on 2 devices
    >>> c, t, l = split_context(cache, jnp.array([[5, 2, 7], [0, 1, 1]]), jnp.array([40, 10]), 2)
    >>> c.k.shape, t.shape, l.tolist()     # 2 runs of 2 blocks: tokens 0..31, 32..39
    ((8, 1, 16, 64), (2, 2, 2), [[32, 10], [8, 0]])
    """
    cache = validated_cache(cache)
    n = _checks.static_number("num_devices", num_devices, integer=True)
    block_tables = _checks.int_array("block_tables", block_tables, ndim=2)
    num_seqs, max_blocks = block_tables.shape
    context_lens = _checks.int_array("context_lens", context_lens, ndim=1, shape=(num_seqs,))
    bs = cache.block_size
    per = max(1, -(-max_blocks // n))
    table = jnp.pad(block_tables, ((0, 0), (0, n * per - max_blocks)))
    src = table.reshape(num_seqs, n, per).transpose(1, 0, 2)  # [n, S, per]: global block ids
    entry = jnp.arange(n)[:, None, None] * per + jnp.arange(per)[None, None, :]
    used = entry < (-(-context_lens // bs))[None, :, None]  # [n, S, per]
    ids = jnp.clip(src, 0, cache.num_blocks - 1).reshape(-1)
    keep = used.reshape(-1)[:, None, None, None]

    def take(pages):
        return jnp.where(keep, pages[ids], jnp.zeros((), pages.dtype))

    local = KVCache(take(cache.k), take(cache.v), cache.k_scale, cache.v_scale)
    tables = jnp.broadcast_to(
        jnp.arange(num_seqs, dtype=jnp.int32)[:, None] * per + jnp.arange(per, dtype=jnp.int32),
        (n, num_seqs, per),
    )
    start = jnp.arange(n, dtype=jnp.int32)[:, None] * (per * bs)
    lens = jnp.clip(context_lens[None, :] - start, 0, per * bs).astype(jnp.int32)
    return local, tables, lens
