"""float64 NumPy oracle of the float8-expert ``fused_moe`` (SPEC 4.2), quantisation modelled.

Written from the SPEC, not from the xla path: the weights are ``W * scale`` in float64 (the
scale broadcast per output channel or per ``(bk, bn)`` block); with
``act_quant="fp8_token_group"`` each GEMM input is quantised per token and per group of
``g = bk`` contiguous features exactly as a w8a8 block-fp8 kernel does it:
``s = max(absmax(group), 1e-10) / 448`` in float32, ``q = e4m3(saturate(v / s))`` (the
division in float32, round to nearest even), and the GEMM sees ``q * s``. A kernel that uses
another group or block size, skips the saturation or forgets a scale does not match it.
"""

from __future__ import annotations

import numpy as np

from jax_paged_attn.testing import oracle
from jax_paged_attn.testing.oracle import FP8, FP8_MAX, _f64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_weight(w, scale, block_shape=None) -> np.ndarray:
    """``W * scale`` in float64 for ``w`` ``[E, K, N]`` (float8 or any float) and its scale:
    ``[E, N]`` per output channel (``block_shape`` None) or ``[E, ceil(K/bk), ceil(N/bn)]``,
    element ``[e, i, n]`` scaling ``W[e, i*bk:(i+1)*bk, n*bn:(n+1)*bn]``."""
    w, scale = _f64(w), _f64(scale)
    _, k, n = w.shape
    if block_shape is None:
        assert scale.shape == (w.shape[0], n), scale.shape
        return w * scale[:, None, :]
    bk, bn = block_shape
    assert scale.shape == (w.shape[0], _cdiv(k, bk), _cdiv(n, bn)), scale.shape
    out = np.empty_like(w)
    for i in range(_cdiv(k, bk)):
        for j in range(_cdiv(n, bn)):
            rows, cols = slice(i * bk, (i + 1) * bk), slice(j * bn, (j + 1) * bn)
            out[:, rows, cols] = w[:, rows, cols] * scale[:, i, j][:, None, None]
    return out


def quantize_token_groups(v, group: int) -> np.ndarray:
    """``q * s`` (float64) for each row of ``v`` ``[..., K]`` and each group of ``group``
    contiguous features (the last one possibly shorter): ``s = max(absmax, 1e-10) / 448``
    (float32), ``q = e4m3(clip(v / s, -448, 448))`` with ``v / s`` in float32."""
    v32 = np.asarray(v).astype(np.float32)
    out = np.empty(v32.shape, np.float64)
    for start in range(0, v32.shape[-1], group):
        part = v32[..., start : start + group]
        absmax = np.max(np.abs(part), axis=-1, keepdims=True)
        s = np.maximum(absmax, np.float32(1e-10)) / np.float32(FP8_MAX)
        assert s.dtype == np.float32
        q = np.clip(part / s, -FP8_MAX, FP8_MAX).astype(np.float32).astype(FP8)
        out[..., start : start + group] = q.astype(np.float64) * s.astype(np.float64)
    return out


def fused_moe_fp8(
    x,
    w_gate_up,
    w_down,
    weights,
    ids,
    w_gate_up_scale,
    w_down_scale,
    *,
    block_shape=None,
    act_quant=None,
    activation="silu",
    b_gate_up=None,
    b_down=None,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
    h_dtype=None,
) -> np.ndarray:
    """SPEC 4.2's ``y[t] = sum_j weights[t, j] * (glu(X(x[t]) @ Wgu'[e] + bgu[e]) @ Wd'[e] +
    bd[e])`` with ``W' = W * scale`` (:func:`dequantize_weight`) and ``X`` the identity or,
    for ``act_quant="fp8_token_group"``, :func:`quantize_token_groups` with ``g = bk`` (applied
    to ``h`` as well). ``h_dtype``: ``h`` is rounded to it first, as a kernel that passes the
    intermediate through ``x.dtype`` does. Ids outside ``[0, E)`` contribute zero."""
    if act_quant not in (None, "fp8_token_group"):
        raise ValueError(f"unknown act_quant {act_quant!r}")
    if act_quant is not None and block_shape is None:
        raise ValueError("act_quant needs block_shape")

    def quant(v):
        return v if act_quant is None else quantize_token_groups(v, block_shape[0])

    return oracle.fused_moe(
        x,
        dequantize_weight(w_gate_up, w_gate_up_scale, block_shape),
        dequantize_weight(w_down, w_down_scale, block_shape),
        weights,
        ids,
        activation,
        h_dtype=h_dtype,
        b_gate_up=b_gate_up,
        b_down=b_down,
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        quantize=quant,
    )


def quantize_weight(w, block_shape=None):
    """Test helper: float8 weights and float32 scales for real weights ``w`` ``[E, K, N]``,
    as checkpoints store them: ``scale = absmax / 448`` per output channel or per block, the
    float8 values ``e4m3(w / scale)``. Returns ``(w8, scale)`` as NumPy arrays."""
    w = np.asarray(w, np.float64)
    e, k, n = w.shape
    if block_shape is None:
        scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / FP8_MAX
        expanded = scale[:, None, :]
    else:
        bk, bn = block_shape
        kb, nb = _cdiv(k, bk), _cdiv(n, bn)
        pad = np.zeros((e, kb * bk, nb * bn))
        pad[:, :k, :n] = np.abs(w)
        scale = np.maximum(pad.reshape(e, kb, bk, nb, bn).max(axis=(2, 4)), 1e-12) / FP8_MAX
        expanded = np.repeat(np.repeat(scale, bk, axis=1)[:, :k], bn, axis=2)[:, :, :n]
    scale = scale.astype(np.float32)
    expanded = expanded.astype(np.float32)
    w8 = np.clip(w.astype(np.float32) / expanded, -FP8_MAX, FP8_MAX).astype(FP8)
    return w8, scale
