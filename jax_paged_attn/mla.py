"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a paged latent cache, absorbed form.

The cache holds one row per token: its compressed latent ``c_kv`` (``R = kv_lora_rank``
features) then its rotary key ``k_pe`` (``P = rope_dim`` features), ``kv [NB, BS, R + P]``. All
``H`` query heads share that one latent "KV head": the caller has already folded ``W_UK`` into
``q_nope`` (``[T, H, R]``) and applies ``W_UV`` to the output (``[T, H, R]``). See docs/mla.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax_paged_attn import _checks, _grad, backends
from jax_paged_attn import reference as xla
from jax_paged_attn.metadata import AttentionMetadata, validated

FP8 = xla.FP8


@dataclasses.dataclass(frozen=True)
class MLACache:
    """A paged latent cache (a pytree: ``kv`` and ``scale`` are leaves, the ranks static).

    Attributes:
      kv: ``[NB, BS, R + P]``: ``kv[..., :R]`` the latent ``c_kv``, ``kv[..., R:]`` ``k_pe``.
      kv_lora_rank, rope_dim: ``R`` and ``P``.
      scale: f32 scalar dequantisation scale of a float8_e4m3fn cache (the real value is
        ``stored * scale``), else None.

    >>> import jax.numpy as jnp
    >>> cache = MLACache.init(num_blocks=8, block_size=16)
    >>> cache.kv.shape, cache.kv.dtype.name
    ((8, 16, 576), 'bfloat16')
    """

    kv: jax.Array
    kv_lora_rank: int
    rope_dim: int
    scale: jax.Array | None = None

    @classmethod
    def init(
        cls,
        num_blocks: int,
        block_size: int,
        kv_lora_rank: int = 512,
        rope_dim: int = 64,
        dtype=jnp.bfloat16,
        *,
        scale=None,
    ) -> MLACache:
        """A zero-filled cache; float8_e4m3fn caches get ``scale`` (default 1.0)."""
        for name, value in (
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("kv_lora_rank", kv_lora_rank),
            ("rope_dim", rope_dim),
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
        if dtype == FP8:
            scale = _scalar_scale("scale", 1.0 if scale is None else scale)
        elif scale is not None:
            raise ValueError(f"scale is only for float8_e4m3fn caches, got dtype {dtype.name}")
        kv = jnp.zeros((num_blocks, block_size, kv_lora_rank + rope_dim), dtype)
        return cls(kv, int(kv_lora_rank), int(rope_dim), scale)

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]

    @property
    def block_size(self) -> int:
        return self.kv.shape[1]

    @property
    def dtype(self):
        return self.kv.dtype

    @property
    def is_float8(self) -> bool:
        return self.kv.dtype == FP8


jax.tree_util.register_dataclass(
    MLACache, data_fields=["kv", "scale"], meta_fields=["kv_lora_rank", "rope_dim"]
)


def _scalar_scale(name, scale) -> jax.Array:
    scale = _checks.as_array(name, scale)
    if scale.ndim != 0 and scale.shape != (1,):
        raise ValueError(f"{name} must be a scalar (one scale per tensor), got {scale.shape}")
    if not jnp.issubdtype(scale.dtype, jnp.floating) and not jnp.issubdtype(
        scale.dtype, jnp.integer
    ):
        raise ValueError(f"{name} must be a float scalar, got dtype {scale.dtype}")
    return scale.reshape(()).astype(jnp.float32)


def validated_mla_cache(cache) -> MLACache:
    if not isinstance(cache, MLACache):
        raise ValueError(f"cache must be an MLACache, got {type(cache).__name__}")
    kv = _checks.as_array("cache.kv", cache.kv, ndim=3)
    if kv.dtype not in [jnp.dtype(d) for d in _checks.CACHE_DTYPES]:
        raise ValueError(
            f"cache.kv dtype must be float32, bfloat16, float16 or float8_e4m3fn, got {kv.dtype}"
        )
    width = cache.kv_lora_rank + cache.rope_dim
    if kv.shape[2] != width:
        raise ValueError(
            f"cache.kv must have kv_lora_rank + rope_dim = {width} features per row, "
            f"got shape {tuple(kv.shape)}"
        )
    scale = cache.scale
    if cache.is_float8:
        if scale is None:
            raise ValueError("cache.scale must be set for a float8_e4m3fn cache")
        scale = _scalar_scale("cache.scale", scale)
    elif scale is not None:
        raise ValueError(f"cache.scale is only for float8_e4m3fn caches, got dtype {kv.dtype}")
    return dataclasses.replace(cache, kv=kv, scale=scale)


def _float_input(name, x, ndim, last, what):
    x = _checks.as_array(name, x, ndim=ndim)
    if x.dtype not in [jnp.dtype(d) for d in _checks.FLOAT_DTYPES]:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[-1] != last:
        raise ValueError(
            f"{name} must have {last} features (the cache's {what}), got shape {tuple(x.shape)}"
        )
    return x


def write_mla_kv(
    cache: MLACache, c_kv, k_pe, slot_mapping, *, backend: str = "auto", interpret: bool = False
) -> MLACache:
    """Writes token ``i``'s row ``[c_kv[i] | k_pe[i]]`` (``[T, R]``, ``[T, P]``) into slot
    ``slot_mapping[i]`` (block ``slot // BS``, offset ``slot % BS``).

    Slots ``< 0`` (padding) or ``>= NB * BS`` write nothing; every other byte is unchanged.
    float8 caches store ``saturate(x / scale)``. In place under ``jax.jit(donate_argnums=...)``.

    >>> import jax.numpy as jnp
    >>> cache = MLACache.init(4, 16, kv_lora_rank=8, rope_dim=4, dtype=jnp.float32)
    >>> cache = write_mla_kv(cache, jnp.ones((2, 8)), 2 * jnp.ones((2, 4)),
    ...                      jnp.array([37, -1], jnp.int32))   # block 2, offset 5; padding
    >>> float(cache.kv[2, 5, 0]), float(cache.kv[2, 5, 8]), float(cache.kv[0, 0, 0])
    (1.0, 2.0, 0.0)
    """
    cache = validated_mla_cache(cache)
    c_kv = _float_input("c_kv", c_kv, 2, cache.kv_lora_rank, "kv_lora_rank")
    k_pe = _float_input("k_pe", k_pe, 2, cache.rope_dim, "rope_dim")
    if k_pe.shape[0] != c_kv.shape[0]:
        raise ValueError(
            f"k_pe must have one row per c_kv row ({c_kv.shape[0]}), got {k_pe.shape[0]}"
        )
    slot_mapping = _checks.int_array("slot_mapping", slot_mapping, ndim=1, shape=(c_kv.shape[0],))
    impl = backends.implementation("mla", backend, interpret=interpret)
    kv = impl.write_mla_kv(
        cache.kv, c_kv, k_pe, slot_mapping, scale=cache.scale, interpret=interpret
    )
    return dataclasses.replace(cache, kv=kv)


def paged_mla_attention(
    q_nope,
    q_pe,
    cache: MLACache,
    meta: AttentionMetadata,
    *,
    scale,
    softcap=None,
    backend: str = "auto",
    interpret: bool = False,
    return_lse: bool = False,
):
    """Absorbed-form MLA over the paged latent cache; returns ``[T, H, R]`` in ``q_nope.dtype``.

    ``q_nope`` ``[T, H, R]`` (already multiplied by ``W_UK``), ``q_pe`` ``[T, H, P]``.
    ``logit = scale * (q_nope[h] . c_kv[t] + q_pe[h] . k_pe[t])`` (``scale`` is required:
    DeepSeek's ``1/sqrt(qk_nope_head_dim + qk_rope_head_dim)`` times its YaRN factor), then
    ``softcap * tanh(logit / softcap)``; the value is ``c_kv[t]``. Which keys a row sees, mixed
    prefill and decode rows, zero rows and float32 softmax are as :func:`paged_attention`.
    ``return_lse=True`` returns ``(out, lse)``, ``lse`` f32 ``[T, H]`` (``-inf`` for rows that
    see nothing). ``jax.grad`` flows to ``q_nope``, ``q_pe`` and ``cache.kv``.
    """
    cache = validated_mla_cache(cache)
    q_nope = _float_input("q_nope", q_nope, 3, cache.kv_lora_rank, "kv_lora_rank")
    q_pe = _float_input("q_pe", q_pe, 3, cache.rope_dim, "rope_dim")
    if q_pe.shape[:2] != q_nope.shape[:2]:
        raise ValueError(
            f"q_pe must have q_nope's rows and heads {tuple(q_nope.shape[:2])}, "
            f"got shape {tuple(q_pe.shape)}"
        )
    if q_pe.dtype != q_nope.dtype:
        raise ValueError(f"q_pe must have q_nope's dtype {q_nope.dtype}, got {q_pe.dtype}")
    if scale is None:
        raise ValueError(
            "scale is required for MLA (e.g. 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) "
            "times the YaRN factor): there is no default"
        )
    scale = _checks.static_number("scale", scale)
    softcap = _checks.static_number("softcap", softcap, none_means="no softcap")
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    meta = validated(meta, num_tokens=None)
    tables = meta.block_tables
    num_tokens, num_heads, rank = q_nope.shape
    if num_tokens == 0 or tables.shape[0] == 0 or tables.shape[1] == 0:
        out = jnp.zeros((num_tokens, num_heads, rank), q_nope.dtype)
        return (
            (out, jnp.full((num_tokens, num_heads), -jnp.inf, jnp.float32)) if return_lse else out
        )
    config = dict(
        kv_lora_rank=rank,
        rope_dim=cache.rope_dim,
        block_size=cache.block_size,
        num_heads=num_heads,
        q_dtype=q_nope.dtype,
        kv_dtype=cache.dtype,
    )
    if return_lse:
        config["return_lse"] = True
    impl = backends.implementation("mla", backend, interpret=interpret, config=config)

    def call(impl, q_nope, q_pe, kv, tables, lens, cu, kv_scale, **extra):
        return impl.paged_mla_attention(
            q_nope,
            q_pe,
            kv,
            tables,
            lens,
            cu,
            scale=scale,
            softcap=softcap,
            kv_scale=kv_scale,
            interpret=interpret,
            return_lse=return_lse,
            **extra,
        )

    # As attention.py: the xla path with a static KV loop is the backward pass of every backend.
    run = _grad.with_xla_backward(
        functools.partial(call, impl), functools.partial(call, xla, static_loop=True)
    )
    return run(q_nope, q_pe, cache.kv, tables, meta.context_lens, meta.cu_seqlens_q, cache.scale)
