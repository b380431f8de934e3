"""Property-based tests: random batches and options against the naive per-sequence oracle."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_paged_attn as jpa
from jax_paged_attn.testing import assert_close, build_case
from tests.conftest import run_kw, suite_dtype


@st.composite
def batches(draw):
    block_size = draw(st.sampled_from([8, 16, 32]))
    seqs = []
    for _ in range(draw(st.integers(1, 5))):
        ctx = draw(st.integers(0, 3 * block_size + 2))
        n = draw(st.integers(0, max(ctx, 1)))  # n > ctx only for ctx == 0
        seqs.append((n, ctx))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    kv_heads = draw(st.sampled_from([1, 2]))
    opts = {}
    if draw(st.booleans()):
        opts["sliding_window"] = draw(st.integers(1, 2 * block_size))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(1.0, 50.0))
    if draw(st.booleans()):
        opts["sinks"] = draw(
            st.lists(st.floats(-3, 3), min_size=group * kv_heads, max_size=group * kv_heads)
        )
    if draw(st.booleans()):
        opts["alibi_slopes"] = draw(
            st.lists(st.floats(0, 1), min_size=group * kv_heads, max_size=group * kv_heads)
        )
    return dict(
        seqs=seqs,
        block_size=block_size,
        num_heads=group * kv_heads,
        num_kv_heads=kv_heads,
        pad_rows=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31)),
        opts=opts,
    )


@settings(
    max_examples=15,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=batches())
def test_random_batches_match_oracle(backend, batch):
    if sum(n for n, _ in batch["seqs"]) + batch["pad_rows"] == 0:
        batch["pad_rows"] = 1  # q needs at least one row
    case = build_case(
        np.random.default_rng(batch["seed"]),
        batch["seqs"],
        num_heads=batch["num_heads"],
        num_kv_heads=batch["num_kv_heads"],
        head_dim=64,
        block_size=batch["block_size"],
        pad_rows=batch["pad_rows"],
        dtype=suite_dtype(backend),
    )
    opts = {
        k: (np.asarray(v, np.float32) if isinstance(v, list) else v)
        for k, v in batch["opts"].items()
    }
    out = jpa.paged_attention(
        case.q,
        case.cache,
        case.meta,
        **{k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()},
        **run_kw(backend),
    )
    assert_close(out, case.reference(**opts), case.q.dtype, what=str(batch))
