"""Fused mixture-of-experts with Pallas on the Mosaic GPU lowering (Hopper: TMA + wgmma).

    y[t] = sum_j w[t, j] * (glu(x[t] @ Wgu[e] + bgu[e]) @ Wd[e] + bd[e]),  e = ids[t, j]

(glu: ``act(gate) * up`` or gpt-oss's clamped ``swigluoai``, common.glu; biases optional.)

Same plan as triton.py, shaped for TMA: TMA copies rectangular tiles and cannot gather
rows, so ``x`` is first permuted into the padded expert order by one XLA gather
(``x_sorted`` [P, Hd], zero on padding rows; ~1-2% of the op's time at Mixtral size).
Every ``block_m``-row tile then belongs to one expert and all copies are plain tiles.

Kernel 1 (``moe_gate_up_mgpu``): persistent kernel, one warpgroup per SM; ``nd_loop``
walks the (row tile, column tile) pairs in a snake order; for each pair a TMA pipeline
(``max_concurrent_steps`` deep) feeds the x tile and the gate and up weight tiles of
expert ``e`` into shared memory and two async wgmma accumulators; the epilogue adds the
expert's f32 bias columns (a ``WGMMA.reduce(0)`` vector per accumulator) and computes
``glu(gate, up)`` in registers and TMA-stores h [P, I].
Kernel 2 (``moe_down_mgpu``): the same pipeline on ``h @ Wd[e]``; the epilogue adds the
down bias and multiplies each row by its routing weight and TMA-stores f32 rows [P, Hd]. Then the scatter-free
top-k combine (common.combine). Tiles with expert -1 store zeros and skip the GEMM.

Static: shapes, ``top_k``, ``activation``, blocks. Needs Hd and I to be multiples of 16
(NotImplementedError otherwise). bf16/f16 run on wgmma; f32 calls are delegated to the
Triton kernels (f32 wgmma is tf32 and needs K-major weights).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.moe import common
from pallas_kernels.moe.align import align_tokens

ACTIVATIONS = common.ACTIVATIONS
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """One warpgroup holds both gate and up accumulators: block_m * gate_up_n <= 128*64."""

    block_m: int = 128
    gate_up_n: int = 64
    down_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_tile_width: int = 8  # row tiles swept together per column band (L2 reuse)

    def __post_init__(self):
        if self.block_m not in (64, 128):
            raise ValueError(f"block_m={self.block_m} must be 64 or 128 (wgmma rows)")
        for name in ("gate_up_n", "down_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v > 256 or v % 16:
                raise ValueError(f"{name}={v} must be a multiple of 16 in [16, 256]")
        if self.block_m * self.gate_up_n > 128 * 64 or self.block_m * self.down_n > 128 * 128:
            raise ValueError(f"accumulators of {self} exceed one warpgroup's registers")


def get_blocks(
    *, num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int
) -> MosaicBlocks:
    rows_per_expert = num_tokens * top_k / max(1, min(num_experts, num_tokens * top_k))
    if rows_per_expert <= 64:
        # Decode-shaped: weight streaming dominates; short tiles, deep pipeline.
        return _fit(
            MosaicBlocks(
                block_m=64,
                gate_up_n=64,
                down_n=64,
                block_k=128,
                max_concurrent_steps=4,
                grid_tile_width=64,
            ),
            hidden,
            inter,
        )
    return _fit(MosaicBlocks(), hidden, inter)


def _fit(b: MosaicBlocks, hidden: int, inter: int) -> MosaicBlocks:
    """Shrinks tiles until they divide the problem (multiples of 16 stay valid)."""

    def fit(v, dim):
        while v > 16 and dim % v:
            v //= 2
        return v

    bk = min(fit(b.block_k, hidden), fit(b.block_k, inter))
    return dataclasses.replace(
        b, gate_up_n=fit(b.gate_up_n, inter), down_n=fit(b.down_n, hidden), block_k=bk
    )


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
    del num_tokens, top_k, num_experts
    common.check_supported(
        dtype=dtype,
        w_dtype=w_dtype,
        act_quant=act_quant,
        activation=activation,
        bias=bias,
        backend="mosaic",
    )
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return  # f32: runs on the Triton kernels (see fused_moe)
    for name, v in (("hidden", hidden), ("inter", inter)):
        if v is not None and v % 16:
            raise NotImplementedError(
                f"fused_moe backend='mosaic' needs {name} to be a multiple of 16, got {v}; "
                'use backend="triton" or backend="xla"'
            )


def _num_sms() -> int:
    dev = jax.devices()[0]
    if dev.platform == "gpu" and getattr(dev, "core_count", None):
        return dev.core_count
    return _H100_SMS  # the interpreter: any count works


def _grouped_gemm(
    experts_gmem,
    a_gmem,
    w_gmem,
    out_gmem,
    *,
    n_tiles_w,
    block_n,
    blocks,
    epilogue,
    row_scale_gmem=None,
    bias_gmem=None,
):
    """Persistent grouped GEMM body shared by both kernels.

    experts_gmem i32[P/bm]; a_gmem [P, K]; w_gmem [E, K, Nw]; out_gmem [P, N]; optional
    bias_gmem f32[E, Nw], added to the accumulators before ``epilogue``.
    ``n_tiles_w``: weight column tiles per output tile (2 for gate+up, 1 for down); tile j of
    output column tile n reads weight columns ``n + j * (N / block_n)``.
    """
    bm, bk = blocks.block_m, blocks.block_k
    num_rows, k_dim = a_gmem.shape
    n_dim = out_gmem.shape[1]
    grid_m, grid_n = num_rows // bm, n_dim // block_n

    @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
    def _tile_loop(loop_info: plgpu.NDLoopInfo):
        mi, ni = plgpu.planar_snake(
            loop_info.index[0], (grid_m, grid_n), 0, min(blocks.grid_tile_width, grid_m)
        )
        expert = experts_gmem[mi]
        rows = pl.ds(mi * bm, bm)

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, block_n), out_gmem.dtype))
        def _store_scope(o_smem):
            @pl.when(expert >= 0)
            def _():
                def acc_scope(*accs):
                    def step(_, a_smem, *w_smems):
                        for acc, w_smem in zip(accs, w_smems):
                            plgpu.wgmma(acc, a_smem, w_smem)

                    w_specs = [
                        plgpu.BlockSpec(
                            (bk, block_n), (lambda k, j=j: (k, ni + j * grid_n)), delay_release=1
                        )
                        for j in range(n_tiles_w)
                    ]
                    plgpu.emit_pipeline(
                        step,
                        grid=(k_dim // bk,),
                        in_specs=[
                            plgpu.BlockSpec((bm, bk), lambda k: (mi, k), delay_release=1),
                            *w_specs,
                        ],
                        max_concurrent_steps=blocks.max_concurrent_steps,
                    )(a_gmem, *([w_gmem.at[expert]] * n_tiles_w))
                    return tuple(acc[...] for acc in accs)

                accs = pl.run_scoped(
                    acc_scope, *[plgpu.ACC((bm, block_n)) for _ in range(n_tiles_w)]
                )
                if bias_gmem is not None:  # one f32 bias vector per accumulator's columns
                    accs = tuple(
                        acc
                        + plgpu.load(
                            bias_gmem.at[expert, pl.ds((ni + j * grid_n) * block_n, block_n)],
                            layout=plgpu.Layout.WGMMA.reduce(0),
                            optimized=False,
                        )[None, :]
                        for j, acc in enumerate(accs)
                    )
                scale = None
                if row_scale_gmem is not None:
                    scale = plgpu.load(
                        row_scale_gmem.at[rows],
                        layout=plgpu.Layout.WGMMA.reduce(1),
                        optimized=False,
                    )
                o_smem[...] = epilogue(*accs, scale).astype(o_smem.dtype)

            @pl.when(expert < 0)
            def _():
                o_smem[...] = jnp.zeros((bm, block_n), o_smem.dtype)

            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[rows, pl.ds(ni * block_n, block_n)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _call(body, out_shape, name, interpret):
    kw = {} if not interpret else dict(interpret=plgpu.InterpretGPUParams())
    return plgpu.kernel(
        body,
        out_type=out_shape,
        grid=(_num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name=name,
        **kw,
    )


def moe_gate_up_mgpu(
    tile_experts,
    x_sorted,
    w_gate_up,
    b_gate_up=None,
    *,
    activation: str,
    blocks: MosaicBlocks,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    interpret: bool = False,
):
    """Kernel 1: h[P, I] = glu(x_sorted @ Wgu[e] + bgu[e]) per row tile (``b_gate_up``
    f32[E, 2I] or None)."""
    num_rows = x_sorted.shape[0]
    inter = w_gate_up.shape[2] // 2
    alpha, limit = float(swiglu_alpha), float(swiglu_limit)

    def epilogue(gate, up, _):
        return common.glu(gate, up, activation, alpha, limit)

    def body(experts_gmem, x_gmem, w_gmem, *refs):
        b_gmem, h_gmem = refs if b_gate_up is not None else (None, *refs)
        _grouped_gemm(
            experts_gmem,
            x_gmem,
            w_gmem,
            h_gmem,
            n_tiles_w=2,
            block_n=blocks.gate_up_n,
            blocks=blocks,
            epilogue=epilogue,
            bias_gmem=b_gmem,
        )

    name = (
        f"moe_gate_up_mgpu_{activation}_bm{blocks.block_m}_bn{blocks.gate_up_n}_bk{blocks.block_k}"
    )
    out = jax.ShapeDtypeStruct((num_rows, inter), x_sorted.dtype)  # h
    biases = [] if b_gate_up is None else [b_gate_up]
    return _call(body, out, name, interpret)(tile_experts, x_sorted, w_gate_up, *biases)


def moe_down_mgpu(
    tile_experts,
    h,
    w_down,
    row_weights,
    b_down=None,
    *,
    blocks: MosaicBlocks,
    interpret: bool = False,
):
    """Kernel 2: o[P, Hd] = row_weight * (h @ Wd[e] + bd[e]) in f32 per row tile (``b_down``
    f32[E, Hd] or None)."""
    num_rows = h.shape[0]
    hidden = w_down.shape[2]

    def epilogue(acc, scale):
        return acc * scale[:, None]

    def body(experts_gmem, h_gmem, w_gmem, rw_gmem, *refs):
        b_gmem, o_gmem = refs if b_down is not None else (None, *refs)
        _grouped_gemm(
            experts_gmem,
            h_gmem,
            w_gmem,
            o_gmem,
            n_tiles_w=1,
            block_n=blocks.down_n,
            blocks=blocks,
            epilogue=epilogue,
            row_scale_gmem=rw_gmem,
            bias_gmem=b_gmem,
        )

    name = f"moe_down_mgpu_bm{blocks.block_m}_bn{blocks.down_n}_bk{blocks.block_k}"
    out = jax.ShapeDtypeStruct((num_rows, hidden), jnp.float32)  # o
    biases = [] if b_down is None else [b_down]
    return _call(body, out, name, interpret)(tile_experts, h, w_down, row_weights, *biases)


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
    blocks: MosaicBlocks | None = None,
):
    """Fused MoE (docs/contract.md) on the Mosaic GPU lowering (bf16/f16, Hopper); the
    optional biases are added in the GEMM epilogues (as f32 vectors)."""
    num_tokens, hidden = x.shape
    num_experts, _, two_inter = w_gate_up.shape
    inter, top_k = two_inter // 2, topk_ids.shape[1]
    for w in (w_gate_up, w_down):
        check_supported(
            dtype=x.dtype, w_dtype=w.dtype, activation=activation, hidden=hidden, inter=inter
        )
    if num_tokens == 0 or top_k == 0:
        return jnp.zeros((num_tokens, hidden), x.dtype)
    if x.dtype not in SUPPORTED_DTYPES:
        # f32 would be tf32 wgmma, which needs K-major weights ([E, N, K]); our weights are
        # N-major. f32 is a test/small-model dtype: it runs on the Triton kernels instead.
        from pallas_kernels.moe import triton as moe_triton  # local: keeps imports one-way

        return moe_triton.fused_moe(
            x,
            w_gate_up,
            w_down,
            topk_weights,
            topk_ids,
            activation=activation,
            b_gate_up=b_gate_up,
            b_down=b_down,
            swiglu_alpha=swiglu_alpha,
            swiglu_limit=swiglu_limit,
            interpret=interpret,
        )
    if blocks is None:
        blocks = get_blocks(
            num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden, inter=inter
        )
    for name, dim, tile in (
        ("hidden", hidden, blocks.block_k),
        ("inter", inter, blocks.block_k),
        ("inter", inter, blocks.gate_up_n),
        ("hidden", hidden, blocks.down_n),
    ):
        if dim % tile:
            raise NotImplementedError(
                f"fused_moe backend='mosaic': {name}={dim} is not a multiple "
                f'of the tile {tile} in {blocks}; use backend="triton"'
            )
    a = align_tokens(topk_ids, num_experts, blocks.block_m)
    num_slots = num_tokens * top_k
    used = a.sorted_slots < num_slots
    # TMA cannot gather rows: permute x once (padding rows read the fill value 0).
    tokens = jnp.where(used, a.sorted_slots // top_k, num_tokens)
    x_sorted = jnp.take(x, tokens, axis=0, mode="fill", fill_value=0)
    row_weights = jnp.take(
        topk_weights.reshape(-1).astype(jnp.float32), a.sorted_slots, mode="fill", fill_value=0
    )
    h = moe_gate_up_mgpu(
        a.tile_experts,
        x_sorted,
        w_gate_up,
        None if b_gate_up is None else b_gate_up.astype(jnp.float32),
        activation=activation,
        blocks=blocks,
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        interpret=interpret,
    )
    o = moe_down_mgpu(
        a.tile_experts,
        h,
        w_down,
        row_weights,
        None if b_down is None else b_down.astype(jnp.float32),
        blocks=blocks,
        interpret=interpret,
    )
    return common.combine(o, a.positions, num_tokens, top_k, x.dtype)
