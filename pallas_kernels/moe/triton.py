"""Fused mixture-of-experts with Pallas on the Triton lowering (Ampere and newer).

    y[t] = sum_j w[t, j] * (glu(x[t] @ Wgu[e] + bgu[e]) @ Wd[e] + bd[e]),  e = ids[t, j]

(glu: ``act(gate) * up`` or gpt-oss's clamped ``swigluoai``, common.glu; biases optional.)

Three steps, all on the device, all with static shapes:
1. ``align.align_tokens``: the T*k (token, slot)
   pairs sorted by expert, each expert padded to ``block_m`` rows, one expert id per
   ``block_m``-row tile (-1: unused tile).
2. Kernel 1 (``moe_gate_up``): grouped GEMM. Program (m, n) gathers the ``block_m`` rows
   of ``x`` named by tile m, multiplies them by the n-th ``block_n`` columns of both the
   gate and the up half of ``w_gate_up[e]`` (two accumulators in one program, so the
   epilogue adds the gate/up biases and fuses ``glu(gate, up)``) and writes ``h`` [P, I] in padded expert order.
3. Kernel 2 (``moe_down``): grouped GEMM ``h @ w_down[e]``, optionally split over K into
   ``split_k`` f32 partial sums (decode: N = Hd alone gives too few, too long programs),
   plus the down bias (split 0 only), scaled per row by the routing weight in the epilogue, written in padded expert order;
   then the top-k combine gathers each token's k rows of every split and sums them in f32
   (no scatter, no atomics).

Grid: one axis of ``grid_m * grid_n`` (x ``split_k``) programs, swizzled so ``group_m``
row tiles run next to each other over each weight tile (L2 reuse). Decode-shaped calls use
``group_m >= grid_m``: all tiles of an expert read a weight tile at the same time, so the
weights stream from HBM once. Tiles with expert -1 skip the GEMM and write nothing (no
later step reads their rows); rows that pad an expert's run load ``x`` as zeros (masked
gather), so every row a later step reads is written with a defined value. Static: the
shapes, ``top_k``, ``activation`` (with alpha and limit), whether biases are present, the
blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.moe import common, tuning
from pallas_kernels.moe.align import align_tokens
from pallas_kernels.moe.tuning import GemmBlocks, MoeBlocks

ACTIVATIONS = common.ACTIVATIONS


def check_supported(
    *,
    dtype,
    num_tokens=None,
    top_k=None,
    num_experts=None,
    hidden=None,
    inter=None,
    activation: str = "silu",
    w_dtype=None,
    act_quant=None,
    bias: bool = False,
) -> None:
    """NotImplementedError (naming what runs, suggesting backend="xla") if this can't run."""
    del num_tokens, top_k, num_experts, hidden, inter  # every shape runs (masked edges)
    common.check_supported(
        dtype=dtype,
        w_dtype=w_dtype,
        act_quant=act_quant,
        activation=activation,
        bias=bias,
        backend="triton",
    )


def _tile_coords(pid, grid_m: int, grid_n: int, group_m: int):
    """Grouped launch order: ``group_m`` row tiles sweep each column tile together."""
    group_m = min(group_m, grid_m)
    width = group_m * grid_n
    first_m = (pid // width) * group_m
    rows_in_group = jnp.minimum(grid_m - first_m, group_m)
    m = first_m + (pid % width) % rows_in_group
    n = (pid % width) // rows_in_group
    return m, n


def _dot(a, b):
    # f32 inputs (tests) use IEEE f32, not TF32; half inputs accumulate in f32.
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=prec)


def _edge_mask(start, size: int, limit: int):
    """[size] bool for indices < limit, or None when the tiles divide ``limit`` exactly."""
    if limit % size == 0:
        return None
    return start + jnp.arange(size) < limit


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _load(ref, mask, evict_first: bool = False):
    # Masked-off elements read as 0 (padding rows, K/N edges); unmasked loads stay plain.
    # ``evict_first``: streamed weights, read once, should not push x / h out of L2.
    if evict_first:
        return pltr.load(
            ref, mask=mask, other=None if mask is None else 0, eviction_policy="evict_first"
        )
    if mask is None:
        return ref[...]
    return pltr.load(ref, mask=mask, other=0)


def _store(ref, val, mask):
    if mask is None:
        ref[...] = val
    else:
        pltr.store(ref, val, mask=mask)


def _gate_up_kernel(
    # inputs
    slots_ref,  # i32[P]          slot t*k+j of each padded row (N on padding rows)
    experts_ref,  # i32[P/block_m]  expert of each row tile, -1 unused
    x_ref,  # [T, Hd]
    w_ref,  # [E, Hd, 2I]     gate = [..., :I], up = [..., I:]
    *refs,  # (b_ref [E, 2I] when has_bias), then the output h_ref [P, I]: glu(x @ Wgu + b)
    top_k: int,
    num_slots: int,
    act: tuple,  # (activation, alpha, limit)
    has_bias: bool,
    block_m: int,
    blocks: GemmBlocks,
    grid_m: int,
    grid_n: int,
):
    b_ref, h_ref = refs if has_bias else (None, *refs)
    bn, bk = blocks.block_n, blocks.block_k
    hidden, inter = x_ref.shape[1], h_ref.shape[1]
    m, n = _tile_coords(pl.program_id(0), grid_m, grid_n, blocks.group_m)
    row0 = pl.multiple_of(m * block_m, block_m)
    col0 = pl.multiple_of(n * bn, bn)
    n_mask = _edge_mask(col0, bn, inter)
    out_mask = None if n_mask is None else n_mask[None, :]
    out_ref = h_ref.at[pl.ds(row0, block_m), pl.ds(col0, bn)]
    expert = experts_ref[m]

    # Unused tiles (expert -1) write nothing: no later step reads their rows (the down
    # kernel skips them too and the combine only gathers rows of routed slots).
    @pl.when(expert >= 0)
    def _():
        slots = slots_ref[pl.ds(row0, block_m)]  # [block_m]
        row_ok = slots < num_slots
        tokens = jnp.where(row_ok, slots // top_k, 0)  # padding rows read row 0, masked to 0

        def body(i, carry):
            acc_g, acc_u = carry
            k0 = pl.multiple_of(i * bk, bk)
            k_mask = _edge_mask(k0, bk, hidden)
            x_mask = _and(row_ok[:, None], None if k_mask is None else k_mask[None, :])
            w_mask = _and(
                None if k_mask is None else k_mask[:, None],
                None if n_mask is None else n_mask[None, :],
            )
            # Row gather: both indices as arrays (the interpreter cannot mix arrays and slices).
            cols = k0 + jnp.arange(bk, dtype=jnp.int32)
            x = _load(x_ref.at[tokens[:, None], cols[None, :]], x_mask)  # [bm, bk]
            w_g = _load(
                w_ref.at[expert, pl.ds(k0, bk), pl.ds(col0, bn)], w_mask, blocks.evict_first
            )  # [bk, bn]
            w_u = _load(
                w_ref.at[expert, pl.ds(k0, bk), pl.ds(inter + col0, bn)], w_mask, blocks.evict_first
            )
            return acc_g + _dot(x, w_g), acc_u + _dot(x, w_u)

        zeros = jnp.zeros((block_m, bn), jnp.float32)
        acc_g, acc_u = lax.fori_loop(0, pl.cdiv(hidden, bk), body, (zeros, zeros))
        if has_bias:  # epilogue: the expert's gate and up bias columns, in f32
            b_g = _load(b_ref.at[expert, pl.ds(col0, bn)], n_mask).astype(jnp.float32)
            b_u = _load(b_ref.at[expert, pl.ds(inter + col0, bn)], n_mask).astype(jnp.float32)
            acc_g, acc_u = acc_g + b_g[None, :], acc_u + b_u[None, :]
        h = common.glu(acc_g, acc_u, *act)
        _store(out_ref, h.astype(h_ref.dtype), out_mask)


def split_k_chunk(inter: int, blocks: GemmBlocks) -> int:
    """K rows per split of the down GEMM: a multiple of block_k covering inter in split_k."""
    per = pl.cdiv(inter, blocks.split_k)
    return pl.cdiv(per, blocks.block_k) * blocks.block_k


def _down_kernel(
    # inputs
    slots_ref,  # i32[P]
    experts_ref,  # i32[P/block_m]
    h_ref,  # [P, I]
    w_ref,  # [E, I, Hd]
    tw_ref,  # f32[N]   routing weight of each slot
    *refs,  # (b_ref [E, Hd] when has_bias), then the output o_ref f32[S, P, Hd]:
    # routing-weighted partial sums over K split s (split 0 adds the bias), padded order
    num_slots: int,
    has_bias: bool,
    block_m: int,
    blocks: GemmBlocks,
    grid_m: int,
    grid_n: int,
):
    b_ref, o_ref = refs if has_bias else (None, *refs)
    bn, bk = blocks.block_n, blocks.block_k
    inter, hidden = h_ref.shape[1], o_ref.shape[2]
    chunk = split_k_chunk(inter, blocks)
    pid = pl.program_id(0)
    s = pid // (grid_m * grid_n)  # K split: outermost, tiles of one split run together
    m, n = _tile_coords(pid % (grid_m * grid_n), grid_m, grid_n, blocks.group_m)
    row0 = pl.multiple_of(m * block_m, block_m)
    col0 = pl.multiple_of(n * bn, bn)
    k_begin = pl.multiple_of(s * chunk, bk)
    n_mask = _edge_mask(col0, bn, hidden)
    # K tiles need a mask when the last one crosses ``inter`` (ragged K, or splits that
    # overshoot it); statically known.
    k_masked = inter % bk != 0 or chunk * blocks.split_k > inter
    out_mask = None if n_mask is None else n_mask[None, :]
    out_ref = o_ref.at[s, pl.ds(row0, block_m), pl.ds(col0, bn)]
    expert = experts_ref[m]

    @pl.when(expert >= 0)  # unused tiles: nothing reads their rows (see the combine)
    def _():

        def body(i, acc):
            k0 = pl.multiple_of(k_begin + i * bk, bk)
            k_mask = (k0 + jnp.arange(bk) < inter) if k_masked else None
            h_mask = None if k_mask is None else k_mask[None, :]
            w_mask = _and(
                None if k_mask is None else k_mask[:, None],
                None if n_mask is None else n_mask[None, :],
            )
            h = _load(h_ref.at[pl.ds(row0, block_m), pl.ds(k0, bk)], h_mask)  # [bm, bk]
            w = _load(
                w_ref.at[expert, pl.ds(k0, bk), pl.ds(col0, bn)], w_mask, blocks.evict_first
            )  # [bk, bn]
            return acc + _dot(h, w)

        acc = lax.fori_loop(0, chunk // bk, body, jnp.zeros((block_m, bn), jnp.float32))
        if has_bias:  # epilogue: the expert's bias, once (in the first K split)
            bias = _load(b_ref.at[expert, pl.ds(col0, bn)], n_mask).astype(jnp.float32)
            acc = acc + jnp.where(s == 0, bias, 0.0)[None, :]
        slots = slots_ref[pl.ds(row0, block_m)]
        row_ok = slots < num_slots
        tw = pltr.load(tw_ref.at[jnp.where(row_ok, slots, 0)], mask=row_ok, other=0.0)
        _store(out_ref, (acc * tw[:, None]).astype(o_ref.dtype), out_mask)


def moe_gate_up(
    sorted_slots,
    tile_experts,
    x,
    w_gate_up,
    b_gate_up=None,
    *,
    top_k: int,
    activation: str,
    block_m: int,
    blocks: GemmBlocks,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    interpret: bool = False,
):
    """Kernel 1: h[P, I] = glu(x[rows] @ Wgu[e] + bgu[e]) per row tile (``b_gate_up``
    [E, 2I] or None; alpha and limit: swigluoai only).

    Rows of unused tiles (expert -1) are left unwritten.
    """
    if blocks.split_k != 1:
        raise ValueError(f"the gate/up GEMM cannot split K (nonlinear epilogue): {blocks}")
    num_rows = sorted_slots.shape[0]
    inter = w_gate_up.shape[2] // 2
    grid_m, grid_n = num_rows // block_m, pl.cdiv(inter, blocks.block_n)
    kernel = functools.partial(
        _gate_up_kernel,
        top_k=top_k,
        num_slots=x.shape[0] * top_k,
        act=(activation, float(swiglu_alpha), float(swiglu_limit)),
        has_bias=b_gate_up is not None,
        block_m=block_m,
        blocks=blocks,
        grid_m=grid_m,
        grid_n=grid_n,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, inter), x.dtype),  # h
        grid=(grid_m * grid_n,),
        compiler_params=pltr.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name=(f"moe_gate_up_{activation}_bm{block_m}_bn{blocks.block_n}_bk{blocks.block_k}"),
    )(sorted_slots, tile_experts, x, w_gate_up, *([] if b_gate_up is None else [b_gate_up]))


def moe_down(
    sorted_slots,
    tile_experts,
    h,
    w_down,
    slot_weights,
    b_down=None,
    *,
    block_m: int,
    blocks: GemmBlocks,
    interpret: bool = False,
):
    """Kernel 2: o[s, P, Hd] = slot_weight[row] * (h[rows, K_s] @ Wd[e][K_s] + [s == 0] bd[e])
    in f32 (``b_down`` [E, Hd] or None).

    ``blocks.split_k`` = S partial sums over disjoint K ranges (summed by the combine);
    rows of unused tiles are left unwritten.
    """
    num_rows = sorted_slots.shape[0]
    hidden = w_down.shape[2]
    grid_m, grid_n = num_rows // block_m, pl.cdiv(hidden, blocks.block_n)
    kernel = functools.partial(
        _down_kernel,
        num_slots=slot_weights.shape[0],
        has_bias=b_down is not None,
        block_m=block_m,
        blocks=blocks,
        grid_m=grid_m,
        grid_n=grid_n,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((blocks.split_k, num_rows, hidden), jnp.float32),
        grid=(grid_m * grid_n * blocks.split_k,),
        compiler_params=pltr.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name=(f"moe_down_bm{block_m}_bn{blocks.block_n}_bk{blocks.block_k}_sk{blocks.split_k}"),
    )(sorted_slots, tile_experts, h, w_down, slot_weights, *([] if b_down is None else [b_down]))


@functools.partial(
    jax.jit, static_argnames=("activation", "swiglu_alpha", "swiglu_limit", "interpret", "blocks")
)
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
    interpret: bool = False,
    blocks: MoeBlocks | None = None,
):
    """Fused MoE (docs/contract.md) on the Triton lowering.

    x [T, Hd] bf16|f16|f32, w_gate_up [E, Hd, 2I], w_down [E, I, Hd], topk_weights f32[T, k],
    topk_ids i32[T, k] (ids outside [0, E) contribute zero), optional b_gate_up [E, 2I] and
    b_down [E, Hd] (added in the GEMM epilogues) -> y [T, Hd] in x.dtype.
    ``blocks`` overrides the tuning table (``tuning.get_blocks``).
    """
    for w in (w_gate_up, w_down):
        check_supported(dtype=x.dtype, w_dtype=w.dtype, activation=activation)
    num_tokens, hidden = x.shape
    num_experts, _, two_inter = w_gate_up.shape
    top_k = topk_ids.shape[1]
    if num_tokens == 0 or top_k == 0:
        return jnp.zeros((num_tokens, hidden), x.dtype)
    if blocks is None:
        blocks = tuning.get_blocks(
            num_tokens=num_tokens,
            top_k=top_k,
            num_experts=num_experts,
            hidden=hidden,
            inter=two_inter // 2,
            dtype=x.dtype,
        )
    a = align_tokens(topk_ids, num_experts, blocks.block_m)
    h = moe_gate_up(
        a.sorted_slots,
        a.tile_experts,
        x,
        w_gate_up,
        b_gate_up,
        top_k=top_k,
        activation=activation,
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        block_m=blocks.block_m,
        blocks=blocks.gate_up,
        interpret=interpret,
    )
    o = moe_down(
        a.sorted_slots,
        a.tile_experts,
        h,
        w_down,
        topk_weights.reshape(-1).astype(jnp.float32),
        b_down,
        block_m=blocks.block_m,
        blocks=blocks.down,
        interpret=interpret,
    )
    return common.combine(o, a.positions, num_tokens, top_k, x.dtype)
