"""Pieces shared by the MoE kernel backends: activations, validation, the top-k combine.

The activations are written with primitives every Pallas GPU lowering has: Pallas Triton
has no ``erf``, so ``gelu`` uses a rational approximation of erf (the Eigen/XLA f32 one,
max abs error 3e-7 against the exact erf, i.e. f32 rounding level).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")  # swigluoai: gpt-oss, gated
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))

# erf(x) ~= x * P(x^2) / Q(x^2) on [-c, c], c = erfinv(1 - 2^-23): beyond c, erf is +-1 in f32.
_ERF_CLAMP = 3.832506856900711
_ERF_ALPHA = (
    0.00022905065861350646,
    0.0034082910107109506,
    0.050955695062380861,
    0.18520832239976145,
    1.128379143519084,
)
_ERF_BETA = (
    -1.1791602954361697e-7,
    0.000023547966471313185,
    0.0010179625278914885,
    0.014070470171167667,
    0.11098505178285181,
    0.49746925110067538,
    1.0,
)


def erf_f32(x):
    """f32 erf from mul/add/div/clamp only (lowers on Triton, Mosaic GPU and the CPU)."""
    x = jnp.clip(x, -_ERF_CLAMP, _ERF_CLAMP)
    x2 = x * x
    p = jnp.full_like(x, _ERF_ALPHA[0])
    for c in _ERF_ALPHA[1:]:
        p = p * x2 + c
    q = jnp.full_like(x, _ERF_BETA[0])
    for c in _ERF_BETA[1:]:
        q = q * x2 + c
    return x * p / q


def apply_activation(gate, activation: str):
    """act(gate) in f32 for the unary activations; ``gate`` is the f32 accumulator tile."""
    if activation == "silu":
        # x * sigmoid(x), written with exp so it lowers everywhere; exp(-x) -> inf gives 0.
        return gate / (1.0 + jnp.exp(-gate))
    if activation == "gelu":
        return 0.5 * gate * (1.0 + erf_f32(gate * (1.0 / math.sqrt(2.0))))
    if activation == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (1.0 + jnp.tanh(inner))
    raise ValueError(f"{activation=} must be one of {ACTIVATIONS[:3]}")


def glu(gate, up, activation: str, alpha: float = 1.702, limit: float = 7.0):
    """The epilogue's h from the f32 gate and up tiles (biases already added):
    ``act(gate) * up``, or for ``swigluoai`` ``(clip(up, -limit, limit) + 1) * g *
    sigmoid(alpha * g)`` with ``g = min(gate, limit)`` (exp(-alpha g) -> inf gives -0)."""
    if activation == "swigluoai":
        g = jnp.minimum(gate, limit)
        return (jnp.clip(up, -limit, limit) + 1.0) * (g / (1.0 + jnp.exp(-alpha * g)))
    return apply_activation(gate, activation) * up


def check_supported(
    *,
    dtype,
    backend: str,
    activation: str = "silu",
    w_dtype=None,
    act_quant=None,
    bias=False,
    **_shape,
) -> None:
    """Raises NotImplementedError for what the kernel backends cannot run.

    Every shape runs (edge tiles are masked), with or without biases (``bias``: whether the
    call has any); what is refused is the dtype (one float dtype for x and both weights
    among bf16/f16/f32; float8 experts, ``w_dtype`` float8_e4m3fn or an ``act_quant``, run on
    the xla backend only for now) and an unknown activation.
    """
    del bias
    dtype = jnp.dtype(dtype)
    w_dtype = dtype if w_dtype is None else jnp.dtype(w_dtype)
    if w_dtype == jnp.dtype(jnp.float8_e4m3fn) or act_quant is not None:
        raise NotImplementedError(
            f"fused_moe backend={backend!r} has no float8 expert kernels yet (weights "
            f'{w_dtype.name}, act_quant={act_quant!r}); use backend="xla" (backend="auto" '
            "picks it for float8 experts)"
        )
    if dtype not in SUPPORTED_DTYPES or w_dtype != dtype:
        raise NotImplementedError(
            f"fused_moe backend={backend!r} supports x and weights of one dtype among "
            f"{[d.name for d in SUPPORTED_DTYPES]}, got x {dtype.name} and weights "
            f'{w_dtype.name}; use backend="xla" for other combinations'
        )
    if activation not in ACTIVATIONS:
        raise NotImplementedError(
            f"fused_moe backend={backend!r} supports activation in {ACTIVATIONS}, got "
            f'{activation!r}; use backend="xla"'
        )


def combine(rows_out, positions, num_tokens: int, top_k: int, out_dtype):
    """y[t] = sum_s sum_j rows_out[s, positions[t*k + j]] in f32, without a scatter.

    ``rows_out`` f32[P, Hd] (or f32[S, P, Hd]: S partial sums over split K ranges) is the
    down-GEMM output in padded expert order, already scaled by the routing weights; slots
    with ids outside [0, E) have ``position == P`` and read 0. Only rows named by
    ``positions`` are read (rows of unused tiles may hold anything). One XLA fusion.
    """
    parts = rows_out if rows_out.ndim == 3 else rows_out[None]
    g = jnp.take(parts, positions, axis=1, mode="fill", fill_value=0)  # [S, N, Hd]
    g = g.reshape(parts.shape[0], num_tokens, top_k, parts.shape[-1]).astype(jnp.float32)
    return jnp.sum(g, axis=(0, 2)).astype(out_dtype)
