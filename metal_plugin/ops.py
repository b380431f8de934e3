"""Entry points of the Metal backend, with the signatures of jax_paged_attn/interfaces.py.

Each builds the kernel specialisations for the static shapes and dtypes, packs the runtime
scalars into two small arrays (``iparams`` i32, ``fparams`` f32: one buffer each instead
of a 0-d input per scalar), and runs them through :func:`metal_plugin.lowering.call`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from metal_plugin import lowering, specs

FP8 = jnp.float8_e4m3fn


def _name(dtype) -> str:
    return jnp.dtype(dtype).name


def _unsupported(what: str, value, allowed) -> NotImplementedError:
    return NotImplementedError(
        f"metal backend: {what}={value!r} is not supported (supported: {allowed}); "
        "use backend='xla' for this configuration"
    )


def check_supported(
    *,
    head_dim=None,
    block_size=None,
    q_dtype=None,
    kv_dtype=None,
    return_lse=False,
    num_groups=None,
    num_tokens=None,
    top_k=None,
    num_experts=None,
    hidden=None,
    inter=None,
    dtype=None,
    activation=None,
    bias=False,
    w_dtype=None,
    act_quant=None,
) -> None:
    """Raises NotImplementedError for configurations the Metal kernels do not cover.

    Attention: ``check_supported(head_dim=, block_size=, q_dtype=, kv_dtype=)``.
    MoE: ``check_supported(num_tokens=, top_k=, num_experts=, hidden=, inter=, dtype=,
    activation=, bias=, w_dtype=, act_quant=)`` (every activation, with or without biases;
    weights in x's dtype: float8 experts run on the xla backend).
    """
    if head_dim is None and block_size is None:
        del bias  # the GEMV kernels take biases
        w_name = None if w_dtype is None else _name(w_dtype)
        if act_quant is not None or (w_name is not None and w_name != _name(dtype or w_dtype)):
            raise NotImplementedError(
                f"metal backend: fused_moe has no float8 expert kernels (weights {w_name}, "
                f'act_quant={act_quant!r}); use backend="xla"'
            )
        if activation is not None and activation not in specs.MOE_ACTIVATIONS:
            raise _unsupported("activation", activation, tuple(specs.MOE_ACTIVATIONS))
        return check_moe_supported(num_tokens=num_tokens, top_k=top_k, dtype=dtype)
    del return_lse, num_groups  # every attention kernel writes the lse, any GQA ratio
    if head_dim not in specs.SUPPORTED_HEAD_DIMS:
        raise _unsupported("head_dim", head_dim, specs.SUPPORTED_HEAD_DIMS)
    if block_size not in specs.SUPPORTED_BLOCK_SIZES:
        raise _unsupported("block_size", block_size, specs.SUPPORTED_BLOCK_SIZES)
    if q_dtype is not None and _name(q_dtype) not in specs.Q_DTYPES:
        raise _unsupported("q_dtype", _name(q_dtype), specs.Q_DTYPES)
    if kv_dtype is not None and _name(kv_dtype) not in specs.KV_DTYPES:
        raise _unsupported("kv_dtype", _name(kv_dtype), specs.KV_DTYPES)


def check_moe_supported(*, num_tokens=None, top_k=1, dtype=None, **_) -> None:
    """The decode GEMV covers decode-shaped batches (num_tokens * top_k <= 256, the API's
    decode/prefill split); prefill-shaped MoE needs a tiled GEMM the Metal backend lacks."""
    if dtype is not None and _name(dtype) not in specs.MOE_DTYPES:
        raise _unsupported("dtype", _name(dtype), specs.MOE_DTYPES)
    pairs = (num_tokens or 0) * (top_k or 1)
    if pairs > specs.MOE_MAX_PAIRS:
        raise NotImplementedError(
            f"metal backend: fused_moe implements the decode GEMV only (num_tokens * top_k <= "
            f"{specs.MOE_MAX_PAIRS}), got {num_tokens} * {top_k}; use backend='xla'"
        )


def _raw(pages):
    """float8 pages travel as their bytes (Metal has no float8 type)."""
    return jax.lax.bitcast_convert_type(pages, jnp.uint8) if pages.dtype == FP8 else pages


def _attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    scale,
    softcap,
    sliding_window,
    alibi_slopes,
    sinks,
    k_scale,
    v_scale,
    interpret,
    decode,
    partition_size,
    return_lse=False,
):
    rows, heads, head_dim = q.shape
    num_blocks, kv_heads, block_size, _ = k_pages.shape
    num_seqs, max_blocks = block_tables.shape
    check_supported(
        head_dim=head_dim, block_size=block_size, q_dtype=q.dtype, kv_dtype=k_pages.dtype
    )
    if partition_size % 32:
        raise ValueError(f"partition_size={partition_size} must be a multiple of 32")
    f32 = jnp.float32
    alibi = jnp.zeros((heads,), f32) if alibi_slopes is None else alibi_slopes.astype(f32)
    sink = jnp.zeros((heads,), f32) if sinks is None else sinks.astype(f32)
    ones = jnp.ones((kv_heads,), f32)
    ks = ones if k_scale is None else k_scale.astype(f32)
    vs = ones if v_scale is None else v_scale.astype(f32)
    iparams = np.array(
        [num_seqs, rows, heads, kv_heads, max_blocks, sliding_window or 0, sinks is not None],
        np.int32,
    )
    fparams = np.array([scale, softcap or 0.0], np.float32)
    num_parts = math.ceil(max_blocks * block_size / partition_size) if decode else 1
    spec = specs.attention(
        q_dtype=_name(q.dtype),
        kv_dtype=_name(k_pages.dtype),
        head_dim=head_dim,
        block_size=block_size,
        num_rows=rows,
        num_heads=heads,
        num_parts=num_parts,
        partition=partition_size,
        decode=decode,
        lse=return_lse,
    )
    outs = lowering.call(
        spec,
        q,
        _raw(k_pages),
        _raw(v_pages),
        # Block ids outside the cache (bad metadata) read a real page, not memory past it:
        # the kernel has no buffer sizes, so the [S, MB] table is clamped here.
        jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1),
        context_lens.astype(jnp.int32),
        cu_seqlens_q.astype(jnp.int32),
        alibi,
        sink,
        ks,
        vs,
        iparams,
        fparams,
        interpret=interpret,
    )
    if num_parts == 1:  # the lse, when asked, comes from the kernel's epilogue
        return (outs[0], outs[1]) if return_lse else outs[0]
    red = specs.attention_reduce(
        q_dtype=_name(q.dtype),
        head_dim=head_dim,
        num_rows=rows,
        num_heads=heads,
        num_parts=num_parts,
        lse=return_lse,
    )
    res = lowering.call(
        red, *outs, sink, np.array([heads, sinks is not None], np.int32), interpret=interpret
    )
    return (res[0], res[1]) if return_lse else res[0]


def paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    scale,
    softcap=None,
    sliding_window=None,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    interpret=False,
    return_lse=False,
):
    """Decode tokens, prefill chunks or any mix: ``q`` ``[T, H, D]`` -> ``[T, H, D]`` (with
    ``return_lse``: and the rows' lse f32 ``[T, H]``).

    One threadgroup of 64 threads per (query row, head) walks the row's visible keys."""
    return _attention(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        cu_seqlens_q,
        scale=scale,
        softcap=softcap,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        interpret=interpret,
        decode=False,
        partition_size=32,
        return_lse=return_lse,
    )


def paged_decode(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    *,
    scale,
    softcap=None,
    sliding_window=None,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    interpret=False,
    partition_size=specs.DECODE_PARTITION,
    return_lse=False,
):
    """One query per sequence: ``q`` ``[S, H, D]``. Contexts longer than
    ``partition_size`` keys are split over threadgroups and combined by a reduce kernel (which
    also writes the lse with ``return_lse``)."""
    cu = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return _attention(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        cu,
        scale=scale,
        softcap=softcap,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        interpret=interpret,
        decode=True,
        partition_size=partition_size,
        return_lse=return_lse,
    )


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, k_scale=None, v_scale=None, interpret=False):
    """Writes ``k, v`` ``[T, Hkv, D]`` at ``slot_mapping``; slots < 0 are skipped.

    The kernel converts the rows to the cache type (float8: ``saturate(x / scale)``); an
    XLA scatter places them, in place when the cache is donated (the custom call cannot
    alias its outputs to its inputs)."""
    tokens, kv_heads, head_dim = k.shape
    num_blocks, _, block_size, _ = k_pages.shape
    if _name(k.dtype) not in specs.Q_DTYPES:
        raise _unsupported("k dtype", _name(k.dtype), specs.Q_DTYPES)
    if _name(k_pages.dtype) not in specs.KV_DTYPES:
        raise _unsupported("cache dtype", _name(k_pages.dtype), specs.KV_DTYPES)
    if tokens == 0:
        return k_pages, v_pages
    ones = jnp.ones((kv_heads,), jnp.float32)
    spec = specs.kv_write(
        src_dtype=_name(k.dtype),
        kv_dtype=_name(k_pages.dtype),
        head_dim=head_dim,
        num_tokens=tokens,
        num_kv_heads=kv_heads,
    )
    slot_mapping = slot_mapping.astype(jnp.int32)
    k_rows, v_rows = lowering.call(
        spec,
        k,
        v.astype(k.dtype),
        slot_mapping,
        ones if k_scale is None else k_scale.astype(jnp.float32),
        ones if v_scale is None else v_scale.astype(jnp.float32),
        interpret=interpret,
    )
    if k_pages.dtype == FP8:
        k_rows = jax.lax.bitcast_convert_type(k_rows, FP8)
        v_rows = jax.lax.bitcast_convert_type(v_rows, FP8)
    # Padding goes to block NB, which mode="drop" discards (a negative index would wrap).
    block = jnp.where(slot_mapping < 0, num_blocks, slot_mapping // block_size)
    offset = jnp.where(slot_mapping < 0, 0, slot_mapping % block_size)
    return (
        k_pages.at[block, :, offset].set(k_rows, mode="drop"),
        v_pages.at[block, :, offset].set(v_rows, mode="drop"),
    )


def fused_moe(
    x,
    w_gate_up,
    w_down,
    topk_weights,
    topk_ids,
    *,
    activation="silu",
    b_gate_up=None,
    b_down=None,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
    interpret=False,
):
    """Decode-shaped fused MoE (two GEMV kernels); see specs.MOE_MAX_PAIRS. The optional
    biases travel as f32 and are added to the GEMV accumulators."""
    tokens, hidden = x.shape
    num_experts, _, inter2 = w_gate_up.shape
    top_k = topk_ids.shape[1]
    check_moe_supported(num_tokens=tokens, top_k=top_k, dtype=x.dtype)
    if _name(w_gate_up.dtype) not in specs.MOE_DTYPES:
        raise _unsupported("weight dtype", _name(w_gate_up.dtype), specs.MOE_DTYPES)
    if activation not in specs.MOE_ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {tuple(specs.MOE_ACTIVATIONS)}, got {activation!r}"
        )
    if tokens == 0:
        return jnp.zeros_like(x)
    inter = inter2 // 2
    iparams = np.array([tokens, top_k, num_experts], np.int32)
    ids = topk_ids.astype(jnp.int32)
    bgu = [] if b_gate_up is None else [b_gate_up.astype(jnp.float32)]
    bd = [] if b_down is None else [b_down.astype(jnp.float32)]
    gu = specs.moe_gate_up(
        x_dtype=_name(x.dtype),
        w_dtype=_name(w_gate_up.dtype),
        hidden=hidden,
        inter=inter,
        num_pairs=tokens * top_k,
        activation=activation,
        bias=bool(bgu),
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
    )
    (h,) = lowering.call(gu, x, w_gate_up, *bgu, ids, iparams, interpret=interpret)
    dn = specs.moe_down(
        x_dtype=_name(x.dtype),
        w_dtype=_name(w_down.dtype),
        hidden=hidden,
        inter=inter,
        num_tokens=tokens,
        bias=bool(bd),
    )
    (y,) = lowering.call(
        dn,
        h,
        w_down.astype(w_gate_up.dtype),
        *bd,
        ids,
        topk_weights.astype(jnp.float32),
        iparams,
        interpret=interpret,
    )
    return y
