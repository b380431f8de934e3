"""Block sizes for the fused-MoE Triton kernels, looked up by dtype and rows per expert.

One tile height ``block_m`` is shared by both GEMMs (the alignment pads every expert to it);
each GEMM has its own N/K tiles, launch group and pipeline depth. The regime is chosen by
the expected rows per expert ``T*k / min(E, T*k)``: decode-shaped calls (a few rows per
expert) are bound by streaming the touched experts' weights, so they use a short tile
(block_m 16-32), 128-wide N tiles and a split-K down GEMM (tuned on the H100 for the
Mixtral decode shape); prefill-shaped calls use 64-128-row tiles. One table for
Ampere/Hopper-class GPUs so far.
The Mosaic kernels keep their own blocks in mosaic.py (MosaicBlocks, get_blocks).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def _pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


@dataclasses.dataclass(frozen=True)
class GemmBlocks:
    """Tiles of one grouped GEMM. Powers of two, >= 16 (Triton dot tiles)."""

    block_n: int
    block_k: int
    group_m: int = 8  # tiles of M launched next to each other (L2 reuse of weight tiles)
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # down GEMM only: K ranges summed afterwards (f32 partials)
    evict_first: bool = False  # weight loads marked evict-first (streamed once, keep x/h in L2)

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if not (_pow2(v) and v >= 16):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if (
            self.group_m < 1
            or self.num_warps not in (1, 2, 4, 8, 16)
            or self.num_stages < 1
            or self.split_k < 1
        ):
            raise ValueError(f"invalid launch parameters in {self}")


@dataclasses.dataclass(frozen=True)
class MoeBlocks:
    """block_m: tile height (both GEMMs); gate_up: kernel 1 (per gate/up half); down: kernel 2."""

    block_m: int
    gate_up: GemmBlocks
    down: GemmBlocks

    def __post_init__(self):
        if not (_pow2(self.block_m) and self.block_m >= 16):
            raise ValueError(f"block_m={self.block_m} must be a power of two >= 16")


# (max rows per expert, blocks) in increasing order; the first entry that fits is used.
# Half precision on Hopper/Ampere-class GPUs. Starting points from the usual Triton
# fused-MoE settings, to be re-tuned on the GPU (benchmarks/NOTES.md).
_HALF_TABLE: tuple[tuple[float, MoeBlocks], ...] = (
    # Decode: streaming the routed experts' weights. H100 sweep (benchmarks/NOTES.md, "MoE
    # decode"): 128-wide N tiles (half the re-reads of the activation tile per weight
    # byte of 64) and a down GEMM split in 2 over K (f32 partials summed by the combine:
    # 2x the programs, half the K loop) were the fastest of the configurations tried.
    (
        8,
        MoeBlocks(
            16,
            GemmBlocks(128, 128, group_m=1 << 20, num_warps=4, num_stages=3),
            GemmBlocks(128, 128, group_m=1 << 20, num_warps=4, num_stages=4, split_k=2),
        ),
    ),
    (
        24,
        MoeBlocks(
            32,
            GemmBlocks(128, 128, group_m=1 << 20, num_warps=8, num_stages=3),
            GemmBlocks(128, 128, group_m=1 << 20, num_warps=4, num_stages=4, split_k=2),
        ),
    ),
    # Many small experts (e.g. 64 experts, a few hundred rows each): 64-row tiles waste
    # less padding than 128-row ones.
    (
        512,
        MoeBlocks(
            64,
            GemmBlocks(128, 64, group_m=8, num_warps=4, num_stages=4),
            GemmBlocks(128, 64, group_m=8, num_warps=4, num_stages=4),
        ),
    ),
    (
        float("inf"),
        MoeBlocks(
            128,
            GemmBlocks(128, 64, group_m=8, num_warps=8, num_stages=3),
            GemmBlocks(128, 64, group_m=8, num_warps=8, num_stages=4),
        ),
    ),
)
# f32 (tests, small models): half the K tile so the pipeline fits shared memory.
_F32_TABLE: tuple[tuple[float, MoeBlocks], ...] = (
    (
        16,
        MoeBlocks(
            16,
            GemmBlocks(64, 64, group_m=1 << 20, num_warps=4, num_stages=3),
            GemmBlocks(64, 64, group_m=1 << 20, num_warps=4, num_stages=3),
        ),
    ),
    (
        float("inf"),
        MoeBlocks(
            64,
            GemmBlocks(64, 32, group_m=8, num_warps=4, num_stages=3),
            GemmBlocks(64, 32, group_m=8, num_warps=4, num_stages=3),
        ),
    ),
)


def _clamp(blocks: MoeBlocks, hidden: int, inter: int) -> MoeBlocks:
    """Shrinks N/K tiles that exceed small problem dims (keeps powers of two >= 16)."""

    def fit(v, dim):
        while v > 16 and v // 2 >= dim:
            v //= 2
        return v

    gu, dn = blocks.gate_up, blocks.down
    return MoeBlocks(
        blocks.block_m,
        dataclasses.replace(gu, block_n=fit(gu.block_n, inter), block_k=fit(gu.block_k, hidden)),
        dataclasses.replace(dn, block_n=fit(dn.block_n, hidden), block_k=fit(dn.block_k, inter)),
    )


def get_blocks(
    *, num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, dtype
) -> MoeBlocks:
    """Looks up the tuned blocks for this call (overridable by passing ``blocks=``)."""
    rows_per_expert = num_tokens * top_k / max(1, min(num_experts, num_tokens * top_k))
    table = _F32_TABLE if jnp.dtype(dtype) == jnp.float32 else _HALF_TABLE
    for max_rows, blocks in table:
        if rows_per_expert <= max_rows:
            return _clamp(blocks, hidden, inter)
    raise AssertionError("unreachable: tables end with inf")
