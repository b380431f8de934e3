"""moe_topk routing and fused_moe against float64 oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn.testing import TOLERANCE, assert_close, oracle
from tests.conftest import run_kw

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


def test_xla_path_is_grouped_not_dense():
    # The xla backend must not run every expert on every token: each matmul multiplies routed
    # rows by one expert's weight matrix (2-D), never the stacked [E, ...] weights.
    x = jnp.ones((16, 32))
    wgu = jnp.ones((5, 32, 48))
    wd = jnp.ones((5, 24, 32))
    w, ids = jpa.moe_topk(jnp.ones((16, 5)), 2)
    jaxpr = jax.make_jaxpr(lambda *a: jpa.fused_moe(*a, backend="xla"))(x, wgu, wd, w, ids)
    matmuls = list(_matmuls(jaxpr.jaxpr))
    assert {name for name, _ in matmuls} == {"dot_general"}, matmuls
    assert {shapes[1] for _, shapes in matmuls} == {(32, 48), (24, 32)}, matmuls


def test_tolerance_table_covers_dtypes():
    assert {jnp.dtype(d) for d in (jnp.float32, jnp.float16, jnp.bfloat16)} <= set(TOLERANCE)
