"""The paged KV cache and the ops that write and move its blocks.

Layout ("HND" pages): ``k, v`` are ``[num_blocks, num_kv_heads, block_size, head_dim]``, so one
page of one head is a contiguous ``block_size x head_dim`` tile. Token ``t`` of a sequence
lives in block ``block_tables[i, t // BS]`` at offset ``t % BS``; its *slot* is
``block * BS + offset``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_paged_attn import _checks, backends, reference

FP8 = reference.FP8
FP8_MAX = reference.FP8_MAX
# Calibration divisor: the absmax maps to 240, leaving headroom below 448 for later tokens.
FP8_CALIBRATION = 240.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A paged KV cache (a pytree: the arrays are its leaves).

    Attributes:
      k, v: ``[NB, Hkv, BS, D]`` pages.
      k_scale, v_scale: ``f32[Hkv]`` dequantisation scales of a float8_e4m3fn cache (the real
        value is ``stored * scale``), else None.

    >>> import jax.numpy as jnp
    >>> cache = KVCache.init(num_blocks=8, block_size=16, num_kv_heads=2, head_dim=64)
    >>> cache.k.shape, cache.block_size
    ((8, 2, 16, 64), 16)
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def init(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        *,
        k_scale=None,
        v_scale=None,
    ) -> KVCache:
        """A zero-filled cache. float8_e4m3fn caches get per-KV-head scales (default 1.0,
        vLLM's default; pass small scales and call :func:`update_kv_scales` to calibrate)."""
        for name, value in (
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            _checks.static_number(name, value, integer=True)
        try:
            dtype = jnp.dtype(dtype)
        except TypeError as e:
            raise ValueError(f"dtype must be a JAX dtype, got {dtype!r}") from e
        if dtype not in [jnp.dtype(d) for d in _checks.CACHE_DTYPES]:
            raise ValueError(
                f"dtype must be one of float32, bfloat16, float16, float8_e4m3fn; got {dtype.name}"
            )
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        if dtype == FP8:
            k_scale = _init_scale("k_scale", k_scale, num_kv_heads)
            v_scale = _init_scale("v_scale", v_scale, num_kv_heads)
        elif k_scale is not None or v_scale is not None:
            raise ValueError(
                f"k_scale/v_scale are only for float8_e4m3fn caches, got dtype {dtype.name}"
            )
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), k_scale, v_scale)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self):
        return self.k.dtype

    @property
    def is_float8(self) -> bool:
        return self.k.dtype == FP8


def _init_scale(name, scale, num_kv_heads):
    if scale is None:
        return jnp.ones((num_kv_heads,), jnp.float32)
    if isinstance(scale, (int, float)):
        return jnp.full((num_kv_heads,), scale, jnp.float32)
    return _checks.float_vector(name, scale, num_kv_heads, "one per KV head")


def validated_cache(cache) -> KVCache:
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
    k = _checks.as_array("cache.k", cache.k, ndim=4)
    v = _checks.as_array("cache.v", cache.v, ndim=4)
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"cache.v must match cache.k: {v.shape} {v.dtype} vs {k.shape} {k.dtype}")
    if k.dtype not in [jnp.dtype(d) for d in _checks.CACHE_DTYPES]:
        raise ValueError(
            f"cache.k dtype must be float32, bfloat16, float16 or float8_e4m3fn, got {k.dtype}"
        )
    if cache.is_float8:
        for name in ("k_scale", "v_scale"):
            scale = getattr(cache, name)
            if scale is None:
                raise ValueError(f"cache.{name} must be set for a float8_e4m3fn cache")
            _checks.float_vector(f"cache.{name}", scale, k.shape[1], "one per KV head")
    return cache


def _validated_kv(cache: KVCache, k, v):
    hkv, d = cache.num_kv_heads, cache.head_dim
    k = _checks.as_array("k", k, ndim=3)
    v = _checks.as_array("v", v, ndim=3)
    if k.shape[1:] != (hkv, d):
        raise ValueError(
            f"k must have shape [T, {hkv}, {d}] (num_kv_heads, head_dim of the "
            f"cache), got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
    return k, v


def write_kv(
    cache: KVCache, k, v, slot_mapping, *, backend: str = "auto", interpret: bool = False
) -> KVCache:
    """Writes token ``i``'s ``k[i], v[i]`` (``[T, Hkv, D]``) into slot ``slot_mapping[i]``.

    Slots ``< 0`` are padding and write nothing; every other byte of the cache is unchanged.
    Under ``jax.jit(..., donate_argnums=...)`` the cache is updated in place.

    >>> import jax.numpy as jnp
    >>> cache = KVCache.init(4, 16, 1, 8, jnp.float32)
    >>> k = v = jnp.ones((3, 1, 8))
    >>> # slot 37 = block 2, offset 5; -1 is padding
    >>> cache = write_kv(cache, k, v, jnp.array([37, -1, 0], jnp.int32))
    >>> float(cache.k[2, 0, 5, 0]), float(cache.k[0, 0, 1, 0])
    (1.0, 0.0)
    """
    cache = validated_cache(cache)
    k, v = _validated_kv(cache, k, v)
    slot_mapping = _checks.int_array("slot_mapping", slot_mapping, ndim=1, shape=(k.shape[0],))
    impl = backends.implementation("kv_write", backend, interpret=interpret)
    new_k, new_v = impl.write_kv(
        cache.k,
        cache.v,
        k,
        v,
        slot_mapping,
        k_scale=cache.k_scale,
        v_scale=cache.v_scale,
        interpret=interpret,
    )
    return dataclasses.replace(cache, k=new_k, v=new_v)


def update_kv_scales(cache: KVCache, k, v) -> KVCache:
    """Calibrates a float8 cache's scales: per KV head ``max(scale, absmax(x[:, h]) / 240)``.

    Pass only real tokens (padding rows count towards the absmax)."""
    cache = validated_cache(cache)
    if not cache.is_float8:
        raise ValueError(
            f"cache must be a float8_e4m3fn cache to calibrate scales, got dtype {cache.dtype}"
        )
    k, v = _validated_kv(cache, k, v)

    def absmax(x):
        return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=(0, 2), initial=0.0)

    return dataclasses.replace(
        cache,
        k_scale=jnp.maximum(cache.k_scale, absmax(k) / FP8_CALIBRATION),
        v_scale=jnp.maximum(cache.v_scale, absmax(v) / FP8_CALIBRATION),
    )


def copy_blocks(cache: KVCache, src, dst) -> KVCache:
    """Copies block ``src[i]`` to block ``dst[i]`` for every ``i`` (all reads happen before
    any write). A pair with an id outside ``[0, num_blocks)`` (negative ids: padding) copies
    nothing; ``dst`` ids must be distinct.

    >>> import jax.numpy as jnp
    >>> cache = KVCache.init(4, 16, 1, 8, jnp.float32)
    >>> cache = copy_blocks(cache, jnp.array([1, -1], jnp.int32), jnp.array([3, 0], jnp.int32))
    """
    cache = validated_cache(cache)
    src = _checks.int_array("src", src, ndim=1)
    dst = _checks.int_array("dst", dst, ndim=1)
    if src.shape != dst.shape:
        raise ValueError(
            f"dst must have the shape of src {tuple(src.shape)}, got {tuple(dst.shape)}"
        )
    nb = cache.num_blocks
    skip = (src < 0) | (src >= nb) | (dst < 0)
    dst = jnp.where(skip, nb, dst)  # block nb: dropped by mode="drop" (ids >= nb are too)
    src = jnp.clip(src, 0, nb - 1)  # the clamped read of a skipped pair is never written
    return dataclasses.replace(
        cache,
        k=cache.k.at[dst].set(cache.k[src], mode="drop"),
        v=cache.v.at[dst].set(cache.v[src], mode="drop"),
    )


def gather_blocks(cache: KVCache, ids):
    """Returns the pages ``(k, v)`` of blocks ``ids`` (``[N, Hkv, BS, D]`` each, as stored:
    float8 caches give float8 pages; the scales stay in the cache). Ids outside
    ``[0, num_blocks)`` (negative ids: padding) give zero pages."""
    cache = validated_cache(cache)
    ids = _checks.int_array("ids", ids, ndim=1)
    valid = ((ids >= 0) & (ids < cache.num_blocks))[:, None, None, None]
    safe = jnp.clip(ids, 0, cache.num_blocks - 1)

    def take(pages):
        return jnp.where(valid, pages[safe], jnp.zeros((), pages.dtype))

    return take(cache.k), take(cache.v)


def scatter_blocks(cache: KVCache, ids, k, v) -> KVCache:
    """Writes pages ``k, v`` (``[N, Hkv, BS, D]``, in the cache's dtype) into blocks ``ids``
    (the inverse of :func:`gather_blocks`, e.g. to swap blocks back in from host memory).
    Ids outside ``[0, num_blocks)`` (negative ids: padding) write nothing; ids must be
    distinct."""
    cache = validated_cache(cache)
    ids = _checks.int_array("ids", ids, ndim=1)
    page_shape = (ids.shape[0],) + cache.k.shape[1:]
    for name, x in (("k", k), ("v", v)):
        x = _checks.as_array(name, x, ndim=4)
        if tuple(x.shape) != page_shape:
            raise ValueError(f"{name} must have shape {page_shape}, got {tuple(x.shape)}")
        if x.dtype != cache.dtype:
            raise ValueError(f"{name} must have the cache's dtype {cache.dtype}, got {x.dtype}")
    ids = jnp.where(ids < 0, cache.num_blocks, ids)
    return dataclasses.replace(
        cache, k=cache.k.at[ids].set(k, mode="drop"), v=cache.v.at[ids].set(v, mode="drop")
    )
