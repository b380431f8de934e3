"""moe_topk routing and fused_moe against float64 oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import reference
from jax_paged_attn.testing import TOLERANCE, assert_close, oracle
from tests.conftest import run_kw, suite_dtype

ROUTINGS = {
    "softmax": dict(),
    "softmax_renorm": dict(renormalize=True),
    "sigmoid_bias": dict(
        scoring="sigmoid", correction_bias=True, renormalize=True, routed_scaling_factor=2.5
    ),
    "grouped": dict(
        scoring="sigmoid", correction_bias=True, num_expert_group=4, topk_group=2, renormalize=True
    ),
    "grouped_softmax": dict(num_expert_group=2, topk_group=1),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_moe_topk(rng, routing):
    num_tokens, num_experts, top_k = 37, 16, 3
    opts = dict(ROUTINGS[routing])
    if opts.get("correction_bias"):
        opts["correction_bias"] = rng.standard_normal(num_experts).astype(np.float32) * 0.5
    logits = rng.standard_normal((num_tokens, num_experts)).astype(np.float32) * 2
    weights, ids = jax.jit(
        lambda x: jpa.moe_topk(
            x,
            top_k,
            **{k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()},
        )
    )(jnp.asarray(logits))
    want_w, want_ids = oracle.moe_topk(logits, top_k, **opts)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-5, atol=1e-6)


def _moe_inputs(rng, num_tokens, num_experts, top_k, hidden, inter, dtype, foreign=True):
    x = rng.standard_normal((num_tokens, hidden))
    wgu = rng.standard_normal((num_experts, hidden, 2 * inter)) / np.sqrt(hidden)
    wd = rng.standard_normal((num_experts, inter, hidden)) / np.sqrt(inter)
    logits = rng.standard_normal((num_tokens, num_experts))
    weights, ids = oracle.moe_topk(logits, top_k, renormalize=True)
    ids = ids.astype(np.int32)
    if foreign:  # experts owned by other devices: ids outside [0, E) contribute zero
        ids[::5, 0] = num_experts + 3
        ids[1::7, -1] = -1
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    x, wgu, wd = cast(x), cast(wgu), cast(wd)
    want = oracle.fused_moe(
        np.asarray(x, np.float64),
        np.asarray(wgu.astype(jnp.float32)),
        np.asarray(wd.astype(jnp.float32)),
        weights,
        ids,
    )
    return x, wgu, wd, jnp.asarray(weights, jnp.float32), jnp.asarray(ids), want


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k", [(1, 4, 1), (13, 8, 2), (70, 8, 3), (33, 16, 6)]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_moe(backend, rng, num_tokens, num_experts, top_k, dtype):
    x, wgu, wd, w, ids, want = _moe_inputs(rng, num_tokens, num_experts, top_k, 64, 96, dtype)
    out = jpa.fused_moe(x, wgu, wd, w, ids, **run_kw(backend))
    assert out.shape == x.shape and out.dtype == x.dtype
    # the intermediate passes through x.dtype between the GEMMs, as in every fused kernel
    assert_close(
        out, want, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16, what=f"moe {backend}"
    )


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_fused_moe_activations(backend, rng, activation):
    x, wgu, wd, w, ids, _ = _moe_inputs(rng, 19, 4, 2, 32, 48, jnp.float32)
    want = oracle.fused_moe(
        np.asarray(x), np.asarray(wgu), np.asarray(wd), np.asarray(w), np.asarray(ids), activation
    )
    out = jpa.fused_moe(x, wgu, wd, w, ids, activation=activation, **run_kw(backend))
    assert_close(out, want, jnp.float32, what=activation)


def test_fused_moe_f16(backend, rng):
    x, wgu, wd, w, ids, want = _moe_inputs(rng, 24, 8, 2, 64, 64, jnp.float16)
    out = jpa.fused_moe(x, wgu, wd, w, ids, **run_kw(backend))
    assert out.dtype == jnp.float16
    assert_close(out, want, jnp.float16, what="f16")


def test_all_experts_foreign_gives_zero(backend, rng):
    x, wgu, wd, w, ids, _ = _moe_inputs(rng, 9, 4, 2, 32, 32, jnp.float32, foreign=False)
    out = jpa.fused_moe(x, wgu, wd, w, jnp.full_like(ids, 4), **run_kw(backend))
    assert np.all(np.asarray(out) == 0)


def _matmuls(jaxpr):
    """(primitive, operand shapes) of every matmul in ``jaxpr`` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if "dot" in eqn.primitive.name:
            yield eqn.primitive.name, [v.aval.shape for v in eqn.invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _matmuls(inner)


def _xla_matmuls(tokens, experts, top_k, hidden, inter):
    x = jnp.ones((tokens, hidden))
    wgu = jnp.ones((experts, hidden, 2 * inter))
    wd = jnp.ones((experts, inter, hidden))
    w, ids = jpa.moe_topk(jnp.ones((tokens, experts)), top_k)
    jaxpr = jax.make_jaxpr(lambda *a: jpa.fused_moe(*a, backend="xla"))(x, wgu, wd, w, ids)
    matmuls = list(_matmuls(jaxpr.jaxpr))
    assert {name for name, _ in matmuls} == {"dot_general"}, matmuls
    return [shapes for _, shapes in matmuls]


def test_xla_path_is_grouped_not_dense():
    # The xla backend never runs every expert on every token. Its batched matmuls hold the
    # routed rows in per-expert slots: E x C rows, C about the mean rows per expert plus four
    # standard deviations (here E x C = 2.5 T k, where E x T would be 32 T k); its tile loop
    # (the pairs past an expert's slots) multiplies a tile by one expert's 2-D weights.
    tokens, experts, top_k, hidden, inter = 512, 64, 2, 32, 24
    matmuls = _xla_matmuls(tokens, experts, top_k, hidden, inter)
    batched = [s for s in matmuls if len(s[1]) == 3]
    tiles = [s for s in matmuls if len(s[1]) == 2]
    assert {rhs for _, rhs in batched} == {(experts, hidden, 2 * inter), (experts, inter, hidden)}
    assert all(lhs[0] * lhs[1] <= 3 * tokens * top_k for lhs, _ in batched), batched
    assert {rhs for _, rhs in tiles} == {(hidden, 2 * inter), (inter, hidden)}, tiles
    # Fewer pairs than a quarter of the experts (decode over many experts): the tile loop
    # alone, so only the selected experts' weights are read.
    matmuls = _xla_matmuls(3, experts, top_k, hidden, inter)
    assert {rhs for _, rhs in matmuls} == {(hidden, 2 * inter), (inter, hidden)}, matmuls


def _skewed_ids(rng, num_tokens, num_experts, top_k):
    """Most tokens on experts 0 and 1 (far past their capacity), the rest spread; distinct
    experts per token; some ids of other devices."""
    ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)])
    hot = rng.random(num_tokens) < 0.9
    ids[hot, 0] = 0
    ids[hot, 1] = 1
    for t in np.nonzero(hot)[0]:
        rest = [e for e in rng.permutation(num_experts) if e not in (0, 1)]
        ids[t, 2:] = rest[: top_k - 2]
    ids[::11, -1] = num_experts + 1
    ids[3::13, 0] = -1
    return ids.astype(np.int32)


@pytest.mark.parametrize("path", ["auto", "capacity", "loop"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_moe_skewed_routing(rng, path, dtype):
    # Pairs past an expert's capacity go through the tile loop: same result as every form.
    num_tokens, num_experts, top_k = 160, 8, 3
    x, wgu, wd, w, _, _ = _moe_inputs(rng, num_tokens, num_experts, top_k, 64, 48, dtype)
    ids = _skewed_ids(rng, num_tokens, num_experts, top_k)
    plan = reference.moe_plan(num_tokens, top_k, num_experts)
    assert plan.form == "capacity" and plan.overflow
    assert np.sum(ids == 0) > plan.capacity + 16  # the loop has work
    want = oracle.fused_moe(
        np.asarray(x, np.float64),
        np.asarray(wgu.astype(jnp.float32)),
        np.asarray(wd.astype(jnp.float32)),
        np.asarray(w),
        ids,
    )
    fn = jax.jit(lambda *a: reference.fused_moe(*a, activation="silu", path=path))
    out = fn(x, wgu, wd, w, jnp.asarray(ids))
    assert_close(out, want, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16, what=path)


@pytest.mark.parametrize("path", ["capacity", "loop"])
def test_xla_moe_gradients_skewed_routing(rng, path):
    # Gradients of both forms, overflow tiles included, against JAX's own autodiff of the
    # dense computation (every expert on every token, masked by the routing).
    num_tokens, num_experts, top_k = 40, 8, 3
    args = _gpt_oss_case(rng, num_tokens, num_experts, top_k, jnp.float32, True, 32, 16)
    x, wgu, wd, w, _, b_gu, b_d = args
    ids = jnp.asarray(_skewed_ids(rng, num_tokens, num_experts, top_k))
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def api(x, wgu, wd, w, b_gu, b_d):
        return reference.fused_moe(
            x, wgu, wd, w, ids, activation="swigluoai", b_gate_up=b_gu, b_down=b_d, path=path
        )

    def dense(x, wgu, wd, w, b_gu, b_d):
        return _dense_moe(x, wgu, wd, w, ids, b_gu, b_d)

    def grads(fn):
        loss = lambda *a: jnp.sum(fn(*a) * cot)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(x, wgu, wd, w, b_gu, b_d)

    for name, g, v in zip(("x", "wgu", "wd", "w", "b_gu", "b_d"), grads(api), grads(dense)):
        assert g.shape == v.shape and g.dtype == v.dtype, name
        scale = float(jnp.abs(v).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("path", ["capacity", "loop"])
def test_xla_moe_unselected_nan_experts_get_zero_gradients(rng, path):
    num_tokens, num_experts, top_k, bad = 30, 8, 2, (2, 5)
    args = _gpt_oss_case(rng, num_tokens, num_experts, top_k, jnp.float32, True, 32, 16)
    x, wgu, wd, w, ids, b_gu, b_d = args
    ids = jnp.where(jnp.isin(ids, jnp.asarray(bad)), 0, ids)
    poison = jnp.isin(jnp.arange(num_experts), jnp.asarray(bad))
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(wgu, wd, b_gu):
        def loss(x, wgu, wd, w, b_gu, b_d):
            y = reference.fused_moe(
                x, wgu, wd, w, ids, activation="swigluoai", b_gate_up=b_gu, b_down=b_d, path=path
            )
            return jnp.sum(y * cot)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(x, wgu, wd, w, b_gu, b_d)

    clean = grads(wgu, wd, b_gu)
    nan = grads(
        jnp.where(poison[:, None, None], jnp.nan, wgu),
        jnp.where(poison[:, None, None], jnp.inf, wd),
        jnp.where(poison[:, None], jnp.nan, b_gu),
    )
    for name, g, v in zip(("x", "wgu", "wd", "w", "b_gu", "b_d"), nan, clean):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(v), err_msg=name)
    for g in nan[1], nan[2], nan[4], nan[5]:
        assert np.all(np.asarray(g)[np.asarray(poison)] == 0)


def test_xla_moe_memory_scales_with_routed_rows():
    # Compiled temporaries (the gradient's too) grow with the T * k routed rows and the weights,
    # not with E x T: 16x more experts at the same routed rows cost < 2x (a dense-over-experts
    # form would cost 16x), and the forward stays within 2.5x of the routed rows' f32 bytes.
    sds = jax.ShapeDtypeStruct
    hidden, inter, top_k = 64, 32, 8

    def temps(tokens, experts):
        args = (
            sds((tokens, hidden), jnp.bfloat16),
            sds((experts, hidden, 2 * inter), jnp.bfloat16),
            sds((experts, inter, hidden), jnp.bfloat16),
            sds((tokens, top_k), jnp.float32),
        )
        ids = sds((tokens, top_k), jnp.int32)

        def f(x, wgu, wd, w, ids):
            return reference.fused_moe(x, wgu, wd, w, ids, activation="silu")

        def g(x, wgu, wd, w, ids):
            loss = lambda *a: jnp.sum(f(*a, ids).astype(jnp.float32))  # noqa: E731
            return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wgu, wd, w)

        return [
            jax.jit(fn).lower(*args, ids).compile().memory_analysis().temp_size_in_bytes
            for fn in (f, g)
        ]

    routed = 4096 * top_k * (hidden + 2 * inter) * 4
    few, many = temps(4096, 64), temps(4096, 1024)
    assert many[0] < 2 * few[0] and many[0] < 2.5 * routed, (few, many)
    weights_f32 = 1024 * 3 * hidden * inter * 4
    assert many[1] < 2 * few[1] + 2 * weights_f32, (few, many)


def test_tolerance_table_covers_dtypes():
    assert {jnp.dtype(d) for d in (jnp.float32, jnp.float16, jnp.bfloat16)} <= set(TOLERANCE)


# --- gpt-oss experts: clamped SwiGLU (swigluoai) and expert biases -------------------


def _gpt_oss_case(rng, num_tokens, num_experts, top_k, dtype, bias, hidden=64, inter=64):
    """Inputs scaled so |gate|, |up| >> swiglu_limit (7) for most rows, biases ~ N(0, 2^2);
    some ids outside [0, E). Returns the arrays and the float64 inputs the oracle sees."""
    x, wgu, wd, w, ids, _ = _moe_inputs(rng, num_tokens, num_experts, top_k, hidden, inter, dtype)
    x = (x.astype(jnp.float32) * 8).astype(dtype)
    b_gu = jnp.asarray(rng.standard_normal((num_experts, 2 * inter)) * 2, dtype) if bias else None
    b_d = jnp.asarray(rng.standard_normal((num_experts, hidden)), jnp.float32) if bias else None
    return x, wgu, wd, w, ids, b_gu, b_d


def _oracle(x, wgu, wd, w, ids, b_gu, b_d, activation, **kw):
    f64 = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    return oracle.fused_moe(
        f64(x), f64(wgu), f64(wd), f64(w), np.asarray(ids), activation,
        b_gate_up=f64(b_gu), b_down=f64(b_d), **kw,
    )  # fmt: skip


def _check(out, args, activation, dtype, what, **kw):
    """float32: the kit's tolerance against the float64 oracle. Half dtypes (large values,
    much cancellation): at most twice the error of the oracle with h rounded to x.dtype and
    the output rounded, plus 1% of the output's scale."""
    want = _oracle(*args, activation, **kw)
    if jnp.dtype(dtype) == jnp.float32:
        assert_close(out, want, jnp.float32, what=what)
        return
    y = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.all(np.isfinite(y)), what
    same = _oracle(*args, activation, h_dtype=dtype, **kw)
    same = np.asarray(jnp.asarray(same, dtype).astype(jnp.float32), np.float64)
    bound = 2 * np.abs(same - want).max() + 1e-2 * np.abs(want).max()
    err = np.abs(y - want).max()
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_tokens,top_k", [(13, 2), (100, 3)], ids=["decode", "prefill"])
def test_fused_moe_swigluoai(backend, rng, num_tokens, top_k, bias):
    dtype = suite_dtype(backend)
    args = _gpt_oss_case(rng, num_tokens, 8, top_k, dtype, bias)
    x, wgu = args[0], args[1]
    gate_up = np.asarray(x, np.float32) @ np.asarray(wgu[0], np.float32)
    assert np.mean(np.abs(gate_up) > 7.0) > 0.3  # the clamp is exercised on both halves
    kw = dict(activation="swigluoai", b_gate_up=args[5], b_down=args[6])
    if backend == "metal" and num_tokens * top_k > 256:
        with pytest.raises(NotImplementedError, match="decode"):
            jpa.fused_moe(*args[:5], **kw, **run_kw(backend))
        return
    out = jpa.fused_moe(*args[:5], **kw, **run_kw(backend))
    assert out.shape == x.shape and out.dtype == x.dtype
    _check(out, args, "swigluoai", dtype, f"swigluoai {backend}")


def test_fused_moe_swigluoai_alpha_limit(backend, rng):
    dtype = suite_dtype(backend)
    args = _gpt_oss_case(rng, 11, 4, 2, dtype, True)
    opts = dict(swiglu_alpha=1.25, swiglu_limit=3.5)
    out = jpa.fused_moe(
        *args[:5],
        activation="swigluoai",
        b_gate_up=args[5],
        b_down=args[6],
        **opts,
        **run_kw(backend),
    )
    _check(out, args, "swigluoai", dtype, "alpha/limit", **opts)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_moe_biases_other_activations(backend, rng, activation):
    dtype = suite_dtype(backend)
    args = _gpt_oss_case(rng, 19, 4, 2, dtype, True)
    x = (args[0].astype(jnp.float32) / 8).astype(dtype)  # unclamped activations: unit scale
    args = (x, *args[1:])
    out = jpa.fused_moe(
        *args[:5], activation=activation, b_gate_up=args[5], b_down=args[6], **run_kw(backend)
    )
    _check(out, args, activation, dtype, f"{activation} + biases")


def test_foreign_ids_with_biases_give_zero(backend, rng):
    dtype = suite_dtype(backend)
    x, wgu, wd, w, ids, b_gu, b_d = _gpt_oss_case(rng, 9, 4, 2, dtype, True)
    ids = jnp.asarray(np.where(np.arange(ids.size).reshape(ids.shape) % 2, -1, 4), jnp.int32)
    out = jpa.fused_moe(
        x, wgu, wd, w, ids, activation="swigluoai", b_gate_up=b_gu, b_down=b_d, **run_kw(backend)
    )
    assert np.all(np.asarray(out, np.float32) == 0)  # no bias leaks from a foreign expert


def _dense_moe(x, wgu, wd, w, ids, b_gu, b_d, alpha=1.702, limit=7.0):
    """Every expert on every token, masked by the routing (differentiated by JAX itself)."""
    hi = jax.lax.Precision.HIGHEST
    inter = wd.shape[1]
    num_experts = wgu.shape[0]
    gu = jnp.einsum("th,ehn->ten", x, wgu, precision=hi) + b_gu[None]
    g = jnp.minimum(gu[..., :inter], limit)
    u = jnp.clip(gu[..., inter:], -limit, limit)
    y = jnp.einsum("tei,eih->teh", (u + 1) * g * jax.nn.sigmoid(alpha * g), wd, precision=hi)
    y = y + b_d[None]
    route = jnp.sum(jax.nn.one_hot(ids, num_experts) * w[..., None], axis=1)  # [T, E]
    return jnp.einsum("te,teh->th", route, y, precision=hi)


def test_xla_swigluoai_gradients_through_biases(rng):
    args = _gpt_oss_case(rng, 13, 4, 2, jnp.float32, True, hidden=32, inter=48)
    x, wgu, wd, w, ids, b_gu, b_d = args
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(fn):
        return lambda x, wgu, wd, w, b_gu, b_d: jnp.sum(fn(x, wgu, wd, w, b_gu, b_d) * cot)

    def api(x, wgu, wd, w, b_gu, b_d):
        return jpa.fused_moe(
            x, wgu, wd, w, ids, activation="swigluoai", b_gate_up=b_gu, b_down=b_d, backend="xla"
        )

    def dense(x, wgu, wd, w, b_gu, b_d):
        return _dense_moe(x, wgu, wd, w, ids, b_gu, b_d)

    argnums = tuple(range(6))
    inputs = (x, wgu, wd, w, b_gu, b_d)
    got = jax.jit(jax.grad(loss(api), argnums=argnums))(*inputs)
    want = jax.jit(jax.grad(loss(dense), argnums=argnums))(*inputs)
    for name, g, v in zip(("x", "w_gate_up", "w_down", "weights", "b_gu", "b_d"), got, want):
        assert g.shape == v.shape and g.dtype == v.dtype, name
        scale = float(jnp.abs(v).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), atol=1e-4 * scale, err_msg=name)
    assert float(jnp.abs(got[4]).max()) > 0 and float(jnp.abs(got[5]).max()) > 0


def test_swigluoai_gradients_match_the_xla_path(backend, rng):
    dtype = suite_dtype(backend)
    x, wgu, wd, w, ids, b_gu, b_d = _gpt_oss_case(rng, 13, 4, 2, dtype, True)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(kw):
        def loss(x, wgu, wd, w, b_gu, b_d):
            y = jpa.fused_moe(
                x, wgu, wd, w, ids, activation="swigluoai", b_gate_up=b_gu, b_down=b_d, **kw
            )
            return jnp.sum(y.astype(jnp.float32) * cot)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(x, wgu, wd, w, b_gu, b_d)

    for g, v in zip(grads(run_kw(backend)), grads(dict(backend="xla"))):
        assert g.shape == v.shape and g.dtype == v.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(v, np.float32), 1e-5, 1e-5)


X, WGU, WD = jnp.ones((3, 8)), jnp.ones((4, 8, 32)), jnp.ones((4, 16, 8))
W, IDS = jnp.ones((3, 2)), jnp.zeros((3, 2), jnp.int32)
BAD = {
    "b_gate_up shape": (dict(b_gate_up=jnp.ones((4, 16))), "b_gate_up"),
    "b_gate_up dtype": (dict(b_gate_up=jnp.ones((4, 32), jnp.bfloat16)), "b_gate_up"),
    "b_down shape": (dict(b_down=jnp.ones((4, 16))), "b_down"),
    "b_down rank": (dict(b_down=jnp.ones((8,))), "b_down"),
    "b_down int": (dict(b_down=jnp.ones((4, 8), jnp.int32)), "b_down"),
    "alpha nan": (dict(swiglu_alpha=float("nan")), "swiglu_alpha"),
    "alpha traced-like": (dict(swiglu_alpha="1.7"), "swiglu_alpha"),
    "limit inf": (dict(swiglu_limit=float("inf")), "swiglu_limit"),
    "limit zero": (dict(swiglu_limit=0.0), "swiglu_limit"),
    "limit negative": (dict(swiglu_limit=-7.0), "swiglu_limit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_fused_moe_gpt_oss_validation(case):
    kw, name = BAD[case]
    with pytest.raises(ValueError, match=name):
        jpa.fused_moe(X, WGU, WD, W, IDS, activation="swigluoai", backend="xla", **kw)


def test_swiglu_params_ignored_by_other_activations():
    kw = dict(backend="xla", activation="silu")
    a = jpa.fused_moe(X, WGU, WD, W, IDS, **kw)
    b = jpa.fused_moe(X, WGU, WD, W, IDS, swiglu_alpha=3.0, swiglu_limit=0.5, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
