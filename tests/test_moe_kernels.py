"""Fused-MoE kernels (pallas_kernels/moe) against the test kit's float64 oracle.

Runs the Pallas kernels under the interpreter on a CPU and compiled on a GPU
(``interpret = jax.default_backend() != "gpu"``). Small shapes, T not a multiple of the
tile, E = 4..8, k = 1..3, ids outside [0, E), every activation, f32/bf16/f16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_paged_attn.testing import FULL_F32, assert_close, oracle
from pallas_kernels.moe import align as moe_align
from pallas_kernels.moe import common, tuning
from pallas_kernels.moe import triton as moe_triton

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
ACTS = common.ACTIVATIONS


def make_case(seed, T, Hd, I, E, k, dtype, p_invalid=0.15):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, Hd)), dtype)
    wgu = jnp.asarray(rng.standard_normal((E, Hd, 2 * I)) / math.sqrt(Hd), dtype)
    wd = jnp.asarray(rng.standard_normal((E, I, Hd)) / math.sqrt(I), dtype)
    # k distinct experts per token, then some slots moved outside [0, E) (other devices).
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    off = rng.random((T, k)) < p_invalid
    ids[off] = rng.choice([-1, E, E + 3], size=off.sum())
    tw = rng.random((T, k)).astype(np.float32) + 0.1
    return x, wgu, wd, jnp.asarray(tw), jnp.asarray(ids)


def check(y, x, wgu, wd, tw, ids, activation, **kw):
    """Against the kit's float64 oracle (``kw``: biases, swiglu alpha/limit): float32 within
    FULL_F32; bf16/f16 by FA3's rule, at most twice the error of the same-dtype reference (h
    and y rounded to x.dtype, f32 accumulation) plus a small epsilon."""
    kw = {k: np.asarray(jnp.asarray(v, jnp.float32)) if k.startswith("b_") else v
          for k, v in kw.items() if v is not None}  # fmt: skip
    ref = oracle.fused_moe(x, wgu, wd, tw, ids, activation, **kw)
    if x.dtype == jnp.float32:
        assert_close(y, ref, jnp.float32, what="fused MoE", **FULL_F32)
        return
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert y.shape == ref.shape and np.all(np.isfinite(y))
    same = oracle.fused_moe(x, wgu, wd, tw, ids, activation, h_dtype=x.dtype, **kw)
    same = np.asarray(jnp.asarray(same, x.dtype).astype(jnp.float32), np.float64)
    bound = 2 * np.abs(same - ref).max() + 1e-3 * np.abs(ref).max()
    err = np.abs(y - ref).max()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


# --- alignment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,k,E,block_m", [(13, 2, 5, 4), (1, 1, 8, 16), (40, 3, 4, 16), (7, 2, 64, 8)]
)
def test_align_layout(T, k, E, block_m):
    rng = np.random.default_rng(T * 100 + E)
    ids = rng.integers(-2, E + 2, size=(T, k)).astype(np.int32)
    a = jax.jit(moe_align.align_tokens, static_argnums=(1, 2))(jnp.asarray(ids), E, block_m)
    slots, tiles = np.asarray(a.sorted_slots), np.asarray(a.tile_experts)
    pos, num_rows = np.asarray(a.positions), int(a.num_rows)
    N, P = T * k, moe_align.padded_rows(T * k, E, block_m)
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < E)
    counts = np.bincount(flat[valid], minlength=E)
    assert slots.shape == (P,) and tiles.shape == (P // block_m,) and P % block_m == 0
    assert P >= N + 0 and P <= -(-(N + E * (block_m - 1)) // block_m) * block_m
    assert num_rows == sum(-(-c // block_m) * block_m for c in counts)
    # Every valid slot exactly once, in a tile of its own expert; padding rows hold N.
    assert sorted(slots[slots < N].tolist()) == np.flatnonzero(valid).tolist()
    assert np.all(slots[num_rows:] == N)
    for row, s in enumerate(slots):
        if s < N:
            assert tiles[row // block_m] == flat[s]
            assert pos[s] == row
    assert np.all(pos[~valid] == P)
    assert np.all(tiles[num_rows // block_m :] == -1)
    assert np.all(tiles[: num_rows // block_m] >= 0)
    # Tiles are grouped by expert in increasing order; slots in token order within one.
    used = tiles[: num_rows // block_m]
    assert np.all(np.diff(used) >= 0)
    for e in range(E):
        mine = slots[np.repeat(tiles, block_m) == e]
        mine = mine[mine < N]
        assert np.all(np.diff(mine) > 0) and len(mine) == counts[e]


@pytest.mark.parametrize(
    "T,k,E,block_m",
    [(13, 2, 5, 4), (1, 1, 8, 16), (40, 3, 4, 16), (7, 2, 64, 8), (64, 2, 8, 32), (300, 6, 64, 16)],
)
def test_align_has_no_while_loop(T, k, E, block_m):
    """The alignment compiles to no loop: a binary search would be a launch per step on a GPU."""
    ids = np.random.default_rng(T + E).integers(-2, E + 2, size=(T, k)).astype(np.int32)
    fn = jax.jit(moe_align.align_tokens, static_argnums=(1, 2))
    assert "while" not in fn.lower(jnp.asarray(ids), E, block_m).as_text()


def test_align_all_invalid():
    a = moe_align.align_tokens(jnp.full((5, 2), 9, jnp.int32), 4, 16)
    assert int(a.num_rows) == 0
    assert np.all(np.asarray(a.tile_experts) == -1)
    assert np.all(np.asarray(a.sorted_slots) == 10)


# --- triton kernels ----------------------------------------------------------------

SMALL = tuning.MoeBlocks(
    16, tuning.GemmBlocks(16, 32, group_m=2), tuning.GemmBlocks(32, 16, group_m=2)
)

# Split-K down GEMM (3 splits of a ragged K = 40: the last split is partly past the end;
# K = 48 in 2 splits of 32 overshoots an exactly tiled K) and evict-first weight loads.
SPLIT3 = tuning.MoeBlocks(
    16,
    tuning.GemmBlocks(16, 32, group_m=2, evict_first=True),
    tuning.GemmBlocks(32, 16, group_m=2, split_k=3, evict_first=True),
)
SPLIT2 = tuning.MoeBlocks(
    16,
    tuning.GemmBlocks(32, 16, group_m=1 << 20),
    tuning.GemmBlocks(16, 16, group_m=1 << 20, split_k=2),
)

CASES = [  # (seed, T, Hd, I, E, k, dtype, activation, blocks)
    (0, 13, 48, 40, 5, 2, jnp.float32, "silu", SMALL),  # ragged K and N edges
    (1, 13, 48, 40, 5, 2, jnp.float32, "gelu", SMALL),
    (2, 13, 48, 40, 5, 2, jnp.float32, "gelu_tanh", SMALL),
    (3, 21, 64, 32, 8, 3, jnp.bfloat16, "silu", SMALL),
    (4, 9, 32, 48, 4, 1, jnp.bfloat16, "gelu", SMALL),
    (5, 17, 64, 64, 6, 2, jnp.float16, "gelu_tanh", SMALL),
    (6, 19, 64, 48, 8, 2, jnp.float32, "silu", None),  # tuning-table blocks
    (15, 13, 48, 40, 5, 2, jnp.float32, "silu", SPLIT3),
    (16, 11, 32, 48, 4, 2, jnp.bfloat16, "gelu", SPLIT2),
]


@pytest.mark.parametrize("seed,T,Hd,I,E,k,dtype,activation,blocks", CASES)
def test_triton_fused_moe(seed, T, Hd, I, E, k, dtype, activation, blocks):
    x, wgu, wd, tw, ids = make_case(seed, T, Hd, I, E, k, dtype)
    y = moe_triton.fused_moe(
        x, wgu, wd, tw, ids, activation=activation, interpret=INTERPRET, blocks=blocks
    )
    assert y.dtype == x.dtype and y.shape == x.shape
    check(y, x, wgu, wd, tw, ids, activation)


def gpt_oss_case(seed, T, Hd, I, E, k, dtype, bias=True):
    """make_case with x scaled so |gate|, |up| >> 7 (the swigluoai clamp) and expert biases
    (b_gate_up in the weights' dtype, b_down in float32)."""
    x, wgu, wd, tw, ids = make_case(seed, T, Hd, I, E, k, dtype)
    x = (x.astype(jnp.float32) * 8).astype(dtype)
    rng = np.random.default_rng(seed + 100)
    b = dict(
        b_gate_up=jnp.asarray(rng.standard_normal((E, 2 * I)) * 2, dtype),
        b_down=jnp.asarray(rng.standard_normal((E, Hd)), jnp.float32),
    )
    return x, wgu, wd, tw, ids, (b if bias else {})


GPT_OSS_CASES = [  # (seed, T, Hd, I, E, k, dtype, bias, blocks)
    (20, 13, 48, 40, 5, 2, jnp.float32, True, SMALL),  # ragged N edges: masked bias loads
    (21, 13, 48, 40, 5, 2, jnp.float32, True, SPLIT3),  # down bias once over 3 K splits
    (22, 11, 32, 48, 4, 2, jnp.bfloat16, True, SPLIT2),
    (23, 21, 64, 32, 8, 3, jnp.float16, False, SMALL),
    (24, 19, 64, 48, 8, 2, jnp.float32, True, None),  # tuning-table blocks
]


@pytest.mark.parametrize("seed,T,Hd,I,E,k,dtype,bias,blocks", GPT_OSS_CASES)
def test_triton_swigluoai(seed, T, Hd, I, E, k, dtype, bias, blocks):
    x, wgu, wd, tw, ids, b = gpt_oss_case(seed, T, Hd, I, E, k, dtype, bias)
    y = moe_triton.fused_moe(
        x, wgu, wd, tw, ids, activation="swigluoai", interpret=INTERPRET, blocks=blocks, **b
    )
    assert y.dtype == x.dtype and y.shape == x.shape
    check(y, x, wgu, wd, tw, ids, "swigluoai", **b)


def test_triton_biases_with_gelu_and_custom_clamp():
    x, wgu, wd, tw, ids, b = gpt_oss_case(25, 13, 48, 40, 5, 2, jnp.float32)
    y = moe_triton.fused_moe(
        x / 8, wgu, wd, tw, ids, activation="gelu", interpret=INTERPRET, blocks=SMALL, **b
    )
    check(y, x / 8, wgu, wd, tw, ids, "gelu", **b)
    opts = dict(swiglu_alpha=1.25, swiglu_limit=3.5)
    y = moe_triton.fused_moe(
        x, wgu, wd, tw, ids, activation="swigluoai", interpret=INTERPRET, blocks=SMALL, **b, **opts
    )
    check(y, x, wgu, wd, tw, ids, "swigluoai", **b, **opts)


def test_triton_skewed_and_invalid_routing():
    """All slots on one expert (many tiles of it) and tokens with no valid expert at all."""
    x, wgu, wd, tw, _ = make_case(7, 20, 32, 32, 4, 2, jnp.float32)
    ids = np.full((20, 2), 2, np.int32)
    ids[:, 1] = 3
    ids[5:9] = [-1, 4]  # these tokens get exactly zero
    y = moe_triton.fused_moe(
        x, wgu, wd, tw, jnp.asarray(ids), activation="silu", interpret=INTERPRET, blocks=SMALL
    )
    assert np.all(np.asarray(y)[5:9] == 0)
    check(y, x, wgu, wd, tw, ids, "silu")


def test_triton_no_tokens():
    x, wgu, wd, tw, ids = make_case(8, 1, 32, 32, 4, 2, jnp.float32)
    y = moe_triton.fused_moe(
        x[:0], wgu, wd, tw[:0], ids[:0], activation="silu", interpret=INTERPRET
    )
    assert y.shape == (0, 32)


def test_triton_unsupported():
    with pytest.raises(NotImplementedError, match="xla"):
        moe_triton.check_supported(dtype=jnp.int8)
    with pytest.raises(NotImplementedError, match="xla"):
        moe_triton.check_supported(dtype=jnp.bfloat16, w_dtype=jnp.float32)
    with pytest.raises(NotImplementedError, match="activation"):
        moe_triton.check_supported(dtype=jnp.float32, activation="relu")
    with pytest.raises(ValueError, match="block_n"):
        tuning.GemmBlocks(24, 32)
    with pytest.raises(ValueError, match="launch"):
        tuning.GemmBlocks(32, 32, split_k=0)


def test_erf_approximation():
    g = np.linspace(-6, 6, 4001).astype(np.float32)
    approx = np.asarray(common.erf_f32(jnp.asarray(g)), np.float64)
    exact = np.vectorize(math.erf)(g.astype(np.float64))
    assert np.abs(approx - exact).max() < 1e-6


# --- mosaic kernels ----------------------------------------------------------------

from pallas_kernels.moe import mosaic as moe_mosaic  # noqa: E402

MOSAIC_SMALL = moe_mosaic.MosaicBlocks(
    block_m=64, gate_up_n=32, down_n=32, block_k=32, max_concurrent_steps=2, grid_tile_width=2
)
MOSAIC_CASES = [  # (seed, T, Hd, I, E, k, dtype, activation)
    (10, 13, 64, 64, 4, 2, jnp.bfloat16, "silu"),
    (11, 9, 64, 96, 6, 3, jnp.float16, "gelu"),
    (12, 70, 32, 64, 5, 1, jnp.bfloat16, "gelu_tanh"),  # several tiles of one expert
]


@pytest.mark.parametrize("seed,T,Hd,I,E,k,dtype,activation", MOSAIC_CASES)
def test_mosaic_fused_moe(seed, T, Hd, I, E, k, dtype, activation):
    x, wgu, wd, tw, ids = make_case(seed, T, Hd, I, E, k, dtype)
    y = moe_mosaic.fused_moe(
        x, wgu, wd, tw, ids, activation=activation, interpret=INTERPRET, blocks=MOSAIC_SMALL
    )
    assert y.dtype == x.dtype and y.shape == x.shape
    check(y, x, wgu, wd, tw, ids, activation)


@pytest.mark.skipif(not ON_GPU, reason="tuned Hopper blocks are only run compiled")
def test_mosaic_default_blocks():
    x, wgu, wd, tw, ids = make_case(13, 200, 256, 128, 8, 2, jnp.bfloat16)
    y = moe_mosaic.fused_moe(x, wgu, wd, tw, ids, activation="silu")
    check(y, x, wgu, wd, tw, ids, "silu")


@pytest.mark.parametrize(
    "seed,T,dtype,activation,bias",
    [
        (30, 13, jnp.bfloat16, "swigluoai", True),
        (31, 70, jnp.float16, "swigluoai", False),  # several tiles of one expert
        (32, 9, jnp.bfloat16, "silu", True),
        (33, 9, jnp.float32, "swigluoai", True),  # f32: delegated to the Triton kernels
    ],
)
def test_mosaic_swigluoai(seed, T, dtype, activation, bias):
    x, wgu, wd, tw, ids, b = gpt_oss_case(seed, T, 64, 96, 5, 2, dtype, bias)
    if activation != "swigluoai":
        x = (x.astype(jnp.float32) / 8).astype(dtype)
    y = moe_mosaic.fused_moe(
        x, wgu, wd, tw, ids, activation=activation, interpret=INTERPRET, blocks=MOSAIC_SMALL, **b
    )
    assert y.dtype == x.dtype and y.shape == x.shape
    check(y, x, wgu, wd, tw, ids, activation, **b)


def test_kernels_accept_biases_and_swigluoai():
    for mod in (moe_triton, moe_mosaic):
        mod.check_supported(dtype=jnp.bfloat16, activation="swigluoai", bias=True, hidden=64)


def test_mosaic_unsupported():
    with pytest.raises(NotImplementedError, match="xla"):
        moe_mosaic.check_supported(dtype=jnp.int8)
    with pytest.raises(NotImplementedError, match="hidden"):
        moe_mosaic.check_supported(dtype=jnp.bfloat16, hidden=40, inter=64)


@pytest.mark.skipif(not ON_GPU, reason="tuned blocks are only run compiled")
@pytest.mark.parametrize("T,E,k", [(5, 8, 2), (300, 8, 2), (700, 16, 3)])
def test_triton_default_blocks(T, E, k):
    x, wgu, wd, tw, ids = make_case(14 + T, T, 256, 384, E, k, jnp.bfloat16)
    y = moe_triton.fused_moe(x, wgu, wd, tw, ids, activation="silu")
    check(y, x, wgu, wd, tw, ids, "silu")
