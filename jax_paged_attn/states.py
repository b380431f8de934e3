"""Attention states: an output with the log-sum-exp of its softmax denominator.

Attention over a key set ``K`` is the pair ``(out, lse)``: ``out`` the softmax-weighted values,
``lse = log(sum_{t in K} exp(logit_t))`` (natural log, f32; ``-inf`` when ``K`` is empty or
invisible to the row). Two states over disjoint key sets combine exactly into the state over
their union, which is what shared-prefix (cascade) attention, context parallelism and
speculative-decoding verification need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_paged_attn import _checks


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Combines attention over two disjoint key sets: returns ``(out, lse)``.

    ``out_*`` ``[T, H, D]`` (any float dtype; the result has ``out_a``'s), ``lse_*`` f32
    ``[T, H]``. ``lse = logaddexp(lse_a, lse_b)`` and
    ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``, in float32; a side with
    ``lse == -inf`` (it saw no key) contributes nothing, and rows where both are ``-inf`` give
    ``out = 0``, ``lse = -inf``. A sink logit must be counted in one side only.

    >>> import jax.numpy as jnp
    >>> out_a, out_b = jnp.ones((1, 1, 2)), jnp.zeros((1, 1, 2))
    >>> lse_a, lse_b = jnp.log(jnp.array([[3.0]])), jnp.log(jnp.array([[1.0]]))
    >>> out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    >>> out.tolist(), round(float(jnp.exp(lse[0, 0])), 4)   # 3/4 of a's weight, total 4
    ([[[0.75, 0.75]]], 4.0)
    """
    out_a = _checks.as_array("out_a", out_a, ndim=3)
    out_b = _checks.as_array("out_b", out_b, ndim=3)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have out_a's shape {out_a.shape}, got {out_b.shape}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        lse = _checks.as_array(name, lse, ndim=2)
        if lse.shape != out_a.shape[:2]:
            raise ValueError(f"{name} must have shape {out_a.shape[:2]} ([T, H]), got {lse.shape}")
        if not jnp.issubdtype(lse.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {lse.dtype}")
    return _merge(out_a, jnp.asarray(lse_a, jnp.float32), out_b, jnp.asarray(lse_b, jnp.float32))


@jax.jit
def _merge(out_a, lse_a, out_b, lse_b):
    lse = jnp.logaddexp(lse_a, lse_b)
    finite = lse > -jnp.inf
    safe = jnp.where(finite, lse, 0.0)
    # exp(-inf - finite) = 0: an empty side drops out; both empty: weights 0, out 0.
    w_a = jnp.where(finite, jnp.exp(lse_a - safe), 0.0)[..., None]
    w_b = jnp.where(finite, jnp.exp(lse_b - safe), 0.0)[..., None]
    a = jnp.where(w_a > 0, out_a.astype(jnp.float32), 0.0)  # 0 * NaN guards for empty sides
    b = jnp.where(w_b > 0, out_b.astype(jnp.float32), 0.0)
    return (w_a * a + w_b * b).astype(out_a.dtype), lse
