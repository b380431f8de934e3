"""float8 experts (SPEC 4.2): the xla path against the float64 quantisation-exact oracle
(``jax_paged_attn.testing.oracle_fp8``), the validation, the gradients, and the kernel
backends' refusal (they have no float8 expert kernels yet: ``auto`` runs xla)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
import metal_plugin
from jax_paged_attn import backends, reference, reference_moe
from jax_paged_attn.testing import FULL_F32, assert_close, oracle, oracle_fp8, rel_error
from pallas_kernels.moe import mosaic as moe_mosaic
from pallas_kernels.moe import triton as moe_triton

FP8 = jnp.float8_e4m3fn
BLOCK = (128, 128)
MODES = {  # name: (block_shape, act_quant)
    "per_channel": (None, None),
    "block": (BLOCK, None),
    "block_act": (BLOCK, "fp8_token_group"),
}


def _case(rng, num_tokens, num_experts, top_k, hidden, inter, dtype, block_shape, bias=False):
    """Random float8 experts as a checkpoint stores them, routing with foreign ids."""
    x = jnp.asarray(rng.standard_normal((num_tokens, hidden)), dtype)
    wgu = rng.standard_normal((num_experts, hidden, 2 * inter)) / np.sqrt(hidden)
    wd = rng.standard_normal((num_experts, inter, hidden)) / np.sqrt(inter)
    wgu8, sgu = oracle_fp8.quantize_weight(wgu, block_shape)
    wd8, sd = oracle_fp8.quantize_weight(wd, block_shape)
    weights, ids = oracle.moe_topk(rng.standard_normal((num_tokens, num_experts)), top_k)
    ids = ids.astype(np.int32)
    ids[::5, 0] = num_experts + 3  # experts of other devices contribute zero
    ids[1::7, -1] = -1
    args = dict(
        x=x,
        w_gate_up=jnp.asarray(wgu8),
        w_down=jnp.asarray(wd8),
        weights=jnp.asarray(weights, jnp.float32),
        ids=jnp.asarray(ids),
    )
    scales = dict(w_gate_up_scale=jnp.asarray(sgu), w_down_scale=jnp.asarray(sd))
    if bias:
        scales["b_gate_up"] = jnp.asarray(rng.standard_normal((num_experts, 2 * inter)), dtype)
        scales["b_down"] = jnp.asarray(rng.standard_normal((num_experts, hidden)) * 0.1)
    return args, scales


def _want(args, kw, **extra):
    return oracle_fp8.fused_moe_fp8(
        *(args[k] for k in ("x", "w_gate_up", "w_down", "weights", "ids")),
        kw["w_gate_up_scale"],
        kw["w_down_scale"],
        h_dtype=args["x"].dtype,
        **{k: v for k, v in kw.items() if not k.endswith("_scale")},
        **extra,
    )


def _check(out, want, dtype, what, act_quant=False):
    if dtype == jnp.float32 and act_quant:
        # f32 accumulation vs float64 moves an element of h across an e4m3 rounding midpoint
        # now and then (about 1 in 1e4): that element moves by 1/16, its row by up to ~1e-3.
        assert_close(out, want, dtype, what=what, atol=1e-2, rtol=1e-2, rel=5e-4)
    elif dtype == jnp.float32:
        assert_close(out, want, dtype, what=what, **FULL_F32)
    else:  # dequantised weights in bf16, the output rounded: ~0.4%
        assert_close(out, want, dtype, what=what, rel=8e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        (37, 8, 2, 256, 128, "silu", False),  # DeepSeek-like: Hd, I multiples of the block
        (29, 6, 2, 192, 80, "swigluoai", True),  # ragged: Hd, 2I not multiples of 128
        (1, 16, 2, 256, 128, "silu", True),  # decode: the tile loop form
    ],
    ids=["deepseek", "ragged-gptoss", "decode"],
)
def test_fp8_experts_match_oracle(rng, mode, dtype, shape):
    num_tokens, experts, top_k, hidden, inter, activation, bias = shape
    block_shape, act_quant = MODES[mode]
    args, kw = _case(rng, num_tokens, experts, top_k, hidden, inter, dtype, block_shape, bias)
    kw.update(activation=activation, block_shape=block_shape, act_quant=act_quant)
    want = _want(args, kw)
    out = jpa.fused_moe(**args, **kw, backend="xla")
    assert out.dtype == dtype and out.shape == args["x"].shape
    _check(out, want, dtype, f"fp8 {mode}", act_quant is not None)


@pytest.mark.parametrize("path", ["capacity", "loop"])
def test_fp8_both_forms_match_oracle(rng, path):
    args, kw = _case(rng, 40, 8, 3, 192, 96, jnp.bfloat16, (64, 128), bias=True)
    kw.update(activation="gelu", block_shape=(64, 128), act_quant="fp8_token_group")
    want = _want(args, kw)
    extra = {k: v for k, v in kw.items() if k != "activation"}
    out = reference_moe.fused_moe(
        args["x"], args["w_gate_up"], args["w_down"], args["weights"], args["ids"],
        activation="gelu", path=path, **extra,
    )  # fmt: skip
    _check(out, want, jnp.bfloat16, path, act_quant=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("hidden", [256, 200])
def test_activation_quantisation_is_bit_exact(rng, dtype, hidden):
    v = rng.standard_normal((64, hidden)) * np.exp(rng.standard_normal((64, 1)) * 3)
    v[3] = 0.0  # an all-zero group: s = 1e-10 / 448, q = 0
    v = jnp.asarray(v, dtype)
    got = np.asarray(jax.jit(reference_moe.quantize_groups, static_argnums=1)(v, 128))
    want = oracle_fp8.quantize_token_groups(v, 128)
    np.testing.assert_allclose(got, want, rtol=2**-23, atol=0)  # the f32 product q * s only


def test_oracle_detects_a_wrong_group_size(rng):
    # The same real weights under blocks of 128 and of 64 rows: only the activations' group
    # size differs, and the f32 path matches its own oracle ~1e-7 but the other one ~1e-2.
    args, kw = _case(rng, 48, 4, 2, 256, 128, jnp.float32, BLOCK)
    kw.update(block_shape=BLOCK, act_quant="fp8_token_group")
    out = jpa.fused_moe(**args, **kw, backend="xla")
    _check(out, _want(args, kw), jnp.float32, "right group", act_quant=True)
    kw64 = dict(
        kw,
        block_shape=(64, 128),
        w_gate_up_scale=jnp.repeat(kw["w_gate_up_scale"], 2, axis=1),
        w_down_scale=jnp.repeat(kw["w_down_scale"], 2, axis=1),
    )
    wrong = _want(args, kw64)
    assert rel_error(out, wrong) > 1e-2  # ~5e-2
    with pytest.raises(AssertionError):
        _check(out, wrong, jnp.float32, "wrong group", act_quant=True)
    # and a path that forgot to quantise the activations fails it too
    assert rel_error(out, _want(args, dict(kw, act_quant=None))) > 1e-2


def test_unselected_expert_with_nan_weights_and_scales(rng):
    args, kw = _case(rng, 12, 4, 1, 128, 64, jnp.float32, BLOCK)
    ids = jnp.asarray(np.arange(12) % 3, jnp.int32)[:, None]  # expert 3 unused
    args.update(ids=ids, weights=jnp.ones((12, 1)))
    want = jpa.fused_moe(**args, **kw, block_shape=BLOCK, backend="xla")
    nan = dict(
        w_gate_up=args["w_gate_up"].at[3].set(jnp.nan),
        w_down_scale=kw["w_down_scale"].at[3].set(jnp.inf),
    )
    out = jpa.fused_moe(**{**args, **kw, **nan}, block_shape=BLOCK, backend="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("path", ["capacity", "loop"])
def test_fp8_gradients(rng, path):
    """d/dx, the routing weights, the biases and the scales are those of the same MoE with the
    dequantised float32 weights; the float8 weights get zero."""
    args, kw = _case(rng, 21, 4, 2, 128, 64, jnp.float32, None, bias=True)
    wgu8, wd8 = args["w_gate_up"], args["w_down"]

    def fp8(x, w, sgu, sd, bgu, wgu8=wgu8):
        return reference_moe.fused_moe(
            x, wgu8, wd8, w, args["ids"], activation="silu", b_gate_up=bgu,
            b_down=kw["b_down"], w_gate_up_scale=sgu, w_down_scale=sd, path=path,
        )  # fmt: skip

    def dense(x, w, sgu, sd, bgu):
        wgu = wgu8.astype(jnp.float32) * sgu[:, None, :]
        wd = wd8.astype(jnp.float32) * sd[:, None, :]
        return reference_moe.fused_moe(
            x, wgu, wd, w, args["ids"], activation="silu", b_gate_up=bgu,
            b_down=kw["b_down"], path=path,
        )  # fmt: skip

    cot = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
    primals = (args["x"], args["weights"], kw["w_gate_up_scale"], kw["w_down_scale"])
    primals += (kw["b_gate_up"],)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)  # noqa: E731
    got = jax.grad(loss(fp8), argnums=(0, 1, 2, 3, 4))(*primals)
    want = jax.grad(loss(dense), argnums=(0, 1, 2, 3, 4))(*primals)
    for name, g, w in zip(("x", "weights", "w_gate_up_scale", "w_down_scale", "bgu"), got, want):
        assert_close(g, w, jnp.float32, what=f"d{name}", **FULL_F32)
    dw8 = jax.grad(lambda w8: jnp.sum(fp8(*primals, wgu8=w8) * cot))(wgu8)
    assert dw8.dtype == FP8 and not np.asarray(dw8.astype(jnp.float32)).any()


def test_fp8_act_quant_gradient_is_straight_through(rng):
    args, kw = _case(rng, 16, 4, 2, 128, 64, jnp.float32, BLOCK)
    kw.update(block_shape=BLOCK)

    def loss(x, act_quant):
        return jnp.sum(jpa.fused_moe(**{**args, "x": x}, **kw, act_quant=act_quant) ** 2)

    g = jax.grad(loss)(args["x"], "fp8_token_group")
    g_plain = jax.grad(loss)(args["x"], None)
    assert np.all(np.isfinite(np.asarray(g)))
    assert 0 < rel_error(g, g_plain) < 0.2  # the identity through the rounding, not zero


def _bad(args, kw, **change):
    return {**args, **kw, **change}


def _validation_cases(args, kw):
    s_gu, s_d = kw["w_gate_up_scale"], kw["w_down_scale"]
    bf16 = dict(w_gate_up=args["w_gate_up"].astype(jnp.float32))
    bf16["w_down"] = args["w_down"].astype(jnp.float32)
    plain = {**args, **bf16}
    return [
        ("w_gate_up_scale", {**args, "w_down_scale": s_d}),
        ("w_down_scale", {**args, "w_gate_up_scale": s_gu}),
        ("w_gate_up_scale", _bad(args, kw, w_gate_up_scale=s_gu[:, :-1])),
        ("w_down_scale", _bad(args, kw, w_down_scale=s_d.astype(jnp.bfloat16))),
        ("w_gate_up_scale", _bad(args, kw, block_shape=BLOCK)),  # per-channel scales
        ("block_shape", _bad(args, kw, block_shape=(128,))),
        ("block_shape", _bad(args, kw, block_shape=(0, 128))),
        ("block_shape", _bad(args, kw, block_shape=(128.0, 128))),
        ("block_shape", _bad(args, kw, block_shape=(True, 128))),
        ("act_quant", _bad(args, kw, act_quant="fp8_tensor")),
        ("block_shape", _bad(args, kw, act_quant="fp8_token_group")),
        ("w_gate_up_scale", {**plain, **kw}),  # scales with float32 weights
        ("act_quant", {**plain, "act_quant": "fp8_token_group", "block_shape": BLOCK}),
        ("block_shape", {**plain, "block_shape": BLOCK}),
        ("w_down", _bad(args, kw, w_down=bf16["w_down"])),  # one float8, one not
        ("b_gate_up", _bad(args, kw, b_gate_up=jnp.zeros((4, 128), FP8))),
    ]


def test_validation_errors_name_the_argument(rng):
    args, kw = _case(rng, 8, 4, 2, 128, 64, jnp.float32, None)
    for name, call in _validation_cases(args, kw):
        with pytest.raises(ValueError, match=name):
            jpa.fused_moe(**call, backend="xla")


def test_block_scales_shapes_ragged(rng):
    # Hd = 200, I = 72 under 128 x 128 blocks: [E, 2, 2] and [E, 1, 2]
    args, kw = _case(rng, 8, 4, 2, 200, 72, jnp.bfloat16, BLOCK)
    assert kw["w_gate_up_scale"].shape == (4, 2, 2) and kw["w_down_scale"].shape == (4, 1, 2)
    jpa.fused_moe(**args, **kw, block_shape=BLOCK, backend="xla")
    with pytest.raises(ValueError, match=r"w_gate_up_scale must be float32 \(4, 4, 2\)"):
        jpa.fused_moe(**args, **kw, block_shape=(64, 128), backend="xla")


@pytest.mark.parametrize("kernel", ["triton", "mosaic", "metal"])
@pytest.mark.parametrize("act_quant", [None, "fp8_token_group"])
def test_kernel_backends_reject_fp8_experts(rng, kernel, act_quant):
    args, kw = _case(rng, 8, 4, 2, 128, 64, jnp.bfloat16, BLOCK)
    kw.update(block_shape=BLOCK, act_quant=act_quant)
    if backends.TABLE[kernel].ops.get("moe") is None:
        pytest.skip(f"{kernel} has no MoE kernels in this build")
    with pytest.raises(NotImplementedError, match=r"float8 expert.*backend=\"xla\""):
        jpa.fused_moe(**args, **kw, backend=kernel, interpret=True)


@pytest.mark.parametrize("mod", [moe_triton, moe_mosaic, metal_plugin], ids=lambda m: m.__name__)
def test_check_supported_float8(mod):
    with pytest.raises(NotImplementedError, match=r"backend=\"xla\""):
        mod.check_supported(dtype=jnp.bfloat16, w_dtype=FP8, activation="silu")
    with pytest.raises(NotImplementedError, match="act_quant"):
        mod.check_supported(dtype=jnp.bfloat16, w_dtype=FP8, act_quant="fp8_token_group")
    mod.check_supported(dtype=jnp.bfloat16, w_dtype=jnp.bfloat16, act_quant=None)
    for name in ("triton", "mosaic", "metal"):
        assert not backends.supports(name, "moe", dtype=jnp.bfloat16, w_dtype=FP8)


def test_auto_runs_xla_for_fp8_experts(rng):
    config = dict(dtype=jnp.bfloat16, w_dtype=FP8, act_quant="fp8_token_group", num_tokens=8)
    impl = backends.implementation("moe", "auto", interpret=False, case="decode", config=config)
    if backends.platform() == "cpu":
        assert impl is reference
    args, kw = _case(rng, 8, 4, 2, 128, 64, jnp.bfloat16, BLOCK)
    kw.update(block_shape=BLOCK, act_quant="fp8_token_group")
    auto = jpa.fused_moe(**args, **kw)
    xla = jpa.fused_moe(**args, **kw, backend="xla")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
