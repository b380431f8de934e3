"""Paged attention: decode tokens, prefill chunks and any mix of them in one call."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jax_paged_attn import _checks, _grad, backends
from jax_paged_attn import reference as xla
from jax_paged_attn._serving_step import serving_step, zero_rows
from jax_paged_attn.cache import KVCache, validated_cache, write_kv
from jax_paged_attn.metadata import AttentionMetadata, validated


@dataclasses.dataclass(frozen=True)
class _Options:
    scale: float
    softcap: float | None
    sliding_window: int | None
    alibi_slopes: jax.Array | None
    sinks: jax.Array | None


def _validated_q(q, cache: KVCache, name: str = "q") -> jax.Array:
    q = _checks.as_array(name, q, ndim=3)
    if q.dtype not in [jnp.dtype(d) for d in _checks.FLOAT_DTYPES]:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {q.dtype}")
    if q.shape[2] != cache.head_dim:
        raise ValueError(
            f"{name} head_dim {q.shape[2]} must equal the cache's head_dim {cache.head_dim}"
        )
    if q.shape[1] % cache.num_kv_heads:
        raise ValueError(
            f"{name} has {q.shape[1]} heads, which must be a multiple of the "
            f"cache's {cache.num_kv_heads} KV heads"
        )
    return q


def _options(num_heads, head_dim, scale, softcap, sliding_window, alibi_slopes, sinks):
    scale = _checks.static_number("scale", scale, none_means="1/sqrt(head_dim)")
    return _Options(
        scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
        softcap=_checks.static_number("softcap", softcap, none_means="no softcap"),
        sliding_window=_checks.static_number(
            "sliding_window", sliding_window, integer=True, none_means="no window"
        ),
        alibi_slopes=_checks.float_vector(
            "alibi_slopes", alibi_slopes, num_heads, "one slope per query head"
        ),
        sinks=_checks.float_vector("sinks", sinks, num_heads, "one logit per query head"),
    )


def _run(
    kind, q, cache, block_tables, context_lens, cu_seqlens_q, opts, backend, interpret, return_lse
):
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    if q.shape[0] == 0 or block_tables.shape[0] == 0 or block_tables.shape[1] == 0:
        return zero_rows(q, return_lse)  # no rows, or no sequence any row could belong to
    op = "decode" if kind == "decode" else "attention"
    config = dict(
        head_dim=cache.head_dim,
        block_size=cache.block_size,
        q_dtype=q.dtype,
        kv_dtype=cache.dtype,
        num_groups=q.shape[1] // cache.num_kv_heads,
    )
    if return_lse:  # only then: a backend without the lse output stays eligible otherwise
        config["return_lse"] = True
    impl = backends.implementation(op, backend, interpret=interpret, config=config)
    decode_impl = _decode_rows_impl(impl, backend, interpret, config) if op == "attention" else None
    static = dict(
        scale=opts.scale,
        softcap=opts.softcap,
        sliding_window=opts.sliding_window,
        return_lse=return_lse,
    )

    def call(impl, q, k, v, tables, lens, cu, alibi, sinks, k_scale, v_scale, **extra):
        kw = dict(static, alibi_slopes=alibi, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
        kw.update(extra, interpret=interpret)
        if kind == "decode":
            return impl.paged_decode(q, k, v, tables, lens, **kw)
        if decode_impl is not None and impl is not xla:  # not the xla backward pass
            return serving_step(
                impl.paged_attention, decode_impl.paged_decode, q, k, v, tables, lens, cu, **kw
            )
        return impl.paged_attention(q, k, v, tables, lens, cu, **kw)

    # Kernels have no autodiff rules, and the xla forward loops over a data-dependent number
    # of KV steps: every backend differentiates through the xla path with a static loop. With
    # return_lse both outputs are differentiable (the xla path returns (out, lse) as well).
    run = _grad.with_xla_backward(
        functools.partial(call, impl), functools.partial(call, xla, static_loop=True)
    )
    return run(
        q,
        cache.k,
        cache.v,
        block_tables,
        context_lens,
        cu_seqlens_q,
        opts.alibi_slopes,
        opts.sinks,
        cache.k_scale,
        cache.v_scale,
    )


# Backends whose prefill kernels spend a whole q tile per query-head group on a decode row:
# their ``paged_attention`` sends one-row sequences to a decode kernel (``_serving_step``).
_SPLIT_STEPS = ("triton", "mosaic")


def _decode_rows_impl(impl, backend, interpret, config):
    """The decode kernels for the one-row sequences of a ``paged_attention`` call on ``impl``
    (``backend``'s choice for ``paged_decode``; ``auto``: the fastest measured), or None: the
    prefill kernels take every row."""
    if impl is xla or backends.name_of(impl) not in _SPLIT_STEPS:
        return None
    if backend != "auto" and not backends.supports(backend, "decode", **config):
        return None  # e.g. a GQA group wider than the decode kernel's tile
    decode = backends.implementation("decode", backend, interpret=interpret, config=config)
    if decode is xla or backends.name_of(decode) not in _SPLIT_STEPS:
        return None
    return decode


def paged_attention(
    q,
    cache: KVCache,
    meta: AttentionMetadata,
    *,
    scale=None,
    softcap=None,
    sliding_window=None,
    alibi_slopes=None,
    sinks=None,
    backend: str = "auto",
    interpret: bool = False,
    return_lse: bool = False,
):
    """Attention of ``q`` (``[T, H, D]``) over the paged cache; returns ``[T, H, D]``.

    Query row ``j`` of sequence ``i`` (``n`` rows, context ``L``) sits at position
    ``p = L - n + j`` and sees keys ``0 <= t <= p`` (and ``t > p - sliding_window``). Logits are
    ``scale * q.k`` (default ``1/sqrt(D)``), then ``softcap * tanh(logit / softcap)``, then
    ``+ alibi_slopes[h] * (t - p)``; ``sinks[h]`` joins the softmax denominator. Softmax and
    accumulation are float32; rows with no visible key are zeros. ``return_lse=True`` returns
    ``(out, lse)``: ``lse`` f32 ``[T, H]``, the natural log of the softmax denominator (the
    sink's term included), ``-inf`` for rows with no visible key (and no finite sink), ``+inf``
    for heads whose sink is ``+inf``; see :func:`merge_attention_states`.

    >>> import jax, jax.numpy as jnp
    >>> from jax_paged_attn import KVCache, AttentionMetadata, write_kv
    >>> cache = KVCache.init(num_blocks=4, block_size=16, num_kv_heads=1, head_dim=8,
    ...                      dtype=jnp.float32)
    >>> # one sequence: a 20-token prompt in blocks 3 and 1 (20 tokens -> 2 blocks, last holds 4)
    >>> slots = jnp.concatenate([3 * 16 + jnp.arange(16), 1 * 16 + jnp.arange(4)])
    >>> k = v = jax.random.normal(jax.random.key(0), (20, 1, 8))
    >>> cache = write_kv(cache, k, v, slots.astype(jnp.int32))
    >>> meta = AttentionMetadata(jnp.array([[3, 1]], jnp.int32), jnp.array([20], jnp.int32),
    ...                          jnp.array([0, 20], jnp.int32))
    >>> q = jax.random.normal(jax.random.key(1), (20, 2, 8))   # 2 query heads share 1 KV head
    >>> paged_attention(q, cache, meta, backend="xla").shape
    (20, 2, 8)
    """
    cache = validated_cache(cache)
    q = _validated_q(q, cache)
    meta = validated(meta, num_tokens=None)
    opts = _options(q.shape[1], q.shape[2], scale, softcap, sliding_window, alibi_slopes, sinks)
    return _run(
        "prefill",
        q,
        cache,
        meta.block_tables,
        meta.context_lens,
        meta.cu_seqlens_q,
        opts,
        backend,
        interpret,
        return_lse,
    )


def paged_decode(
    q,
    cache: KVCache,
    block_tables,
    context_lens,
    *,
    scale=None,
    softcap=None,
    sliding_window=None,
    alibi_slopes=None,
    sinks=None,
    backend: str = "auto",
    interpret: bool = False,
    return_lse: bool = False,
):
    """One query per sequence: ``q`` is ``[S, H, D]``; the same meaning as
    :func:`paged_attention` with ``cu_seqlens_q = arange(S + 1)``, on decode kernels (the KV
    is split across programs when sequences are few and contexts long). ``return_lse=True``
    returns ``(out, lse)``, ``lse`` f32 ``[S, H]``."""
    cache = validated_cache(cache)
    q = _validated_q(q, cache)
    block_tables = _checks.int_array("block_tables", block_tables, ndim=2)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(
            f"block_tables must have one row per query (q has {q.shape[0]}), "
            f"got {block_tables.shape[0]} rows"
        )
    context_lens = _checks.int_array("context_lens", context_lens, ndim=1, shape=(q.shape[0],))
    opts = _options(q.shape[1], q.shape[2], scale, softcap, sliding_window, alibi_slopes, sinks)
    return _run(
        "decode", q, cache, block_tables, context_lens, None, opts, backend, interpret, return_lse
    )


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """A frozen, hashable attention-layer config.

    ``layer(q, k, v, cache, meta)`` writes this step's ``k, v`` (``[T, Hkv, D]``) through
    ``meta.slot_mapping``, then attends (write before read: a prefill chunk sees itself), and
    returns ``(out, new_cache)``. Hashable, so it can be a static argument of ``jax.jit``.

    >>> import jax.numpy as jnp
    >>> layer = PagedAttention(num_heads=8, head_dim=64, num_kv_heads=2, sliding_window=4096)
    >>> hash(layer) == hash(PagedAttention(8, 64, 2, sliding_window=4096))
    True
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    scale: float | None = None
    softcap: float | None = None
    sliding_window: int | None = None
    alibi_slopes: tuple[float, ...] | None = None
    backend: str = "auto"

    def __post_init__(self):
        _checks.static_number("num_heads", self.num_heads, integer=True)
        _checks.static_number("head_dim", self.head_dim, integer=True)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _checks.static_number("num_kv_heads", self.num_kv_heads, integer=True)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        _options(
            self.num_heads, self.head_dim, self.scale, self.softcap, self.sliding_window, None, None
        )
        if self.alibi_slopes is not None:
            slopes = (
                tuple(float(s) for s in jax.device_get(self.alibi_slopes).reshape(-1))
                if hasattr(self.alibi_slopes, "shape")
                else tuple(float(s) for s in self.alibi_slopes)
            )
            if len(slopes) != self.num_heads:
                raise ValueError(
                    f"alibi_slopes must have {self.num_heads} entries (one per "
                    f"query head), got {len(slopes)}"
                )
            object.__setattr__(self, "alibi_slopes", slopes)
        _checks.one_of("backend", self.backend, backends.BACKENDS)

    def __call__(
        self,
        q,
        k,
        v,
        cache: KVCache,
        meta: AttentionMetadata,
        *,
        sinks=None,
        interpret: bool = False,
    ):
        q = _checks.as_array("q", q, ndim=3)
        if q.shape[1:] != (self.num_heads, self.head_dim):
            raise ValueError(
                f"q must have shape [T, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}"
            )
        cache = validated_cache(cache)
        if (cache.num_kv_heads, cache.head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"cache has {cache.num_kv_heads} KV heads of dim {cache.head_dim}; "
                f"the layer expects {self.num_kv_heads} of dim {self.head_dim}"
            )
        meta = validated(meta, num_tokens=q.shape[0], need_slots=True)
        # The layer's backend writes too when it has a KV-write kernel (mosaic has none: auto).
        write_backend = (
            self.backend
            if "kv_write" in backends.TABLE.get(self.backend, backends.TABLE["xla"]).ops
            else "auto"
        )
        cache = write_kv(cache, k, v, meta.slot_mapping, backend=write_backend, interpret=interpret)
        slopes = None if self.alibi_slopes is None else jnp.asarray(self.alibi_slopes, jnp.float32)
        out = paged_attention(
            q,
            cache,
            meta,
            scale=self.scale,
            softcap=self.softcap,
            sliding_window=self.sliding_window,
            alibi_slopes=slopes,
            sinks=sinks,
            backend=self.backend,
            interpret=interpret,
        )
        return out, cache
