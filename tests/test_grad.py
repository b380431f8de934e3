"""jax.grad through paged_attention, paged_decode and fused_moe on every backend.

Kernel backends run their kernel forward and the xla path's VJP backward, so their gradients
must equal the xla backend's; the xla path's own gradients are checked against finite
differences in float64-accurate float32 arithmetic (``jax.test_util.check_grads``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_paged_attn as jpa
from jax_paged_attn import testing
from tests.conftest import run_kw, suite_dtype

FEATURES = {
    "plain": {},
    "softcap+window": dict(softcap=20.0, sliding_window=9),
    "sinks+alibi": dict(sinks=True, alibi_slopes=True),
}


def _attention_loss(kind, case, opts, backend_kw, cotangent):
    def loss(q, k, v, sinks, slopes):
        cache = dataclasses.replace(case.cache, k=k, v=v)
        kw = dict(opts, sinks=sinks, alibi_slopes=slopes, **backend_kw)
        if kind == "decode":
            out = jpa.paged_decode(q, cache, case.meta.block_tables, case.meta.context_lens, **kw)
        else:
            out = jpa.paged_attention(q, cache, case.meta, **kw)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return loss


def _grads(kind, case, feature, backend_kw, rng):
    opts = {k: v for k, v in FEATURES[feature].items() if k not in ("sinks", "alibi_slopes")}
    h = case.q.shape[1]
    sinks = jnp.asarray(rng.normal(size=h), jnp.float32) if "sinks" in FEATURES[feature] else None
    slopes = (
        jnp.asarray(rng.uniform(0.01, 0.3, size=h), jnp.float32)
        if "alibi_slopes" in FEATURES[feature]
        else None
    )
    cot = jnp.asarray(rng.normal(size=case.q.shape), jnp.float32)
    loss = _attention_loss(kind, case, opts, backend_kw, cot)
    args = (case.q, case.cache.k, case.cache.v, sinks, slopes)
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    return jax.jit(jax.grad(loss, argnums=argnums))(*args)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_attention_gradients_match_the_xla_path(backend, kind, feature, rng):
    dtype = suite_dtype(backend)
    seqs = [(1, 37), (1, 5), (1, 20)] if kind == "decode" else [(1, 37), (6, 20), (0, 0)]
    case = testing.build_case(rng, seqs, num_heads=4, num_kv_heads=2, head_dim=64, dtype=dtype)
    # Unused cache slots hold NaN: their gradient must be exactly zero, never NaN.
    got = _grads(kind, case, feature, run_kw(backend), np.random.default_rng(1))
    want = _grads(kind, case, feature, dict(backend="xla"), np.random.default_rng(1))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), 1e-5, 1e-5)


def test_xla_attention_gradients_are_right(rng):
    # Finite differences need finite inputs everywhere: a case without NaN padding.
    case = testing.build_case(rng, [(3, 7), (1, 5)], num_heads=2, num_kv_heads=1, head_dim=64)
    k = jnp.where(jnp.isnan(case.cache.k), 0.0, case.cache.k)
    v = jnp.where(jnp.isnan(case.cache.v), 0.0, case.cache.v)
    sinks = jnp.asarray([0.3, -0.2], jnp.float32)

    def f(q, k, v, sinks):  # check_grads passes NumPy arrays
        cache = dataclasses.replace(case.cache, k=jnp.asarray(k), v=jnp.asarray(v))
        return jpa.paged_attention(q, cache, case.meta, sinks=sinks, softcap=5.0, backend="xla")

    check_grads(f, (case.q, k, v, sinks), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def _moe_case(rng, dtype, tokens=6, experts=4, hidden=32, inter=16, top_k=2):
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), dtype)
    w_gu = jnp.asarray(rng.normal(size=(experts, hidden, 2 * inter)) / hidden**0.5, dtype)
    w_d = jnp.asarray(rng.normal(size=(experts, inter, hidden)) / inter**0.5, dtype)
    weights, ids = jpa.moe_topk(jnp.asarray(rng.normal(size=(tokens, experts))), top_k)
    ids = ids.at[0, 1].set(experts + 3)  # an expert of another device: contributes nothing
    return x, w_gu, w_d, weights, ids


def test_moe_gradients_match_the_xla_path(backend, rng):
    dtype = suite_dtype(backend)
    x, w_gu, w_d, weights, ids = _moe_case(rng, dtype)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def grads(kw):
        def loss(x, w_gu, w_d, weights):
            y = jpa.fused_moe(x, w_gu, w_d, weights, ids, **kw)
            return jnp.sum(y.astype(jnp.float32) * cot)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w_gu, w_d, weights)

    for g, w in zip(grads(run_kw(backend)), grads(dict(backend="xla"))):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), 1e-5, 1e-5)


def test_xla_moe_gradients_are_right(rng):
    x, w_gu, w_d, weights, ids = _moe_case(rng, jnp.float32)

    def f(x, w_gu, w_d, weights):
        return jpa.fused_moe(x, w_gu, w_d, weights, ids, activation="gelu", backend="xla")

    check_grads(f, (x, w_gu, w_d, weights), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
