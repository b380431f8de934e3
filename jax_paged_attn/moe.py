"""Mixture of experts: routing (``moe_topk``) and the fused expert computation (``fused_moe``)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jax_paged_attn import _checks, _grad, backends, reference, reference_moe

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = reference.MOE_ACTIVATIONS
ACT_QUANTS = (None, *reference_moe.ACT_QUANTS)
FP8 = reference_moe.FP8


def moe_topk(
    router_logits,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    correction_bias=None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
):
    """Routes each token to ``top_k`` experts; returns ``(f32[T, k] weights, i32[T, k] ids)``.

    ``softmax``: softmax over all experts, then top-k. ``sigmoid``: sigmoid scores; a
    ``correction_bias`` (``[E]``) is added for *selection only* (DeepSeek-V3). With
    ``num_expert_group``/``topk_group`` the experts form groups, each scored by the sum of its
    top-2 scores, and only the best ``topk_group`` groups stay selectable. ``renormalize``
    divides the k weights by their sum; then all are multiplied by ``routed_scaling_factor``.
    Runs on the device with no host sync.

    >>> import jax.numpy as jnp
    >>> w, ids = moe_topk(jnp.array([[1.0, 3.0, 2.0, 0.0]]), 2, renormalize=True)
    >>> ids.tolist(), [round(x, 3) for x in w[0].tolist()]
    ([[1, 2]], [0.731, 0.269])
    """
    logits = _checks.as_array("router_logits", router_logits, ndim=2)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"router_logits must be a float array, got dtype {logits.dtype}")
    num_experts = logits.shape[1]
    top_k = _checks.static_number("top_k", top_k, integer=True)
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= the number of experts ({num_experts})")
    _checks.one_of("scoring", scoring, SCORINGS)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be a bool, got {renormalize!r}")
    routed_scaling_factor = _checks.static_number(
        "routed_scaling_factor", routed_scaling_factor, none_means="1.0"
    )
    bias = _checks.float_vector("correction_bias", correction_bias, num_experts, "one per expert")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError(
            "num_expert_group and topk_group must be given together "
            f"(got num_expert_group={num_expert_group}, topk_group={topk_group})"
        )
    if num_expert_group is not None:
        num_expert_group = _checks.static_number("num_expert_group", num_expert_group, integer=True)
        topk_group = _checks.static_number("topk_group", topk_group, integer=True)
        if num_experts % num_expert_group:
            raise ValueError(
                f"num_expert_group ({num_expert_group}) must divide the number "
                f"of experts ({num_experts})"
            )
        if topk_group > num_expert_group:
            raise ValueError(
                f"topk_group ({topk_group}) must be <= num_expert_group ({num_expert_group})"
            )
        if top_k > topk_group * (num_experts // num_expert_group):
            raise ValueError(f"top_k ({top_k}) exceeds the experts of the {topk_group} kept groups")

    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)
    select = scores if bias is None else scores + bias
    if num_expert_group is not None:
        per_group = num_experts // num_expert_group
        grouped = select.reshape(-1, num_expert_group, per_group)
        top2 = lax.top_k(grouped, min(2, per_group))[0]
        group_score = jnp.sum(top2, axis=-1)  # [T, G]
        _, keep = lax.top_k(group_score, topk_group)
        keep_mask = (
            jnp.zeros_like(group_score, bool)
            .at[jnp.arange(group_score.shape[0])[:, None], keep]
            .set(True)
        )
        select = jnp.where(jnp.repeat(keep_mask, per_group, axis=-1), select, -jnp.inf)
    _, ids = lax.top_k(select, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * routed_scaling_factor, ids.astype(jnp.int32)


def _bias(name: str, b, shape: tuple, w_dtype):
    """An optional expert bias of ``shape`` in the weights' dtype or float32."""
    if b is None:
        return None
    b = _checks.as_array(name, b, ndim=len(shape))
    if tuple(b.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(b.shape)}")
    if b.dtype not in (jnp.dtype(w_dtype), jnp.dtype(jnp.float32)):
        raise ValueError(f"{name} dtype {b.dtype} must be the weights' {w_dtype} or float32")
    return b


def _block_shape(block_shape):
    """None, or ``(bk, bn)``: two positive Python ints."""
    if block_shape is None:
        return None
    ok = isinstance(block_shape, (tuple, list)) and len(block_shape) == 2
    ok = ok and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_shape)
    if not ok:
        raise ValueError(
            f"block_shape must be None or (bk, bn), two positive ints, got {block_shape!r}"
        )
    return tuple(block_shape)


def _scale(name: str, scale, shape: tuple, mode: str):
    """A float8 weight's float32 scale of ``shape``; ``mode`` names the layout for messages."""
    if scale is None:
        raise ValueError(f"float8_e4m3fn weights need {name} (float32 {shape}, {mode})")
    scale = _checks.as_array(name, scale)
    if scale.dtype != jnp.float32 or tuple(scale.shape) != shape:
        raise ValueError(
            f"{name} must be float32 {shape} ({mode}), got {scale.dtype} {tuple(scale.shape)}"
        )
    return scale


def _quant_args(w_gate_up, w_down, w_gate_up_scale, w_down_scale, block_shape, act_quant):
    """Validates SPEC 4.2's arguments; returns the scales and ``block_shape`` (normalised)."""
    if act_quant not in ACT_QUANTS:
        raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
    block_shape = _block_shape(block_shape)
    fp8 = [w.dtype == FP8 for w in (w_gate_up, w_down)]
    if fp8[0] != fp8[1]:
        raise ValueError(
            f"w_gate_up ({w_gate_up.dtype}) and w_down ({w_down.dtype}) must both be "
            "float8_e4m3fn or both x's dtype"
        )
    if not fp8[0]:
        given = [
            name
            for name, v in (
                ("w_gate_up_scale", w_gate_up_scale),
                ("w_down_scale", w_down_scale),
                ("block_shape", block_shape),
                ("act_quant", act_quant),
            )
            if v is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} apply to float8_e4m3fn weights only; the weights are "
                f"{w_gate_up.dtype} (pass float8_e4m3fn weights, or leave them out)"
            )
        return None, None, None
    if act_quant is not None and block_shape is None:
        raise ValueError(f'act_quant="{act_quant}" needs block_shape (its group size is bk)')
    num_experts, hidden, inter2 = w_gate_up.shape
    if block_shape is None:
        mode = "one scale per output channel"
        gu_shape, d_shape = (num_experts, inter2), (num_experts, hidden)
    else:
        bk, bn = block_shape
        mode = f"one scale per {bk}x{bn} block"
        cdiv = lambda a, b: -(-a // b)  # noqa: E731
        gu_shape = (num_experts, cdiv(hidden, bk), cdiv(inter2, bn))
        d_shape = (num_experts, cdiv(inter2 // 2, bk), cdiv(hidden, bn))
    return (
        _scale("w_gate_up_scale", w_gate_up_scale, gu_shape, mode),
        _scale("w_down_scale", w_down_scale, d_shape, mode),
        block_shape,
    )


def _swiglu_param(name: str, value) -> float:
    value = _checks.static_number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def fused_moe(
    x,
    w_gate_up,
    w_down,
    weights,
    ids,
    *,
    activation: str = "silu",
    b_gate_up=None,
    b_down=None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    w_gate_up_scale=None,
    w_down_scale=None,
    block_shape=None,
    act_quant=None,
    backend: str = "auto",
    interpret: bool = False,
):
    """``y[t] = sum_j weights[t, j] * (glu(x[t] @ Wgu[e] + bgu[e]) @ Wd[e] + bd[e])``,
    ``e = ids[t, j]``; gate ``g`` = first ``I`` columns of ``w_gate_up[e]`` (and of
    ``b_gate_up[e]``), up ``u`` = last ``I``; ``glu = act(g) * u``, or for ``swigluoai``
    (gpt-oss) ``(clip(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')``, ``g' = min(g, limit)``.

    ``x`` ``[T, Hd]``, ``w_gate_up`` ``[E, Hd, 2I]``, ``w_down`` ``[E, I, Hd]``, ``weights``
    ``[T, k]``, ``ids`` int ``[T, k]``; optional ``b_gate_up`` ``[E, 2I]`` and ``b_down``
    ``[E, Hd]`` in the weights' dtype or float32 (any activation). ``swiglu_alpha`` and
    ``swiglu_limit`` (finite, > 0) are validated always and used by ``swigluoai`` only. An id
    outside ``[0, E)`` contributes zero (expert parallelism: experts owned by another device).
    f32 accumulation, the intermediate rounded to ``x.dtype``, output in ``x.dtype``.

    float8 experts (``docs/float8.md``): ``w_gate_up`` and ``w_down`` in ``float8_e4m3fn`` with
    float32 scales, the real weight being ``W * scale``: per output channel (``block_shape``
    None; ``w_gate_up_scale`` ``[E, 2I]``, ``w_down_scale`` ``[E, Hd]``) or per block
    (``block_shape=(bk, bn)``; ``[E, ceil(Hd/bk), ceil(2I/bn)]`` and
    ``[E, ceil(I/bk), ceil(Hd/bn)]``). ``act_quant="fp8_token_group"`` (needs ``block_shape``)
    also quantises both GEMM inputs to e4m3 per token and group of ``bk`` features. Scales,
    ``block_shape`` or ``act_quant`` with weights in ``x.dtype`` are a ValueError. Runs on the
    ``xla`` backend only for now (``auto`` picks it; kernel backends raise). The float8 weights
    get a zero gradient.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.ones((3, 8)); wgu = jnp.ones((4, 8, 2 * 16)) / 8; wd = jnp.ones((4, 16, 8)) / 16
    >>> w, ids = moe_topk(jax.random.normal(jax.random.key(0), (3, 4)), 2)
    >>> fused_moe(x, wgu, wd, w, ids, backend="xla").shape
    (3, 8)
    """
    x = _checks.as_array("x", x, ndim=2)
    if x.dtype not in [jnp.dtype(d) for d in _checks.FLOAT_DTYPES]:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    w_gate_up = _checks.as_array("w_gate_up", w_gate_up, ndim=3)
    w_down = _checks.as_array("w_down", w_down, ndim=3)
    num_experts, hidden, inter2 = w_gate_up.shape
    if hidden != x.shape[1]:
        raise ValueError(
            f"w_gate_up must be [E, {x.shape[1]}, 2I] (hidden size of x), "
            f"got {tuple(w_gate_up.shape)}"
        )
    if inter2 % 2:
        raise ValueError(f"w_gate_up's last dim must be 2I (gate and up), got {inter2}")
    if w_down.shape != (num_experts, inter2 // 2, hidden):
        raise ValueError(
            f"w_down must have shape {(num_experts, inter2 // 2, hidden)}, "
            f"got {tuple(w_down.shape)}"
        )
    w_gate_up_scale, w_down_scale, block_shape = _quant_args(
        w_gate_up, w_down, w_gate_up_scale, w_down_scale, block_shape, act_quant
    )
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype and w.dtype != FP8:
            raise ValueError(
                f"{name} dtype {w.dtype} must match x's {x.dtype} (or be float8_e4m3fn)"
            )
    b_gate_up = _bias("b_gate_up", b_gate_up, (num_experts, inter2), x.dtype)
    b_down = _bias("b_down", b_down, (num_experts, hidden), x.dtype)
    ids = _checks.int_array("ids", ids, ndim=2)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids must have one row per token ({x.shape[0]}), got {ids.shape[0]}")
    weights = _checks.as_array("weights", weights, ndim=2)
    if weights.shape != ids.shape:
        raise ValueError(
            f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}"
        )
    _checks.one_of("activation", activation, ACTIVATIONS)
    swiglu_alpha = _swiglu_param("swiglu_alpha", swiglu_alpha)
    swiglu_limit = _swiglu_param("swiglu_limit", swiglu_limit)
    weights = weights.astype(jnp.float32)
    case = "decode" if x.shape[0] * ids.shape[1] <= 256 else "prefill"

    config = dict(
        num_tokens=x.shape[0],
        top_k=ids.shape[1],
        num_experts=num_experts,
        hidden=hidden,
        inter=inter2 // 2,
        dtype=x.dtype,
        activation=activation,
        bias=b_gate_up is not None or b_down is not None,
        w_dtype=w_gate_up.dtype,
        act_quant=act_quant,
    )
    impl = backends.implementation("moe", backend, interpret=interpret, case=case, config=config)
    opts = dict(activation=activation, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    if w_gate_up_scale is not None:  # float8 experts: only the xla backend accepts these
        opts.update(block_shape=block_shape, act_quant=act_quant)
    scales = dict(w_gate_up_scale=w_gate_up_scale, w_down_scale=w_down_scale)

    def call(impl, x, w_gate_up, w_down, weights, ids, b_gate_up, b_down, scales):
        return impl.fused_moe(
            x,
            w_gate_up,
            w_down,
            weights,
            ids,
            b_gate_up=b_gate_up,
            b_down=b_down,
            interpret=interpret,
            **{k: v for k, v in scales.items() if v is not None},
            **opts,
        )

    run = functools.partial(call, impl)
    if impl is not reference:  # kernels have no autodiff rules: the xla path differentiates
        run = _grad.with_xla_backward(run, functools.partial(call, reference))
    return run(x, w_gate_up, w_down, weights, ids, b_gate_up, b_down, scales)
