"""The ``xla`` backend's fused MoE: pure JAX, runs on every platform, the readable oracle.

The ``N = T * k`` (token, expert) pairs are sorted by expert once (one ``argsort``); then one of
two forms, chosen per static shape by :func:`moe_plan`:

- **capacity** (the default). Expert ``e``'s first ``C`` pairs fill the slots ``[e, 0:C]`` of an
  ``[E, C, Hd]`` array of gathered rows (empty slots are zero rows), and two matmuls batched
  over the expert axis, ``[E, C, Hd] @ [E, Hd, 2I]`` and ``[E, C, I] @ [E, I, Hd]``, run every
  expert's rows at once: on a GPU each is one batched GEMM that reads each expert's weights
  once. ``C`` (:func:`capacity`) is the mean rows per expert plus four standard deviations of
  a uniform routing, rounded up to 16: ``E * C`` is about ``N + 4 sqrt(N E) + 16 E`` rows
  (DeepSeek-V3 at 4096 tokens: 1.4 N), so memory grows with the routed rows, never with
  ``E x T``. Pairs past an expert's first ``C`` (a skewed routing) go through the tile loop
  below; with a balanced routing there are none and the loop runs no step. The combine gathers
  each pair's output row from its slot, so an empty slot is never read.
- **loop**, when the pairs are fewer than a quarter of the experts (``4 N < E``: decoding a few
  tokens over many experts, where the batched form would read the weights of experts nobody
  chose; on an H200 the loop reads weights at about 1 TB/s, the batched form at 4-4.3 TB/s):
  the expert-sorted pairs are cut into tiles of ``block`` rows of one expert, and a loop over
  the tiles in use runs one expert's two matmuls per tile.

Why not ``lax.ragged_dot``: XLA's GPU lowering (jax 0.11) expands it over every group: an
``[E, N, Hd]`` temporary (112 GiB for DeepSeek-V3 at 4096 tokens) and ``E`` times the FLOPs.
Measured on an H200 in bf16 (``scripts/moe_xla_probe.py``, GPU busy time): Mixtral at 4096
tokens 655 TFLOP/s (``ragged_dot`` gate-up + down alone: 99; the tile loop alone: 221),
DeepSeek-V3 at 4096 tokens 413 TFLOP/s with 1.4 GiB of temporaries (``ragged_dot``: out of
memory), 64-token decodes 3.7-4.3 TB/s of the expert weights touched (the tile loop: ~1).

Exactness: an empty slot's gate/up accumulators are set to 0 before the activation (which maps
0 to 0), and its output row is never read; so an expert no token selects, NaN or Inf in its
weights included, reaches no output, and its gradient (biases included) is exactly zero.
float32 matmuls run at ``Precision.HIGHEST`` (not TF32 on GPUs); half-precision ones accumulate
in float32. The custom VJP recomputes the forward (memory: the routed rows again, no stored
``[E, C, 2I]`` activations between the passes).

float8 experts (SPEC 4.2, :class:`Quant`): the weights are dequantised to ``x.dtype``
(``W.astype(f32) * scale`` rounded to ``x.dtype``) inside each form's matmul function, so XLA
may fuse the dequantisation into the GEMM operand: a tile of the loop dequantises its one
expert; the capacity form, batched over the experts, dequantises all ``E`` experts' weights
(a temporary of the weights' size in ``x.dtype`` per call, as large as bf16 weights would be).
With ``act_quant="fp8_token_group"`` each GEMM input (``x``, then ``h`` rounded to ``x.dtype``)
is replaced by ``e4m3(v / s) * s`` per token and group of ``bk`` features (:func:`quantize_groups`),
and the matmuls take float32 operands at ``HIGHEST`` (``q * s`` and ``W * scale`` exactly, as an
e4m3 GEMM with f32 scaling has them; rounding them to bf16 would flip the rounding of the next
quantisation: 1.5% error instead of 0.4%), slower on GPUs than the kernels will be. Gradients: the float8 weights get zero (they are
frozen, not trainable); ``x``, the routing weights, the biases and the scales get theirs, the
activation quantisation acting as the identity (straight-through).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST

ACTIVATIONS = {  # unary activations of the gate: h = act(gate) * up
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
# Every fused_moe activation: the unary ones and gpt-oss's clamped SwiGLU.
MOE_ACTIVATIONS = (*ACTIVATIONS, "swigluoai")
PATHS = ("auto", "capacity", "loop")
FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite e4m3fn value
ACT_QUANTS = ("fp8_token_group",)


class Quant(NamedTuple):
    """Static description of float8 experts: ``block_shape`` ``(bk, bn)`` or None (one scale
    per output channel) and ``act_quant`` (None or "fp8_token_group", group ``bk``)."""

    block_shape: tuple | None
    act_quant: str | None


def dequantize_weight(w, scale, block_shape, dtype):
    """``W * scale`` in ``dtype`` for ``w`` ``[..., K, N]`` (float8) and its scale: ``[..., N]``
    per channel (``block_shape`` None), else ``[..., ceil(K/bk), ceil(N/bn)]`` per block. The
    float8 values get no gradient (frozen weights); the scale does."""
    k, n = w.shape[-2:]
    if block_shape is None:
        s = scale[..., None, :]
    else:
        bk, bn = block_shape
        s = jnp.repeat(scale, bk, axis=-2)[..., :k, :]
        s = jnp.repeat(s, bn, axis=-1)[..., :n]
    return (lax.stop_gradient(w.astype(jnp.float32)) * s).astype(dtype)


def quantize_groups(v, group: int):
    """``e4m3(v / s) * s`` in f32 per row and group of ``group`` contiguous features of the last
    axis (the last group may be shorter), ``s = max(absmax(group), 1e-10) / 448``: SPEC 4.2's
    activation quantisation. The gradient is the identity (straight-through)."""
    v = v.astype(jnp.float32)
    k = v.shape[-1]
    pad = -k % group
    vp = jnp.pad(lax.stop_gradient(v), [(0, 0)] * (v.ndim - 1) + [(0, pad)])
    vg = vp.reshape(*v.shape[:-1], (k + pad) // group, group)
    absmax = jnp.maximum(jnp.max(jnp.abs(vg), axis=-1, keepdims=True), 1e-10)
    # Exact IEEE divisions (the rounding to e4m3 hinges on them: ties are common for bf16 inputs):
    # the barriers keep XLA from rewriting ``a / 448`` and ``a / broadcast(s)`` as multiplications
    # by a rounded reciprocal.
    s = absmax / lax.optimization_barrier(jnp.full(absmax.shape, FP8_MAX, jnp.float32))
    s = lax.optimization_barrier(jnp.broadcast_to(s, vg.shape))
    q = jnp.clip(vg / s, -FP8_MAX, FP8_MAX).astype(FP8).astype(jnp.float32) * s
    q = q.reshape(vp.shape)[..., :k]
    return q + (v - lax.stop_gradient(v))  # the value q, the derivative 1


def moe_glu(gate, up, activation: str, alpha: float, limit: float):
    """h from the f32 gate and up halves: ``act(gate) * up``, or for ``swigluoai``
    ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
    Every form maps ``gate = up = 0`` to exactly 0."""
    if activation == "swigluoai":
        g = jnp.minimum(gate, limit)
        return (jnp.clip(up, -limit, limit) + 1.0) * g * jax.nn.sigmoid(alpha * g)
    return ACTIVATIONS[activation](gate) * up


# ------------------------------------------------------------------------------ the plan


def capacity(num_pairs: int, num_experts: int, top_k: int) -> int:
    """Slots per expert of the capacity form: ``mean + 4 sd + 1`` rows of a uniform routing
    (an expert's count is Binomial(T, k / E): mean ``N / E``, variance ``mean (1 - k / E)``),
    rounded up to a multiple of 16 and at most ``N``."""
    mean = num_pairs / num_experts
    sd = math.sqrt(mean * max(0.0, 1.0 - top_k / num_experts))
    slots = -(-math.ceil(mean + 4.0 * sd + 1.0) // 16) * 16
    return min(slots, num_pairs)


def _loop_block(num_pairs: int, num_experts: int) -> int:
    """Rows per tile of the loop form: twice the mean rows per selected expert, so most experts
    fit one tile (their weights are read about once), a power of two in [8, 256]."""
    mean = -(-num_pairs // max(1, min(num_experts, num_pairs)))
    return min(256, max(8, 1 << max(0, 2 * mean - 1).bit_length()))


class Plan(NamedTuple):
    """The static plan of the xla fused MoE for one shape (:func:`moe_plan`)."""

    form: str  # "capacity" or "loop"
    capacity: int  # slots per expert (0 in the loop form)
    block: int  # rows per tile of the loop (capacity form: the pairs past an expert's slots)
    overflow: bool  # whether the loop is compiled in (pairs past the slots can exist)


def moe_plan(num_tokens: int, top_k: int, num_experts: int, path: str = "auto") -> Plan:
    """The form of the xla fused MoE for a shape: "capacity" unless the pairs are fewer than a
    quarter of the experts (``path`` forces one).

    >>> moe_plan(4096, 8, 256)  # DeepSeek-V3 routing, 4096 tokens
    Plan(form='capacity', capacity=176, block=256, overflow=True)
    >>> moe_plan(1, 8, 256)  # one decode token: the 8 selected experts only
    Plan(form='loop', capacity=0, block=8, overflow=True)
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    num_pairs = num_tokens * top_k
    form = path
    if path == "auto":
        form = "capacity" if 4 * num_pairs >= num_experts else "loop"
    if form == "loop":
        block = _loop_block(num_pairs, num_experts)
        return Plan("loop", 0, block, True)
    cap = capacity(num_pairs, num_experts, top_k)
    block = min(256, max(16, 1 << (cap - 1).bit_length()))
    return Plan("capacity", cap, block, cap < num_pairs)


# ------------------------------------------------------------------------------ routing


def _vary(xs, tree):
    """Inside ``shard_map`` (check_vma), loop carries must vary over the manual axes the inputs
    ``xs`` vary over; leaves already varying over some of them are cast over the rest only."""

    def axes(a):
        aval = jax.typeof(a)
        axis_type = getattr(aval, "manual_axis_type", None)  # jax 0.11; older: aval.vma
        return set(axis_type.varying if axis_type is not None else getattr(aval, "vma", ()))

    want = set().union(*(axes(x) for x in xs))
    if not want:
        return tree

    def cast(a):
        missing = tuple(sorted(want - axes(a)))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _sort_pairs(topk_ids, num_experts: int):
    """``(key, order, counts, starts)``: each pair's expert (``E`` for ids outside [0, E)),
    the pairs in expert order (stable; foreign pairs last), rows per expert and each expert's
    first position in ``order``."""
    flat = topk_ids.reshape(-1)
    key = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts).astype(jnp.int32)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    return key, order, counts, starts


def _slots(key, order, counts, starts, cap: int):
    """The capacity form's slots: ``slot_pair`` i32[E, C] (the pair in each slot, ``N`` when
    empty), ``ok`` bool[E, C] (slot holds a pair) and ``pair_slot`` i32[N] (each pair's flat
    slot ``e * C + rank``, ``E * C`` for a foreign pair or one past its expert's capacity)."""
    num_pairs = order.shape[0]
    num_experts = counts.shape[0]
    c = jnp.arange(cap, dtype=jnp.int32)
    ok = c[None, :] < counts[:, None]
    pos = jnp.minimum(starts[:, None] + c[None, :], num_pairs - 1)
    slot_pair = jnp.where(ok, order[pos], num_pairs)
    key_sorted = key[order]
    starts_ext = jnp.concatenate([starts, jnp.zeros((1,), jnp.int32)])
    rank = jnp.arange(num_pairs, dtype=jnp.int32) - starts_ext[key_sorted]
    fits = (key_sorted < num_experts) & (rank < cap)
    slot_sorted = jnp.where(fits, key_sorted * cap + rank, num_experts * cap)
    pair_slot = jnp.zeros((num_pairs,), jnp.int32).at[order].set(slot_sorted, unique_indices=True)
    return slot_pair, ok, pair_slot


def _tiles(order, counts, starts, block: int, skip: int):
    """The loop's tiles: each expert's pairs from rank ``skip`` on, cut into tiles of ``block``
    rows. Returns per tile ``expert``, ``first`` (its first position in ``order``) and ``rows``
    (i32[NT] each), and the number of tiles in use (tiles past it never run). ``NT`` is a static
    bound: ``ceil((N - skip) / block) + min(E, N // (skip + 1))``."""
    num_pairs = order.shape[0]
    num_experts = counts.shape[0]
    n = jnp.maximum(counts - skip, 0)
    tiles = (n + block - 1) // block
    tile_end = jnp.cumsum(tiles)
    bound = -(-max(0, num_pairs - skip) // block) + min(num_experts, num_pairs // (skip + 1))
    i = jnp.arange(max(1, bound), dtype=jnp.int32)
    expert = jnp.searchsorted(tile_end, i, side="right", method="compare_all").astype(jnp.int32)
    expert = jnp.minimum(expert, num_experts - 1)
    offset = (i - (tile_end[expert] - tiles[expert])) * block  # rank of the tile's first row
    rows = jnp.clip(n[expert] - offset, 0, block)
    return expert, starts[expert] + skip + offset, rows, tile_end[-1]


# ------------------------------------------------------------------------------ the math


def _precision(dtype):
    return _HI if jnp.dtype(dtype) == jnp.float32 else None


def _operands(quant, dtype):
    """``(weight, activation, mm_dtype)``: how a GEMM's float8 weight (with its scale) and its
    input (already in ``dtype``) enter the matmul, and the matmul's operand dtype: ``dtype``,
    float32 with ``act_quant`` (the quantised ``q * s`` and ``W * scale`` exactly, as an e4m3
    GEMM with f32 scaling computes them). Identities without ``quant``."""
    if quant is None:
        return (lambda w, s: w), (lambda v: v), dtype
    mm_dtype = dtype if quant.act_quant is None else jnp.dtype(jnp.float32)

    def weight(w, s):
        return dequantize_weight(w, s, quant.block_shape, mm_dtype)

    def activation(v):
        if quant.act_quant is None:
            return v
        return quantize_groups(v, quant.block_shape[0])

    return weight, activation, mm_dtype


def _tile_fn(act, dtype, quant=None):
    """y0 = glu(xs @ Wgu + bgu) @ Wd + bd for one tile of the loop, f32 accumulation; the
    intermediate passes through ``dtype`` as in the kernels. ``act``: (activation, alpha,
    limit); absent biases and scales are ``None``; ``quant``: float8 experts (or None)."""
    weight, activation, mm_dtype = _operands(quant, dtype)
    dot = functools.partial(
        jnp.dot, precision=_precision(mm_dtype), preferred_element_type=jnp.float32
    )

    def tile(xs, w_gate_up, w_down, b_gate_up, b_down, s_gate_up, s_down):
        h = dot(activation(xs), weight(w_gate_up, s_gate_up))
        if b_gate_up is not None:
            h = h + b_gate_up.astype(jnp.float32)
        inter = w_down.shape[0]
        a = moe_glu(h[:, :inter], h[:, inter:], *act)
        y = dot(activation(a.astype(dtype)), weight(w_down, s_down))
        return y if b_down is None else y + b_down.astype(jnp.float32)

    return tile


def _stage_fn(act, dtype, ok, quant=None):
    """The capacity form's two batched matmuls on ``xs`` [E, C, Hd]: y0 [E, C, Hd] f32.
    Empty slots (``~ok``) get h = 0 before the activation, so an expert with no pair, whatever
    its weights, gives a = 0 there and a zero gradient; their y0 rows are never read."""
    weight, activation, mm_dtype = _operands(quant, dtype)
    einsum = functools.partial(
        jnp.einsum, precision=_precision(mm_dtype), preferred_element_type=jnp.float32
    )

    def stage(xs, w_gate_up, w_down, b_gate_up, b_down, s_gate_up, s_down):
        h = einsum("ech,ehn->ecn", activation(xs), weight(w_gate_up, s_gate_up))
        if b_gate_up is not None:
            h = h + b_gate_up.astype(jnp.float32)[:, None, :]
        h = jnp.where(ok[..., None], h, 0.0)
        inter = w_down.shape[1]
        a = moe_glu(h[..., :inter], h[..., inter:], *act)
        y = einsum("eci,eih->ech", activation(a.astype(dtype)), weight(w_down, s_down))
        return y if b_down is None else y + b_down.astype(jnp.float32)[:, None, :]

    return stage


def _loop(x, params, topk_weights, order, counts, starts, act, plan, body, init, quant):
    """Runs ``carry = body(carry, tile, xs, expert_params, w, rows_ok, token, pair, e)`` over
    the loop's tiles in use (each expert's pairs past its capacity), from ``init``: ``xs`` the
    tile's rows of x (0 past its rows), ``expert_params`` expert e's (Wgu, Wd, bgu, bd, sgu,
    sd) (absent biases and scales: None), ``w`` the rows' routing weights, ``tile`` the tile's
    math."""
    num_pairs = order.shape[0]
    top_k = num_pairs // x.shape[0]
    block = plan.block
    expert, first, rows, used = _tiles(order, counts, starts, block, plan.capacity)
    weights = topk_weights.reshape(-1).astype(jnp.float32)
    tile = _tile_fn(act, x.dtype, quant)
    r = jnp.arange(block, dtype=jnp.int32)

    def step(i, carry):
        ok = r < rows[i]
        pair = order[jnp.minimum(first[i] + r, num_pairs - 1)]
        token = pair // top_k
        xs = jnp.where(ok[:, None], x[token], jnp.zeros((), x.dtype))
        e = expert[i]
        w = jnp.where(ok, weights[pair], 0.0)
        expert_params = tuple(None if p is None else p[e] for p in params)
        return body(carry, tile, xs, expert_params, w, ok, token, pair, e)

    init = _vary((x, params[0], params[1], topk_weights), init)
    return lax.fori_loop(0, used, step, init)


def _capacity_inputs(x, topk_weights, key, order, counts, starts, plan):
    """Slots, their rows of x ``xs`` [E, C, Hd] and routing weights ``w_slot`` [E, C]."""
    top_k = topk_weights.shape[1]
    slot_pair, ok, pair_slot = _slots(key, order, counts, starts, plan.capacity)
    xs = jnp.take(x, slot_pair // top_k, axis=0, mode="fill", fill_value=0)
    w_slot = jnp.take(
        topk_weights.reshape(-1).astype(jnp.float32), slot_pair, mode="fill", fill_value=0
    )
    return slot_pair, ok, pair_slot, xs, w_slot


def _per_token(rows_by_slot, pair_slot, num_tokens: int):
    """Sum over each token's k pairs of its pairs' rows of ``rows_by_slot`` [E, C, n] (f32),
    gathered by slot; a pair without a slot adds 0."""
    flat = rows_by_slot.reshape(-1, rows_by_slot.shape[-1])
    per_pair = jnp.take(flat, pair_slot, axis=0, mode="fill", fill_value=0)
    return jnp.sum(per_pair.reshape(num_tokens, -1, flat.shape[-1]), axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_moe(x, params, topk_weights, topk_ids, act, plan, quant):
    return _fused_moe_fwd(x, params, topk_weights, topk_ids, act, plan, quant)[0]


def _fused_moe_fwd(x, params, topk_weights, topk_ids, act, plan, quant):
    num_tokens, hidden = x.shape
    num_experts = params[0].shape[0]
    key, order, counts, starts = _sort_pairs(topk_ids, num_experts)
    if plan.form == "capacity":
        _, ok, pair_slot, xs, w_slot = _capacity_inputs(
            x, topk_weights, key, order, counts, starts, plan
        )
        y = _stage_fn(act, x.dtype, ok, quant)(xs, *params) * w_slot[..., None]
        out = _per_token(y, pair_slot, num_tokens)
    else:
        out = jnp.zeros((num_tokens, hidden), jnp.float32)
    if plan.overflow:

        def body(out, tile, xs, expert_params, w, ok, token, pair, e):
            y = tile(xs, *expert_params) * w[:, None]
            return out.at[jnp.where(ok, token, num_tokens)].add(y, mode="drop")

        out = _loop(x, params, topk_weights, order, counts, starts, act, plan, body, out, quant)
    return out.astype(x.dtype), (x, params, topk_weights, topk_ids)


def _fused_moe_bwd(act, plan, quant, residuals, cotangent):
    """The forward recomputed, then the VJP of the batched stage and of each overflow tile:
    an expert no token selects gets a zero gradient (biases included)."""
    x, params, topk_weights, topk_ids = residuals
    num_tokens, _ = x.shape
    num_experts = params[0].shape[0]
    num_pairs = topk_ids.size
    dy = jnp.asarray(cotangent, jnp.float32)
    key, order, counts, starts = _sort_pairs(topk_ids, num_experts)
    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)
    if plan.form == "capacity":
        slot_pair, ok, pair_slot, xs, w_slot = _capacity_inputs(
            x, topk_weights, key, order, counts, starts, plan
        )
        dy_slot = jnp.take(dy, slot_pair // topk_ids.shape[1], axis=0, mode="fill", fill_value=0)
        y0, vjp = jax.vjp(_stage_fn(act, x.dtype, ok, quant), xs, *params)
        dxs, *dparams = vjp(dy_slot * w_slot[..., None])
        dx = _per_token(dxs.astype(jnp.float32), pair_slot, num_tokens)
        dw_slot = jnp.sum(y0 * dy_slot, axis=-1)  # [E, C]; empty slots: never read
        dw = jnp.take(dw_slot.reshape(-1), pair_slot, mode="fill", fill_value=0)
        dparams = tuple(None if d is None else d.astype(jnp.float32) for d in dparams)
    else:
        dx, dw = f32(x.shape), f32((num_pairs,))
        dparams = tuple(None if p is None else f32(p.shape) for p in params)
    if plan.overflow:

        def body(grads, tile, xs, expert_params, w, ok, token, pair, e):
            dx, dparams, dw = grads
            y0, vjp = jax.vjp(tile, xs, *expert_params)
            dy_rows = jnp.where(ok[:, None], dy[token], 0.0)
            dxs, *dparams_e = vjp(dy_rows * w[:, None])
            dx = dx.at[jnp.where(ok, token, num_tokens)].add(dxs.astype(jnp.float32), mode="drop")
            dparams = tuple(
                None if d is None else d.at[e].add(d_e.astype(jnp.float32))
                for d, d_e in zip(dparams, dparams_e)
            )
            dw = dw.at[jnp.where(ok, pair, num_pairs)].add(
                jnp.sum(y0 * dy_rows, axis=1), mode="drop"
            )
            return dx, dparams, dw

        init = (dx, dparams, dw)
        dx, dparams, dw = _loop(
            x, params, topk_weights, order, counts, starts, act, plan, body, init, quant
        )
    return (
        dx.astype(x.dtype),
        tuple(None if p is None else d.astype(p.dtype) for p, d in zip(params, dparams)),
        dw.reshape(topk_weights.shape).astype(topk_weights.dtype),
        None,
    )


_fused_moe.defvjp(_fused_moe_fwd, _fused_moe_bwd)


def fused_moe(
    x,
    w_gate_up,
    w_down,
    topk_weights,
    topk_ids,
    *,
    activation: str,
    b_gate_up=None,
    b_down=None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    w_gate_up_scale=None,
    w_down_scale=None,
    block_shape=None,
    act_quant=None,
    interpret=False,
    path: str = "auto",
):
    """Fused MoE (``interfaces.MoEKernels``): expert-sorted routed rows through batched
    matmuls over per-expert slots, the pairs past an expert's slots through a tile loop (module
    docstring); the biases are added to the f32 accumulators. float8 weights take their scales
    (SPEC 4.2, validated by ``jax_paged_attn.fused_moe``). ``path`` ("auto", "capacity" or
    "loop") forces a form (probes and tests); "auto" is :func:`moe_plan`'s choice."""
    del interpret
    if x.shape[0] == 0 or topk_ids.shape[1] == 0:
        return jnp.zeros(x.shape, x.dtype)
    topk_ids = topk_ids.astype(jnp.int32)
    quant = None
    if w_gate_up.dtype == FP8:
        block_shape = None if block_shape is None else tuple(int(b) for b in block_shape)
        quant = Quant(block_shape, act_quant)
    params = (w_gate_up, w_down, b_gate_up, b_down, w_gate_up_scale, w_down_scale)
    act = (activation, float(swiglu_alpha), float(swiglu_limit))
    plan = moe_plan(x.shape[0], topk_ids.shape[1], w_gate_up.shape[0], path)
    return _fused_moe(x, params, topk_weights, topk_ids, act, plan, quant)
