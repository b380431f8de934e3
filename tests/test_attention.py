"""Conformance of paged_attention / paged_decode / PagedAttention against the float64 oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn.testing import FP8, assert_close, build_case
from tests.conftest import run_kw, suite_dtype, supports

BATCHES = {
    "decode": [(1, 1), (1, 15), (1, 16), (1, 17), (0, 0), (1, 40)],
    "prefill": [(1, 1), (15, 15), (16, 16), (17, 17), (33, 33)],
    "mixed": [(1, 37), (5, 20), (0, 0), (16, 16), (3, 50), (17, 17), (1, 1)],
    # chunks that are the tail of a longer context, and one with more rows than keys
    "chunked": [(7, 30), (16, 48), (5, 3), (1, 64)],
}


def _check(case, backend, **opts):
    dtype = case.q.dtype
    if not supports(
        backend,
        head_dim=case.cache.head_dim,
        block_size=case.cache.block_size,
        q_dtype=dtype,
        kv_dtype=case.cache.dtype,
    ):
        # The contract for what a kernel backend cannot run: a clear error, never garbage.
        with pytest.raises(NotImplementedError, match="xla"):
            jpa.paged_attention(case.q, case.cache, case.meta, **opts, **run_kw(backend))
        return None
    out = jpa.paged_attention(case.q, case.cache, case.meta, **opts, **run_kw(backend))
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    ref = case.reference(**opts)
    assert_close(out, ref, dtype, what=f"{backend}")
    # Rows with no visible key (padding rows, L == 0, n > L) are exactly zero.
    empty = np.all(ref == 0, axis=(1, 2))
    assert np.all(np.asarray(out, np.float32)[empty] == 0)
    return out


@pytest.mark.parametrize("batch", list(BATCHES))
def test_batches(backend, rng, batch):
    case = build_case(rng, BATCHES[batch], pad_rows=3, dtype=suite_dtype(backend))
    _check(case, backend)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim",
    [
        (4, 4, 64),  # MHA
        (8, 2, 64),  # GQA 4
        (16, 2, 64),  # GQA 8
        (6, 2, 64),  # GQA 3 (not a power of two)
        (4, 1, 128),  # MQA
        (8, 2, 256),
        (6, 2, 80),  # head dim that is not a power of two
    ],
)
def test_heads_and_head_dims(backend, rng, num_heads, num_kv_heads, head_dim):
    case = build_case(
        rng,
        [(1, 33), (9, 9), (4, 20)],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=suite_dtype(backend),
    )
    _check(case, backend)


FEATURES = {
    "scale": dict(scale=0.3),
    "softcap": dict(softcap=5.0),
    "window": dict(sliding_window=8),
    "window_long": dict(sliding_window=37),
    "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32)),
    "sinks": dict(sinks=np.array([0.5, -1.0, 2.0, 8.0], np.float32)),
    "all": dict(
        scale=0.2,
        softcap=10.0,
        sliding_window=19,
        alibi_slopes=np.array([0.3, 0.1, 0.05, 0.01], np.float32),
        sinks=np.array([1.0, 0.0, -2.0, 3.0], np.float32),
    ),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(backend, rng, feature):
    case = build_case(
        rng, [(1, 50), (20, 45), (0, 0), (6, 6), (1, 1)], pad_rows=2, dtype=suite_dtype(backend)
    )
    opts = {
        k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v)
        for k, v in FEATURES[feature].items()
    }
    _check(case, backend, **opts)


@pytest.mark.parametrize(
    "dtype,kv_dtype",
    [
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.float16, jnp.float16),
        (jnp.bfloat16, FP8),
        (jnp.float16, FP8),
        (jnp.float32, FP8),
    ],
)
def test_dtypes(backend, rng, dtype, kv_dtype):
    case = build_case(
        rng,
        [(1, 40), (12, 30), (5, 5)],
        num_heads=8,
        num_kv_heads=2,
        head_dim=128,
        dtype=dtype,
        kv_dtype=kv_dtype,
        pad_rows=1,
    )
    _check(case, backend, softcap=30.0)


@pytest.mark.parametrize("block_size", [8, 32, 64])
def test_block_sizes(backend, rng, block_size):
    case = build_case(
        rng,
        [
            (1, block_size - 1),
            (3, block_size + 1),
            (block_size, 2 * block_size),
            (1, 3 * block_size + 5),
        ],
        block_size=block_size,
        dtype=suite_dtype(backend),
    )
    _check(case, backend, sliding_window=block_size + 3)


@pytest.mark.parametrize("opts", [{}, dict(sliding_window=5, softcap=20.0)])
def test_paged_decode_matches_oracle(backend, rng, opts):
    case = build_case(
        rng,
        [(1, 1), (1, 16), (1, 17), (1, 0), (1, 70)],
        num_heads=8,
        num_kv_heads=2,
        dtype=suite_dtype(backend),
    )
    meta = case.meta
    out = jpa.paged_decode(
        case.q, case.cache, meta.block_tables, meta.context_lens, **opts, **run_kw(backend)
    )
    assert out.shape == case.q.shape
    assert_close(out, case.reference(**opts), case.q.dtype, what="paged_decode")
    assert np.all(np.asarray(out)[3] == 0)  # the inactive sequence


def test_long_context_decode(backend, rng):
    # Few sequences and long contexts: decode kernels split the KV across programs.
    case = build_case(
        rng, [(1, 1000), (1, 517)], num_heads=8, num_kv_heads=2, dtype=suite_dtype(backend)
    )
    out = jpa.paged_decode(
        case.q, case.cache, case.meta.block_tables, case.meta.context_lens, **run_kw(backend)
    )
    assert_close(out, case.reference(), case.q.dtype, what="long decode")


def test_layer_writes_then_attends(backend, rng):
    seqs = [(1, 30), (12, 12), (5, 21), (0, 0)]
    case = build_case(
        rng,
        seqs,
        num_heads=8,
        num_kv_heads=2,
        write_new_only=True,
        pad_rows=2,
        dtype=suite_dtype(backend),
    )
    layer = jpa.PagedAttention(
        num_heads=8, head_dim=64, num_kv_heads=2, softcap=25.0, backend=backend
    )
    out, cache = jax.jit(layer, static_argnames="interpret")(
        case.q,
        jnp.asarray(case.new_k),
        jnp.asarray(case.new_v),
        case.cache,
        case.meta,
        interpret=run_kw(backend)["interpret"],
    )
    assert_close(out, case.reference(softcap=25.0), case.q.dtype, what="layer")
    # The cache now holds every context token; its unused slots still hold NaN.
    full = build_case(np.random.default_rng(0), seqs, num_heads=8, num_kv_heads=2)
    assert int(jnp.sum(jnp.isnan(cache.k))) == int(jnp.sum(jnp.isnan(full.cache.k)))


def test_no_recompile_when_batch_contents_change(backend, rng):
    kw = run_kw(backend)
    f = jax.jit(lambda q, c, m: jpa.paged_attention(q, c, m, **kw))
    first = build_case(rng, [(1, 20), (6, 6), (3, 40)], pad_rows=1, dtype=suite_dtype(backend))
    f(first.q, first.cache, first.meta).block_until_ready()
    # Same shapes, other lengths, blocks and composition.
    second = build_case(
        rng, [(4, 10), (1, 1), (5, 41)], pad_rows=1, spare_blocks=4, dtype=suite_dtype(backend)
    )
    assert jax.tree.map(jnp.shape, (second.q, second.cache, second.meta)) == jax.tree.map(
        jnp.shape, (first.q, first.cache, first.meta)
    )
    out = f(second.q, second.cache, second.meta)
    assert f._cache_size() == 1
    assert_close(out, second.reference(), second.q.dtype, what="second batch")


def test_auto_backend_runs(rng):
    case = build_case(rng, [(1, 20), (6, 6)])
    out = jpa.paged_attention(case.q, case.cache, case.meta)  # backend="auto"
    assert_close(out, case.reference(), jnp.float32)
