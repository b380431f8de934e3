"""Shared-prefix (cascade) attention: one pass over each shared prefix for all of its rows,
merged with each request's own (suffix) attention, equals plain attention over the full block
tables (prefix blocks, then the request's blocks), against the float64 oracle and against
``paged_attention`` of the same backend.

Caches come from ``build_case``: permuted blocks, NaN in every unused page and slot and in the
padding rows of ``q``, so a read outside a prefix or a suffix shows up as NaN.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import cascade
from jax_paged_attn.testing import assert_close, build_case, oracle
from tests.conftest import run_kw, suite_dtype, supports

BS = 16


class Cascade:
    """Prefixes ``prefix_lens`` (whole blocks) and requests ``(group | None, n, suffix_len)``,
    grouped in order (requests without a group last), over one cache."""

    def __init__(self, rng, prefix_lens, requests, *, num_heads=4, num_kv_heads=2, dtype=None,
                 pad_rows=2):  # fmt: skip
        assert all(p % BS == 0 for p in prefix_lens)
        groups = [g for g, _, _ in requests if g is not None]
        assert groups == sorted(groups) and all(g is not None for g, *_ in requests[: len(groups)])
        num_p = len(prefix_lens)
        seqs = [(0, p) for p in prefix_lens] + [(n, ls) for _, n, ls in requests]
        case = build_case(
            rng,
            seqs,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            block_size=BS,
            dtype=jnp.float32 if dtype is None else dtype,
            pad_rows=pad_rows,
        )
        tables = np.asarray(case.meta.block_tables)
        cu = case.cu_seqlens_q[num_p:]  # the prefixes have no rows: the requests' cu from 0
        lens = case.context_lens[num_p:]
        self.case, self.q, self.cache = case, case.q, case.cache
        self.meta = jpa.AttentionMetadata(
            jnp.asarray(tables[num_p:]), jnp.asarray(lens), jnp.asarray(cu)
        )
        # Group g's rows: those of its requests (an empty range where it has none).
        bounds = [0]
        for g in range(num_p):
            mine = [i for i, (gi, _, _) in enumerate(requests) if gi == g]
            bounds.append(int(cu[mine[-1] + 1]) if mine else bounds[-1])
        self.shared = jpa.AttentionMetadata(
            jnp.asarray(tables[:num_p]),
            jnp.asarray(prefix_lens, jnp.int32),
            jnp.asarray(bounds, jnp.int32),
        )
        # The full tables and contexts of the plain call and of the oracle.
        width = max(p // BS for p in prefix_lens) + tables.shape[1]
        full = np.zeros((len(requests), width), np.int32)
        full_lens, k_full, v_full = [], [], []
        for i, (g, _, ls) in enumerate(requests):
            pb = 0 if g is None else prefix_lens[g] // BS
            if g is not None:
                full[i, :pb] = tables[g, :pb]
            full[i, pb : pb + tables.shape[1]] = tables[num_p + i]
            full_lens.append((0 if g is None else prefix_lens[g]) + ls)
            pk = [] if g is None else [case.k_seqs[g]]
            pv = [] if g is None else [case.v_seqs[g]]
            k_full.append(np.concatenate(pk + [case.k_seqs[num_p + i]]))
            v_full.append(np.concatenate(pv + [case.v_seqs[num_p + i]]))
        self.full_meta = jpa.AttentionMetadata(
            jnp.asarray(full), jnp.asarray(full_lens, jnp.int32), jnp.asarray(cu)
        )
        self.k_full, self.v_full, self.full_lens, self.cu = k_full, v_full, full_lens, cu

    def reference(self, **opts):
        return oracle.attention(
            self.q.astype(jnp.float32),
            self.k_full,
            self.v_full,
            self.full_lens,
            self.cu,
            **opts,
        )


def _require(backend, c: Cascade):
    if not supports(
        backend,
        head_dim=c.cache.head_dim,
        block_size=c.cache.block_size,
        q_dtype=c.q.dtype,
        kv_dtype=c.cache.dtype,
    ):
        pytest.skip(f"{backend} does not run this configuration")


def _lse_tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-2, atol=3e-2)


def _check(c: Cascade, backend, what, *, fold_rows=None, plain=True, **opts):
    dtype = c.q.dtype
    out, got_lse = jpa.cascade_attention(
        c.q,
        c.cache,
        c.shared,
        c.meta,
        fold_rows=fold_rows,
        return_lse=True,
        **opts,
        **run_kw(backend),
    )
    want, want_lse = c.reference(return_lse=True, **opts)
    assert out.shape == c.q.shape and out.dtype == dtype
    assert_close(out, want, dtype, what=f"{what}: cascade vs oracle")
    if plain:  # the same backend's one call over the full tables
        full = jpa.paged_attention(c.q, c.cache, c.full_meta, **opts, **run_kw(backend))
        assert_close(out, np.asarray(full, np.float64), dtype, what=f"{what}: cascade vs plain")
    empty = np.all(want == 0, axis=(1, 2))  # padding rows: exact zeros
    assert np.all(np.asarray(out.astype(jnp.float32))[empty] == 0), what
    got_lse = np.asarray(got_lse)
    assert got_lse.dtype == np.float32
    for value in (np.inf, -np.inf):
        np.testing.assert_array_equal(got_lse == value, want_lse == value, err_msg=what)
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[finite], want_lse[finite], **_lse_tol(dtype))
    return out


# Decode rows: suffixes at 0 (the row is the prefix's last token), 1, BS - 1, BS, BS + 1, 37.
DECODE = [(0, 1, 0), (0, 1, 1), (0, 1, 15), (0, 1, 16), (0, 1, 17), (0, 1, 37)]
# Chunks: multi-row suffixes, a chunk starting at the prefix's last token (2, 1), an idle one.
CHUNKS = [(0, 5, 20), (0, 16, 16), (0, 0, 0), (0, 2, 1), (0, 3, 50), (0, 1, 1)]


@pytest.mark.parametrize("requests", [DECODE, CHUNKS], ids=["decode", "chunks"])
def test_cascade_matches_full_tables(backend, rng, requests):
    c = Cascade(rng, [48], requests, dtype=suite_dtype(backend))
    _require(backend, c)
    _check(c, backend, f"{backend}")


def _opts(feature, num_heads, rng):
    if feature == "sinks":  # finite, -inf (no sink) and +inf (rows exactly 0) sinks
        sinks = rng.normal(size=num_heads).astype(np.float32) * 2
        sinks[0], sinks[-1] = -np.inf, np.inf
        return dict(sinks=jnp.asarray(sinks))
    if feature == "softcap":
        return dict(softcap=5.0, scale=0.5)
    if feature == "alibi":
        return dict(alibi_slopes=jnp.asarray(rng.uniform(0.01, 0.3, num_heads), jnp.float32))
    return {}


@pytest.mark.parametrize("feature", ["sinks", "softcap", "alibi", "gqa"])
def test_cascade_features(backend, rng, feature):
    heads = (8, 2) if feature == "gqa" else (4, 2)
    requests = [(0, 1, 7), (0, 3, 20), (0, 1, 0), (0, 2, 1)]
    c = Cascade(rng, [32], requests, num_heads=heads[0], num_kv_heads=heads[1],
                dtype=suite_dtype(backend))  # fmt: skip
    _require(backend, c)
    # Against the oracle (the plain call over the full tables: the tests above and on xla).
    opts = _opts(feature, heads[0], rng)
    _check(c, backend, f"{backend} {feature}", plain=backend == "xla", **opts)


def test_cascade_groups_on_xla(rng):
    """Three prefixes (one with no rows), requests of two groups and one of none, padding rows;
    every folding (1 row, 3 rows across group edges, the default, all rows)."""
    requests = [(0, 1, 9), (0, 4, 20), (0, 1, 0), (2, 1, 33), (2, 2, 2), (2, 1, 16), (None, 3, 5)]
    c = Cascade(rng, [32, 64, 80], requests, num_heads=8, num_kv_heads=2)
    opts = dict(alibi_slopes=jnp.asarray(rng.uniform(0.01, 0.3, 8), jnp.float32))
    for fold in (1, 3, None, c.q.shape[0]):
        _check(c, "xla", f"fold {fold}", fold_rows=fold, **opts)


def test_cascade_groups(backend, rng):
    requests = [(0, 1, 9), (0, 2, 3), (1, 1, 17), (1, 1, 0), (None, 1, 5)]
    c = Cascade(rng, [16, 32], requests, dtype=suite_dtype(backend))
    _require(backend, c)
    _check(c, backend, f"{backend} groups", fold_rows=2, plain=backend == "xla")


def test_cascade_under_jit_and_grad(rng):
    """One compile for new lengths and groups of the same shapes; gradients through the cascade
    equal those of plain attention over the full tables."""
    c = Cascade(rng, [32], [(0, 1, 5), (0, 2, 9), (0, 1, 20)])
    traces = []

    @jax.jit
    def run(q, cache, shared, meta):
        traces.append(1)
        return jpa.cascade_attention(q, cache, shared, meta, backend="xla")

    run(c.q, c.cache, c.shared, c.meta)
    shorter = jpa.AttentionMetadata(
        c.shared.block_tables, c.shared.context_lens - BS, c.shared.cu_seqlens_q - 0
    )
    run(c.q, c.cache, shorter, c.meta)
    assert len(traces) == 1

    valid = np.isfinite(np.asarray(c.q)).all(axis=(1, 2))
    q = jnp.where(jnp.asarray(valid)[:, None, None], c.q, 0.0)
    w = jnp.asarray(rng.normal(size=c.q.shape), jnp.float32)

    def loss(q, fn):
        return jnp.sum(w * fn(q))

    g_cascade = jax.grad(loss)(
        q, lambda q: jpa.cascade_attention(q, c.cache, c.shared, c.meta, backend="xla")
    )
    g_plain = jax.grad(loss)(
        q, lambda q: jpa.paged_attention(q, c.cache, c.full_meta, backend="xla")
    )
    np.testing.assert_allclose(np.asarray(g_cascade), np.asarray(g_plain), rtol=1e-4, atol=1e-5)


def test_cascade_validation():
    c = Cascade(np.random.default_rng(0), [32], [(0, 1, 5)])

    def call(q=c.q, shared=c.shared, meta=c.meta, backend="xla", **kw):
        return jpa.cascade_attention(q, c.cache, shared, meta, backend=backend, **kw)

    with pytest.raises(ValueError, match="^sliding_window"):
        call(sliding_window=8)
    with pytest.raises(ValueError, match="^shared must be an AttentionMetadata"):
        call(shared=c.shared.block_tables)
    bad = jpa.AttentionMetadata(
        c.shared.block_tables, jnp.array([32, 32], jnp.int32), c.shared.cu_seqlens_q
    )
    with pytest.raises(ValueError, match="^shared.context_lens"):
        call(shared=bad)
    bad = jpa.AttentionMetadata(c.shared.block_tables, c.shared.context_lens, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="^shared.cu_seqlens_q"):
        call(shared=bad)
    with pytest.raises(ValueError, match="^meta"):
        call(meta=c.shared.block_tables)
    with pytest.raises(ValueError, match="^fold_rows"):
        call(fold_rows=0)
    with pytest.raises(ValueError, match="^sinks"):
        call(sinks=jnp.zeros(3))
    with pytest.raises(ValueError, match="^q"):
        call(q=c.q[..., :8])
    with pytest.raises(ValueError, match="^return_lse"):
        call(return_lse="yes")
    with pytest.raises(ValueError, match="^backend"):
        call(backend="cuda")
    empty = jpa.cascade_attention(c.q[:0], c.cache, c.shared, c.meta, backend="xla")
    assert empty.shape == (0,) + c.q.shape[1:]


def test_add_sink_edges():
    out = jnp.ones((3, 2, 4))
    lse = jnp.array([[0.0, -jnp.inf], [1.0, 2.0], [-jnp.inf, -jnp.inf]])
    sinks = jnp.array([jnp.inf, -jnp.inf])
    new_out, new_lse = cascade.add_sink(out, lse, sinks)
    np.testing.assert_array_equal(np.asarray(new_out)[:, 0], 0.0)  # +inf sink: rows are 0
    np.testing.assert_array_equal(np.asarray(new_lse)[:, 0], np.inf)
    np.testing.assert_array_equal(np.asarray(new_out)[:, 1], [[0] * 4, [1] * 4, [0] * 4])
    np.testing.assert_array_equal(np.asarray(new_lse)[:, 1], [-np.inf, 2.0, -np.inf])
    rows = jnp.array([True, False, True])
    _, masked = cascade.add_sink(out, lse, jnp.zeros(2), rows)
    np.testing.assert_array_equal(np.asarray(masked)[1], [1.0, 2.0])  # not a sequence's row
    np.testing.assert_allclose(np.asarray(masked)[2], [0.0, 0.0])  # the sink alone


def test_docstring_examples():
    result = doctest.testmod(cascade)
    assert result.attempted > 0 and result.failed == 0
