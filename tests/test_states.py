"""merge_attention_states: exact combination of attention over disjoint key sets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa


def _state(logits, values):
    """float64 (out, lse) of softmax(logits) @ values; logits [T, H, K], values [K, D]."""
    if logits.shape[-1] == 0:
        t, h = logits.shape[:2]
        return np.zeros((t, h, values.shape[-1])), np.full((t, h), -np.inf)
    m = logits.max(-1, keepdims=True)
    w = np.exp(logits - m)
    lse = np.log(w.sum(-1)) + m[..., 0]
    return (w / w.sum(-1, keepdims=True)) @ values, lse


@pytest.mark.parametrize("split", [0, 1, 5, 12])
def test_merge_equals_attention_over_the_union(split, rng):
    logits = rng.normal(size=(3, 2, 12)) * 4
    values = rng.normal(size=(12, 8))
    want, want_lse = _state(logits, values)
    a, lse_a = _state(logits[..., :split], values[:split])
    b, lse_b = _state(logits[..., split:], values[split:])
    out, lse = jpa.merge_attention_states(
        jnp.asarray(a, jnp.float32), lse_a, jnp.asarray(b, jnp.float32), lse_b
    )
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6)


def test_empty_sides_and_dtype():
    nan = jnp.full((1, 2, 4), jnp.nan, jnp.bfloat16)  # an empty side's output is never read
    one = jnp.ones((1, 2, 4), jnp.bfloat16)
    inf = jnp.full((1, 2), -jnp.inf)
    out, lse = jpa.merge_attention_states(one, jnp.zeros((1, 2)), nan, inf)
    assert out.dtype == jnp.bfloat16 and (np.asarray(out, np.float32) == 1).all()
    assert (np.asarray(lse) == 0).all()
    out, lse = jpa.merge_attention_states(nan, inf, nan, inf)
    assert not np.asarray(out, np.float32).any() and np.isneginf(np.asarray(lse)).all()


def test_bad_shapes_name_the_argument():
    out = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="out_b must have"):
        jpa.merge_attention_states(out, jnp.zeros((2, 3)), out[:1], jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"lse_b must have shape \(2, 3\)"):
        jpa.merge_attention_states(out, jnp.zeros((2, 3)), out, jnp.zeros((3, 2)))
