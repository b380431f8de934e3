"""Scale-out with ``jax.shard_map``: tensor-parallel attention and expert-parallel MoE.

Tensor parallelism (attention): the query heads ``H`` and the KV heads are split over one mesh
axis of ``n`` devices. ``q`` / ``out`` ``[T, H, D]`` are sharded ``P(None, axis)``, the cache
pages ``[NB, Hkv, BS, D]`` ``P(None, axis)`` (float8 scales ``f32[Hkv]``: ``P(axis)``), the new
tokens ``k, v`` ``[T, Hkv, D]`` ``P(None, axis)``; the metadata (block tables, lengths,
``cu_seqlens_q``, slots) is replicated. Every device runs the unchanged single-device kernels on
its ``H / n`` query heads and the KV heads they read; there is no communication.

KV-head replication: with fewer KV heads than devices (``Hkv < n``, e.g. Llama-3-70B's 8 KV
heads on 16 GPUs, or GQA-2 on 8), each KV head is stored ``r = n / Hkv`` times, so the cache has
``n`` "replica" heads, one per device: replica ``j`` holds KV head ``j // r``. Device ``d`` owns
query heads ``d*H/n : (d+1)*H/n``; they all read KV head ``d // r``, which is its replica. The
replicated cache means *the same* as the original under the attention contract (query head ``h`` reads replica
``h // (H / n)``, which holds KV head ``h // (H / Hkv)``), so it can be used unsharded too.
:func:`replicate_kv_heads` builds it (cache or new ``k, v``), :func:`unreplicate_kv_heads`
undoes it, :func:`kv_head_layout` spells out the mapping. Requires ``H % n == 0`` and either
``Hkv % n == 0`` or ``n % Hkv == 0``.

Context parallelism (decode; ``jax_paged_attn.context_parallel``, re-exported here): every
sequence's KV blocks split over the devices, each device's attention state merged.

Expert parallelism (MoE; ``jax_paged_attn.expert_parallel``, re-exported here):
``w_gate_up [E, Hd, 2I]`` and ``w_down [E, I, Hd]`` are sharded
``P(axis)`` on the expert axis, so device ``d`` holds experts ``d*E/n : (d+1)*E/n``; tokens,
router weights and ids are replicated. Each device maps global ids to local ones
(``ids - d*E/n``); ids outside ``[0, E/n)`` contribute zero (the MoE contract), and a ``psum`` over the
axis adds the devices' partial outputs.

>>> import jax, jax.numpy as jnp, numpy as np
>>> from jax.sharding import Mesh
>>> kv_head_layout(num_heads=8, num_kv_heads=2, axis_size=8).replicas   # 2 KV heads, 8 devices
4
>>> mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
>>> specs = attention_specs(mesh, "tp", num_heads=8, num_kv_heads=2)
>>> specs.q, specs.cache.k
(P(None, 'tp'), P(None, 'tp'))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_paged_attn import _checks
from jax_paged_attn.attention import PagedAttention, paged_attention, paged_decode
from jax_paged_attn.cache import KVCache, validated_cache, write_kv
from jax_paged_attn.context_parallel import (
    ContextParallelSpecs,
    context_parallel_decode,
    context_parallel_specs,
    merge_states_across,
    split_context,
)
from jax_paged_attn.expert_parallel import local_expert_ids, moe_specs, shard_fused_moe
from jax_paged_attn.metadata import AttentionMetadata, validated

# The shard_maps below run with check_vma=False: the per-device bodies are the unchanged
# single-device ops (the xla reference's loop carries and the Pallas kernels are not annotated
# with varying-manual-axes types); outputs are either sharded on `axis` or made replicated by
# an explicit psum, so there is nothing for the check to catch.

__all__ = [
    "AttentionSpecs",
    "ContextParallelSpecs",
    "context_parallel_decode",
    "context_parallel_specs",
    "merge_states_across",
    "split_context",
    "KVHeadLayout",
    "attention_specs",
    "kv_head_layout",
    "local_expert_ids",
    "local_layer",
    "moe_specs",
    "replicate_kv_heads",
    "shard_cache",
    "shard_fused_moe",
    "shard_layer",
    "shard_paged_attention",
    "shard_paged_decode",
    "unreplicate_kv_heads",
]


# ----------------------------------------------------------------------------- head layout


@dataclasses.dataclass(frozen=True)
class KVHeadLayout:
    """How ``H`` query heads and ``Hkv`` KV heads split over ``axis_size`` devices.

    Attributes:
      num_heads, num_kv_heads, axis_size: the model's heads and the mesh axis size ``n``.
      replicas: ``r``, copies of each KV head in the sharded cache (1 when ``Hkv % n == 0``,
        else ``n / Hkv``).
      cache_kv_heads: KV heads of the (replicated) cache, ``Hkv * r``.
      local_heads: query heads per device, ``H / n``.
      local_kv_heads: cache KV heads per device, ``Hkv * r / n``.
    """

    num_heads: int
    num_kv_heads: int
    axis_size: int
    replicas: int
    cache_kv_heads: int
    local_heads: int
    local_kv_heads: int

    def device_kv_heads(self, device: int) -> tuple[int, ...]:
        """The original KV heads whose (replica) pages device ``device`` holds.

        >>> kv_head_layout(8, 2, 8).device_kv_heads(5)    # devices 4..7 hold KV head 1
        (1,)
        """
        first = device * self.local_kv_heads
        return tuple((first + j) // self.replicas for j in range(self.local_kv_heads))


def kv_head_layout(num_heads: int, num_kv_heads: int, axis_size: int) -> KVHeadLayout:
    """The tensor-parallel head layout; ``ValueError`` naming the argument if it cannot split.

    >>> layout = kv_head_layout(num_heads=32, num_kv_heads=8, axis_size=2)
    >>> layout.replicas, layout.local_heads, layout.local_kv_heads
    (1, 16, 4)
    >>> layout = kv_head_layout(num_heads=8, num_kv_heads=2, axis_size=8)  # each KV head on 4
    >>> layout.replicas, layout.cache_kv_heads, layout.local_heads, layout.local_kv_heads
    (4, 8, 1, 1)
    """
    num_heads = _checks.static_number("num_heads", num_heads, integer=True)
    num_kv_heads = _checks.static_number("num_kv_heads", num_kv_heads, integer=True)
    axis_size = _checks.static_number("axis_size", axis_size, integer=True)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if num_heads % axis_size:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of the mesh axis size "
            f"({axis_size}): each device takes num_heads / axis_size query heads"
        )
    if num_kv_heads % axis_size == 0:
        replicas = 1
    elif axis_size % num_kv_heads == 0:
        replicas = axis_size // num_kv_heads
    else:
        raise ValueError(
            f"num_kv_heads ({num_kv_heads}) must be a multiple or a divisor of the "
            f"mesh axis size ({axis_size}): KV heads are split over the devices, "
            f"or each is replicated on axis_size / num_kv_heads devices"
        )
    cache_kv_heads = num_kv_heads * replicas
    return KVHeadLayout(
        num_heads,
        num_kv_heads,
        axis_size,
        replicas,
        cache_kv_heads,
        num_heads // axis_size,
        cache_kv_heads // axis_size,
    )


def _replicas(num_kv_heads: int, axis_size: int) -> int:
    if num_kv_heads % axis_size == 0:
        return 1
    if axis_size % num_kv_heads == 0:
        return axis_size // num_kv_heads
    raise ValueError(
        f"num_kv_heads ({num_kv_heads}) must be a multiple or a divisor of the "
        f"mesh axis size ({axis_size})"
    )


def replicate_kv_heads(x, axis_size: int):
    """The KV-head-replicated layout of a cache or of new tokens, for ``axis_size`` devices.

    ``x`` is a :class:`KVCache` (pages ``[NB, Hkv, BS, D]``, float8 scales ``[Hkv]``) or an
    array of new tokens ``[T, Hkv, D]``. With ``Hkv < axis_size`` each KV head is repeated
    ``r = axis_size / Hkv`` times in place (``[h0, h0, .., h1, h1, ..]``, ``Hkv * r`` heads), so
    sharding the head axis over ``axis_size`` devices gives each device the one KV head its
    query heads read. With ``Hkv % axis_size == 0`` nothing is repeated and ``x`` is returned.
    The result means the same as ``x`` to :func:`paged_attention` (see the module docstring).

    >>> import jax.numpy as jnp
    >>> cache = KVCache.init(4, 16, 2, 8, jnp.float32)
    >>> replicate_kv_heads(cache, 8).k.shape          # 2 KV heads, 8 devices: 4 copies each
    (4, 8, 16, 8)
    >>> replicate_kv_heads(jnp.zeros((5, 2, 8)), 8).shape
    (5, 8, 8)
    """
    axis_size = _checks.static_number("axis_size", axis_size, integer=True)
    if isinstance(x, KVCache):
        cache = validated_cache(x)
        r = _replicas(cache.num_kv_heads, axis_size)
        if r == 1:
            return cache

        def rep(a, axis):
            return None if a is None else jnp.repeat(a, r, axis=axis)

        return KVCache(
            rep(cache.k, 1), rep(cache.v, 1), rep(cache.k_scale, 0), rep(cache.v_scale, 0)
        )
    x = _checks.as_array("x", x, ndim=3)
    r = _replicas(x.shape[1], axis_size)
    return x if r == 1 else jnp.repeat(x, r, axis=1)


def unreplicate_kv_heads(x, num_kv_heads: int):
    """Inverse of :func:`replicate_kv_heads`: keeps the first copy of each of the
    ``num_kv_heads`` KV heads (a cache or ``[T, Hkv * r, D]`` tokens).

    >>> import jax.numpy as jnp
    >>> cache = KVCache.init(4, 16, 2, 8, jnp.float32)
    >>> unreplicate_kv_heads(replicate_kv_heads(cache, 8), 2).k.shape
    (4, 2, 16, 8)
    """
    num_kv_heads = _checks.static_number("num_kv_heads", num_kv_heads, integer=True)
    heads = x.num_kv_heads if isinstance(x, KVCache) else _checks.as_array("x", x, ndim=3).shape[1]
    if heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads ({num_kv_heads}) must divide the replicated heads ({heads})"
        )
    r = heads // num_kv_heads
    if r == 1:
        return x
    if isinstance(x, KVCache):

        def keep(a, axis):
            return None if a is None else lax.slice_in_dim(a, 0, heads, r, axis=axis)

        return KVCache(keep(x.k, 1), keep(x.v, 1), keep(x.k_scale, 0), keep(x.v_scale, 0))
    return x[:, ::r]


# ----------------------------------------------------------------------------- specs


def _cache_spec(axis, float8: bool) -> KVCache:
    pages = P(None, axis)
    scale = P(axis) if float8 else None
    return KVCache(pages, pages, scale, scale)


@dataclasses.dataclass(frozen=True)
class AttentionSpecs:
    """PartitionSpecs of tensor-parallel attention (``in_specs``/``out_specs`` pieces).

    Attributes:
      q: ``[T, H, D]`` queries (and ``out``): ``P(None, axis)``.
      kv: ``[T, Hkv * r, D]`` new tokens for ``write_kv``/the layer: ``P(None, axis)``.
      cache: a :class:`KVCache` of specs: pages ``P(None, axis)``, float8 scales ``P(axis)``.
      meta: ``P()``: the metadata is replicated (a prefix of the whole pytree).
      heads: ``[H]`` per-query-head vectors (``alibi_slopes``, ``sinks``): ``P(axis)``.
      layout: the :class:`KVHeadLayout`.
    """

    q: P
    kv: P
    cache: KVCache
    meta: P
    heads: P
    layout: KVHeadLayout

    def shardings(self, mesh: Mesh):
        """The same tree of specs as ``NamedSharding`` s (for ``jax.device_put``)."""
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s), self, is_leaf=lambda s: isinstance(s, P)
        )


jax.tree_util.register_dataclass(
    AttentionSpecs, data_fields=["q", "kv", "cache", "meta", "heads"], meta_fields=["layout"]
)


def attention_specs(
    mesh: Mesh, axis: str, num_heads: int, num_kv_heads: int, *, float8: bool = False
) -> AttentionSpecs:
    """PartitionSpecs for attention with heads sharded over mesh axis ``axis``.

    ``num_kv_heads`` is the model's (unreplicated) count; the cache spec is for the layout of
    :func:`replicate_kv_heads` (``layout.cache_kv_heads`` heads). ``float8=True`` adds the
    scales' specs. ``ValueError`` naming the argument when the heads do not split.
    """
    layout = kv_head_layout(num_heads, num_kv_heads, _checks.mesh_axis_size(mesh, axis))
    return AttentionSpecs(
        q=P(None, axis),
        kv=P(None, axis),
        cache=_cache_spec(axis, float8),
        meta=P(),
        heads=P(axis),
        layout=layout,
    )


def shard_cache(cache: KVCache, mesh: Mesh, axis: str, num_heads: int) -> KVCache:
    """Replicates the KV heads as needed (:func:`replicate_kv_heads`) and places the cache's
    pages on ``mesh``, sharded on their head axis over ``axis``.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    >>> shard_cache(KVCache.init(4, 16, 2, 8, jnp.float32), mesh, "tp", num_heads=8).k.shape
    (4, 2, 16, 8)
    """
    cache = validated_cache(cache)
    specs = attention_specs(mesh, axis, num_heads, cache.num_kv_heads, float8=cache.is_float8)
    cache = replicate_kv_heads(cache, specs.layout.axis_size)
    return jax.device_put(cache, specs.shardings(mesh).cache)


# ----------------------------------------------------------------------------- attention


def _check_sharded_heads(what, heads, cache_heads, axis, n):
    if heads % n:
        raise ValueError(
            f"{what} has {heads} heads, which must be a multiple of the {n} "
            f"devices of mesh axis {axis!r}"
        )
    if cache_heads % n:
        hint = (
            f"; replicate them first: replicate_kv_heads(cache, {n}) or shard_cache(...)"
            if n % cache_heads == 0
            else ""
        )
        raise ValueError(
            f"cache has {cache_heads} KV heads, which must be a multiple of the "
            f"{n} devices of mesh axis {axis!r}{hint}"
        )


def _vector_spec(x, axis):
    return None if x is None else P(axis)


def _sharded_attention(decode: bool, mesh, axis, opts):
    n = _checks.mesh_axis_size(mesh, axis)

    def call(q, cache, *meta_args, alibi_slopes=None, sinks=None):
        cache = validated_cache(cache)
        q = _checks.as_array("q", q, ndim=3)
        _check_sharded_heads("q", q.shape[1], cache.num_kv_heads, axis, n)
        for name, x in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
            if x is not None:  # validated here: a wrong length would be split before the API
                _checks.float_vector(name, x, q.shape[1], "one per query head")

        def local(q, cache, meta_args, alibi_slopes, sinks):
            fn = paged_decode if decode else paged_attention
            return fn(q, cache, *meta_args, alibi_slopes=alibi_slopes, sinks=sinks, **opts)

        in_specs = (
            P(None, axis),
            _cache_spec(axis, cache.is_float8),
            P(),
            _vector_spec(alibi_slopes, axis),
            _vector_spec(sinks, axis),
        )
        return jax.shard_map(
            local, mesh=mesh, in_specs=in_specs, out_specs=P(None, axis), check_vma=False
        )(q, cache, meta_args, alibi_slopes, sinks)

    return call


def shard_paged_attention(mesh: Mesh, axis: str, **opts):
    """Tensor-parallel :func:`paged_attention` over mesh axis ``axis``.

    ``opts`` are :func:`paged_attention`'s static keywords (``scale``, ``softcap``,
    ``sliding_window``, ``backend``, ``interpret``). Returns ``f(q, cache, meta, *,
    alibi_slopes=None, sinks=None) -> out``, with the meaning of
    ``paged_attention(q, cache, meta, ...)``: ``q, out`` ``[T, H, D]`` (sharded
    ``P(None, axis)`` on the way in and out), ``cache`` in the layout of
    :func:`replicate_kv_heads` / :func:`shard_cache`, ``meta`` replicated, the ``[H]`` vectors
    ``P(axis)``. Usable under ``jax.jit``; ``ValueError`` naming the argument when ``q``'s or
    the cache's heads are not a multiple of the axis size.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh
    >>> from jax_paged_attn import AttentionMetadata
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    >>> attend = jax.jit(shard_paged_attention(mesh, "tp", backend="xla"))
    >>> cache = shard_cache(KVCache.init(4, 16, 2, 8, jnp.float32), mesh, "tp", num_heads=4)
    >>> meta = AttentionMetadata.decode(jnp.array([[3, 1]], jnp.int32), jnp.array([20], jnp.int32))
    >>> attend(jnp.ones((1, 4, 8)), cache, meta).shape
    (1, 4, 8)
    """
    f = _sharded_attention(False, mesh, axis, opts)

    @functools.wraps(f)
    def attend(q, cache, meta, *, alibi_slopes=None, sinks=None):
        if not isinstance(meta, AttentionMetadata):
            raise ValueError(f"meta must be an AttentionMetadata, got {type(meta).__name__}")
        return f(q, cache, meta, alibi_slopes=alibi_slopes, sinks=sinks)

    return attend


def shard_paged_decode(mesh: Mesh, axis: str, **opts):
    """Tensor-parallel :func:`paged_decode`: ``f(q, cache, block_tables, context_lens, *,
    alibi_slopes=None, sinks=None) -> out`` (``q`` ``[S, H, D]``); otherwise as
    :func:`shard_paged_attention`."""
    return _sharded_attention(True, mesh, axis, opts)


def local_layer(layer: PagedAttention, axis_size: int) -> PagedAttention:
    """The per-device config of ``layer`` under tensor parallelism over ``axis_size`` devices
    (``H / n`` query heads, ``Hkv * r / n`` KV heads): call it inside your own ``shard_map``
    on local shards. ALiBi slopes differ per device, so a layer with ``alibi_slopes`` raises
    ``ValueError``: use :func:`shard_layer`, which slices them per device.

    >>> local = local_layer(PagedAttention(32, 128, 8), 16)   # 8 KV heads on 16 devices: 2 copies
    >>> local.num_heads, local.num_kv_heads, local.head_dim
    (2, 1, 128)
    """
    if not isinstance(layer, PagedAttention):
        raise ValueError(f"layer must be a PagedAttention, got {type(layer).__name__}")
    if layer.alibi_slopes is not None:
        raise ValueError(
            "layer has alibi_slopes, which differ per device; use shard_layer(mesh, "
            "axis, layer), which slices them per device"
        )
    layout = kv_head_layout(layer.num_heads, layer.num_kv_heads, axis_size)
    # The local layer sees 1/n of the heads: keep the model's softmax scale (1/sqrt(D) is
    # unchanged, D is not split).
    return dataclasses.replace(
        layer, num_heads=layout.local_heads, num_kv_heads=layout.local_kv_heads
    )


def shard_layer(mesh: Mesh, axis: str, layer: PagedAttention):
    """Tensor-parallel ``layer(q, k, v, cache, meta)``: writes this step's ``k, v``, then
    attends, each device on its heads. Returns ``f(q, k, v, cache, meta, *, sinks=None,
    interpret=False) -> (out, new_cache)``.

    ``q`` ``[T, H, D]``; ``k, v`` ``[T, Hkv, D]`` (the model's KV heads: replicated here as the
    cache is) or already ``[T, Hkv * r, D]``; ``cache`` in the layout of :func:`shard_cache`
    (the new cache keeps it); ``meta`` replicated, with ``slot_mapping``. Wrap it in
    ``jax.jit(..., donate_argnums=3, static_argnames="interpret")`` to update the cache in place.
    """
    if not isinstance(layer, PagedAttention):
        raise ValueError(f"layer must be a PagedAttention, got {type(layer).__name__}")
    n = _checks.mesh_axis_size(mesh, axis)
    layout = kv_head_layout(layer.num_heads, layer.num_kv_heads, n)
    base = dataclasses.replace(layer, alibi_slopes=None)
    local = local_layer(base, n)
    slopes = None if layer.alibi_slopes is None else jnp.asarray(layer.alibi_slopes, jnp.float32)
    # The KV-write backend PagedAttention.__call__ picks (only the ALiBi path below needs it).
    write_backend = layer.backend if layer.backend in ("auto", "xla", "metal") else "auto"

    def step(q, k, v, cache, meta, *, sinks=None, interpret=False):
        cache = validated_cache(cache)
        q = _checks.as_array("q", q, ndim=3)
        if q.shape[1:] != (layer.num_heads, layer.head_dim):
            raise ValueError(
                f"q must have shape [T, {layer.num_heads}, {layer.head_dim}], got {tuple(q.shape)}"
            )
        if cache.num_kv_heads != layout.cache_kv_heads or cache.head_dim != layer.head_dim:
            raise ValueError(
                f"cache has {cache.num_kv_heads} KV heads of dim {cache.head_dim}; the layer "
                f"on {n} devices expects {layout.cache_kv_heads} of dim {layer.head_dim} "
                f"(build it with shard_cache(cache, mesh, {axis!r}, {layer.num_heads}))"
            )
        meta = validated(meta, num_tokens=q.shape[0], need_slots=True)
        k, v = (_checks.as_array(name, x, ndim=3) for name, x in (("k", k), ("v", v)))
        heads = {layer.num_kv_heads, layout.cache_kv_heads}
        if k.shape[1:] not in [(h, layer.head_dim) for h in heads]:
            raise ValueError(
                f"k must have shape [T, Hkv, {layer.head_dim}] with Hkv in "
                f"{sorted(heads)} (the layer's KV heads, or replicated as the "
                f"cache is), got {tuple(k.shape)}"
            )
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.shape[1] == layer.num_kv_heads and layout.replicas > 1:
            k, v = replicate_kv_heads(k, n), replicate_kv_heads(v, n)
        if sinks is not None:
            _checks.float_vector("sinks", sinks, layer.num_heads, "one logit per query head")

        def run(q, k, v, cache, meta, sinks, slopes):
            if slopes is None:  # the layer itself, on this device's heads
                return local(q, k, v, cache, meta, sinks=sinks, interpret=interpret)
            # ALiBi: the slopes of this device's heads are data, so make the layer's two calls.
            cache = write_kv(
                cache, k, v, meta.slot_mapping, backend=write_backend, interpret=interpret
            )
            out = paged_attention(
                q,
                cache,
                meta,
                scale=layer.scale,
                softcap=layer.softcap,
                sliding_window=layer.sliding_window,
                alibi_slopes=slopes,
                sinks=sinks,
                backend=layer.backend,
                interpret=interpret,
            )
            return out, cache

        cache_spec = _cache_spec(axis, cache.is_float8)
        in_specs = (
            P(None, axis),
            P(None, axis),
            P(None, axis),
            cache_spec,
            P(),
            _vector_spec(sinks, axis),
            _vector_spec(slopes, axis),
        )
        return jax.shard_map(
            run,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=(P(None, axis), cache_spec),
            check_vma=False,
        )(q, k, v, cache, meta, sinks, slopes)

    return step
