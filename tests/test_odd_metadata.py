"""Odd but legal metadata, on every backend: zero rows and sequences, int64 metadata, block
ids outside the cache in the block ops, and what check_metadata reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import testing
from tests.conftest import run_kw, suite_dtype


def _cache(dtype=jnp.float32, nb=6, bs=16, hkv=2, d=64):
    return jpa.KVCache.init(nb, bs, hkv, d, dtype)


def test_zero_query_rows_return_empty(backend):
    dtype = suite_dtype(backend)
    cache = _cache(dtype)
    tables = jnp.array([[1, 2], [3, 4]], jnp.int32)
    lens = jnp.array([20, 5], jnp.int32)
    q = jnp.zeros((0, 4, 64), dtype)
    meta = jpa.AttentionMetadata(tables, lens, jnp.zeros((3,), jnp.int32))
    out = jpa.paged_attention(q, cache, meta, **run_kw(backend))
    assert out.shape == (0, 4, 64) and out.dtype == dtype


def test_zero_sequences_return_empty_or_zero_rows(backend):
    dtype = suite_dtype(backend)
    cache = _cache(dtype)
    tables = jnp.zeros((0, 2), jnp.int32)
    lens = jnp.zeros((0,), jnp.int32)
    out = jpa.paged_decode(jnp.zeros((0, 4, 64), dtype), cache, tables, lens, **run_kw(backend))
    assert out.shape == (0, 4, 64)
    # Rows with no sequence at all are padding: zeros, never NaN.
    q = jnp.full((3, 4, 64), jnp.nan, dtype)
    meta = jpa.AttentionMetadata(tables, lens, jnp.zeros((1,), jnp.int32))
    out = jpa.paged_attention(q, cache, meta, **run_kw(backend))
    assert out.shape == (3, 4, 64) and not np.asarray(out, np.float32).any()


def test_zero_tokens_moe_and_routing(backend):
    dtype = suite_dtype(backend)
    x = jnp.zeros((0, 32), dtype)
    w_gu = jnp.ones((4, 32, 2 * 16), dtype)
    w_d = jnp.ones((4, 16, 32), dtype)
    w, ids = jpa.moe_topk(jnp.zeros((0, 4)), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    y = jpa.fused_moe(x, w_gu, w_d, w, ids, **run_kw(backend))
    assert y.shape == (0, 32) and y.dtype == dtype


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def test_int64_metadata_means_the_same_as_int32(backend, rng, x64):
    dtype = suite_dtype(backend)
    case = testing.build_case(rng, [(1, 37), (5, 20), (0, 0), (3, 3)], dtype=dtype, pad_rows=1)
    meta64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.int64), case.meta)
    assert meta64.block_tables.dtype == jnp.int64
    out = jpa.paged_attention(case.q, case.cache, meta64, **run_kw(backend))
    testing.assert_close(out, case.reference(), dtype, "int64 metadata")
    decode = testing.build_case(rng, [(1, 40), (1, 3), (1, 17)], dtype=dtype)
    out = jpa.paged_decode(
        decode.q,
        decode.cache,
        jnp.asarray(np.asarray(decode.meta.block_tables), jnp.int64),
        jnp.asarray(np.asarray(decode.meta.context_lens), jnp.int64),
        **run_kw(backend),
    )
    testing.assert_close(out, decode.reference(), dtype, "int64 decode")


def _filled(nb=5):
    cache = _cache(nb=nb, hkv=1, d=8, bs=4)
    k = jnp.arange(cache.k.size, dtype=jnp.float32).reshape(cache.k.shape)
    return jpa.KVCache(k, -k, None, None)


def test_block_ops_ignore_ids_outside_the_cache():
    cache = _filled()
    nb = cache.num_blocks
    # copy_blocks: a source or destination outside [0, NB) copies nothing (no clamping).
    out = jpa.copy_blocks(cache, jnp.array([nb + 3, 1, -1], jnp.int32), jnp.array([0, nb, 2]))
    np.testing.assert_array_equal(out.k, cache.k)
    out = jpa.copy_blocks(cache, jnp.array([nb, 1], jnp.int32), jnp.array([0, 3], jnp.int32))
    np.testing.assert_array_equal(out.k[0], cache.k[0])
    np.testing.assert_array_equal(out.k[3], cache.k[1])
    # gather_blocks: such an id gives a zero page.
    k, v = jpa.gather_blocks(cache, jnp.array([2, nb, -1, 10**6], jnp.int32))
    np.testing.assert_array_equal(k[0], cache.k[2])
    assert not np.asarray(k[1:]).any() and not np.asarray(v[1:]).any()
    # scatter_blocks and write_kv: such an entry writes nothing.
    pages = jnp.full((2,) + cache.k.shape[1:], 7.0)
    out = jpa.scatter_blocks(cache, jnp.array([nb, -2], jnp.int32), pages, pages)
    np.testing.assert_array_equal(out.k, cache.k)
    rows = jnp.ones((2, 1, 8))
    out = jpa.write_kv(cache, rows, rows, jnp.array([nb * 4, -1], jnp.int32), backend="xla")
    np.testing.assert_array_equal(out.k, cache.k)


def _meta(tables, lens, cu, slots=None):
    arr = lambda a: None if a is None else jnp.asarray(a, jnp.int32)  # noqa: E731
    return jpa.AttentionMetadata(arr(tables), arr(lens), arr(cu), arr(slots))


@pytest.mark.parametrize(
    "meta, message",
    [
        (_meta([[1, 9], [7, 0]], [20, 17], [0, 1, 2]), r"block ids in use outside \[0, 4\): \[9, 7\]"),
        (_meta([[1, 2]], [-3], [0, 1]), r"meta.context_lens must be >= 0"),
        (_meta([[1, 2]], [40], [0, 1]), r"meta.context_lens: sequences \[0\] have contexts \[40\]"),
        (_meta([[1, 2], [0, 3]], [5, 5], [0, 2, 1]), r"meta.cu_seqlens_q must be non-decreasing"),
        (_meta([[1, 2]], [5], [1, 2]), r"meta.cu_seqlens_q\[0\] must be 0"),
        (_meta([[1, 2]], [5], [0, 9]), r"cu_seqlens_q\[-1\] = 9 exceeds .* T = 4"),
        (_meta([[1, 2]], [20], [0, 2], [5, 5, 6, -1]), r"duplicate slots \[5\]"),
        (_meta([[1, 2]], [20], [0, 2], [5, 64, -1, -1]), r"meta.slot_mapping: slots at rows \[1\]"),
        (_meta([[1, 2]], [2], [0, 3]), r"more query rows than context tokens"),
    ],
)  # fmt: skip
def test_check_metadata_reports_each_violation(meta, message):
    cache = _cache(nb=4, hkv=1, d=8)
    with pytest.raises(ValueError, match=message):
        jpa.check_metadata(cache, meta, num_tokens=4)


def test_check_metadata_reports_every_violation_at_once():
    cache = _cache(nb=4, hkv=1, d=8)
    meta = _meta([[1, 9], [-5, 0]], [-1, 20], [0, 2, 1], [3, 3, -1, 3])
    with pytest.raises(ValueError) as e:
        jpa.check_metadata(cache, meta)
    lines = str(e.value).splitlines()
    assert [ln.split(":")[0].split(" ")[0] for ln in lines] == [
        "meta.block_tables",
        "meta.cu_seqlens_q",
        "meta.context_lens",
        "meta.slot_mapping",
    ]
    assert "[-5]" in lines[0] and "duplicate slots [3]" in lines[3]


def test_check_metadata_needs_the_row_count():
    with pytest.raises(ValueError, match="num_tokens must be given"):
        jpa.check_metadata(_cache(), _meta([[1, 2]], [5], [0, 1]))
    jpa.check_metadata(_cache(), _meta([[1, 2]], [5], [0, 1]), num_tokens=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=0.0), r"scale must be > 0 \(None means 1/sqrt\(head_dim\)\)"),
        (dict(softcap=-1.0), r"softcap must be > 0 \(None means no softcap\)"),
        (dict(sliding_window=0), r"sliding_window must be > 0 \(None means no window\)"),
    ],
)
def test_non_positive_options_say_what_none_means(kwargs, message):
    cache = _cache()
    meta = _meta([[1, 2]], [5], [0, 1])
    with pytest.raises(ValueError, match=message):
        jpa.paged_attention(jnp.zeros((1, 4, 64)), cache, meta, backend="xla", **kwargs)


def test_metadata_checks_under_checkify_catch_duplicate_slots():
    from jax.experimental import checkify

    cache = _cache(nb=4, hkv=1, d=8)
    meta = _meta([[1, 2]], [20], [0, 2], [5, 5, 6, -1])

    @jax.jit
    def run(cache, meta):
        jpa.metadata_checks(cache, meta, num_tokens=4)

    err, _ = checkify.checkify(run)(cache, meta)
    with pytest.raises(checkify.JaxRuntimeError, match="duplicate slots"):
        err.throw()
