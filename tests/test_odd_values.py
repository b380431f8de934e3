"""Odd inputs every backend must handle (docs/contract.md, "Correct on every input").

a. fused_moe: NaN/Inf in the weights of an expert no token selects touch no output row, ids
   outside [0, E) contribute zero; the xla path computes float32 in float32 and its memory
   grows with the T * k routed rows, not with E * T.
b. sinks[h] = -inf is no sink; sinks[h] = +inf makes head h's rows exactly 0.
c. Finite inputs give finite, correct outputs however large the logits (huge scale or q).
d. Query rows outside every [cu[i], cu[i+1]) (before cu[0], after cu[S]) are exactly 0.
e. Block ids outside [0, NB) and contexts longer than their block-table row never make a
   kernel read outside the cache; the other sequences stay right. KV writes to a slot whose
   block is outside [0, NB) write nothing.
f. int64 metadata under jax_enable_x64 (through the API and into the kernel entry points).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import backends, reference
from jax_paged_attn.testing import assert_close, build_case, oracle
from tests.conftest import run_kw, suite_dtype

INF = float("inf")


def _attention(backend, case, meta=None, q=None, **opts):
    q = case.q if q is None else q
    return jpa.paged_attention(q, case.cache, meta or case.meta, **opts, **run_kw(backend))


def _decode(backend, case, q, block_tables=None, context_lens=None, **opts):
    bt = case.meta.block_tables if block_tables is None else block_tables
    lens = case.meta.context_lens if context_lens is None else context_lens
    return jpa.paged_decode(q, case.cache, bt, lens, **opts, **run_kw(backend))


def _f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


# ------------------------------------------------------------------------------------------
# a. fused MoE
# ------------------------------------------------------------------------------------------


def _moe_case(rng, num_tokens, num_experts, top_k, hidden, inter, dtype, bad_experts):
    """Routing that never selects ``bad_experts`` (their weights hold NaN and Inf), plus ids
    of other devices' experts (outside [0, E))."""
    good = np.array([e for e in range(num_experts) if e not in bad_experts])
    ids = np.stack([rng.permutation(good)[:top_k] for _ in range(num_tokens)]).astype(np.int32)
    ids[::4, 0] = num_experts + 2
    ids[1::5, -1] = -1
    weights = rng.uniform(0.1, 1.0, (num_tokens, top_k)).astype(np.float32)
    x = rng.standard_normal((num_tokens, hidden))
    wgu = rng.standard_normal((num_experts, hidden, 2 * inter)) / np.sqrt(hidden)
    wd = rng.standard_normal((num_experts, inter, hidden)) / np.sqrt(inter)
    x, wgu, wd = (jnp.asarray(a, dtype) for a in (x, wgu, wd))
    want = oracle.fused_moe(_f32(x), _f32(wgu), _f32(wd), weights, ids)
    poison = np.isin(np.arange(num_experts), bad_experts)[:, None, None]
    wgu = jnp.where(poison, jnp.asarray(jnp.nan, dtype), wgu)
    wd = jnp.where(poison, jnp.asarray(jnp.inf, dtype), wd)
    return x, wgu, wd, jnp.asarray(weights), jnp.asarray(ids), want


def _moe_runs(backend, dtype, num_tokens, top_k, num_experts, hidden, inter) -> bool:
    """Whether the backend's MoE kernels run this shape (else they must raise)."""
    if backend == "xla":
        return True
    config = dict(
        dtype=jnp.dtype(dtype),
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        hidden=hidden,
        inter=inter,
    )
    return backends.supports(backend, "moe", **config)


@pytest.mark.parametrize("num_tokens", [9, 150])
def test_moe_unselected_expert_with_nan_weights(backend, rng, num_tokens):
    dtype = suite_dtype(backend)
    num_experts, top_k, hidden, inter = 8, 2, 32, 48
    x, wgu, wd, w, ids, want = _moe_case(
        rng, num_tokens, num_experts, top_k, hidden, inter, dtype, bad_experts=(3, 6)
    )
    if not _moe_runs(backend, dtype, num_tokens, top_k, num_experts, hidden, inter):
        with pytest.raises(NotImplementedError, match="xla"):
            jpa.fused_moe(x, wgu, wd, w, ids, **run_kw(backend))
        return
    out = jpa.fused_moe(x, wgu, wd, w, ids, **run_kw(backend))
    assert_close(out, want, dtype, what=f"moe {backend}")


def _dot_precisions(jaxpr) -> list:
    """The precision of every dot in a jaxpr, sub-jaxprs (loops, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_precisions(sub)
    return found


def test_xla_moe_float32_is_true_float32():
    # On GPUs the default precision of a float32 matmul is TF32; the xla MoE asks for HIGHEST.
    x = jnp.ones((16, 32))
    w, ids = jpa.moe_topk(jnp.ones((16, 8)), 2)
    args = (x, jnp.ones((8, 32, 64)), jnp.ones((8, 32, 32)), w, ids)
    jaxpr = jax.make_jaxpr(lambda *a: reference.fused_moe(*a, activation="silu"))(*args)
    precisions = _dot_precisions(jaxpr.jaxpr)
    assert precisions, "the xla MoE has no matmul?"
    highest = jax.lax.Precision.HIGHEST
    assert all(p in (highest, (highest, highest)) for p in precisions), precisions


def test_xla_moe_memory_grows_with_routed_rows():
    # DeepSeek-V3's routing (256 experts, top-8) over 4096 tokens, with small matrices: the
    # temporaries must scale with the T * k routed rows (a dense-over-experts lowering needs
    # E * T * k rows: 1 GiB here, 112 GiB at the real hidden size).
    tokens, experts, top_k, hidden, inter = 4096, 256, 8, 64, 32
    sds = jax.ShapeDtypeStruct
    args = (
        sds((tokens, hidden), jnp.bfloat16),
        sds((experts, hidden, 2 * inter), jnp.bfloat16),
        sds((experts, inter, hidden), jnp.bfloat16),
        sds((tokens, top_k), jnp.float32),
        sds((tokens, top_k), jnp.int32),
    )
    fn = jax.jit(lambda *a: reference.fused_moe(*a, activation="silu"))
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    routed_rows = tokens * top_k * (hidden + 2 * inter) * 4  # f32 rows of x and h
    assert temp <= 4 * routed_rows, f"{temp / 2**20:.0f} MiB of temporaries"


# ------------------------------------------------------------------------------------------
# b. infinite sinks
# ------------------------------------------------------------------------------------------

SINKS = np.array([-INF, INF, 0.5, -INF], np.float32)  # one per query head (4)


def _sink_reference(case, q=None, cu=None):
    """-inf heads: no sink; +inf heads: 0; finite heads: the oracle with that sink."""
    q = case.q if q is None else q
    cu = case.cu_seqlens_q if cu is None else cu
    args = (q.astype(jnp.float32), case.k_seqs, case.v_seqs, case.context_lens, cu)
    plain = oracle.attention(*args)
    finite = oracle.attention(*args, sinks=np.where(np.isfinite(SINKS), SINKS, 0.0))
    want = np.where(np.isfinite(SINKS)[None, :, None], finite, plain)
    want[:, SINKS == INF] = 0.0
    return want


def test_infinite_sinks_prefill(backend, rng):
    dtype = suite_dtype(backend)
    case = build_case(rng, [(1, 50), (20, 45), (0, 0), (6, 6)], pad_rows=2, dtype=dtype)
    out = _f32(_attention(backend, case, sinks=jnp.asarray(SINKS)))
    assert_close(out, _sink_reference(case), dtype, what="sinks")
    assert np.all(out[:, SINKS == INF] == 0)


def test_infinite_sinks_decode(backend, rng):
    # Long enough to split the KV across programs (triton, metal) or to merge (mosaic).
    dtype = suite_dtype(backend)
    case = build_case(rng, [(1, 600), (1, 37), (1, 0)], max_blocks=70, dtype=dtype)
    out = _f32(_decode(backend, case, case.q, sinks=jnp.asarray(SINKS)))
    assert_close(out, _sink_reference(case), dtype, what="sinks decode")
    assert np.all(out[:, SINKS == INF] == 0)


# ------------------------------------------------------------------------------------------
# c. huge logits
# ------------------------------------------------------------------------------------------


def _with_equal_keys(case, seq):
    """Every key of sequence ``seq`` set to the same row: at any scale its rows must average
    the values uniformly."""
    tables = np.asarray(case.meta.block_tables)
    bs = case.cache.block_size
    ctx = int(case.context_lens[seq])
    pos = np.arange(ctx)
    slots = tables[seq, pos // bs] * bs + pos % bs
    row = case.k_seqs[seq][:1].astype(np.float32)
    k = np.repeat(row, ctx, axis=0)
    v = case.v_seqs[seq].astype(np.float32)
    case.cache = jpa.write_kv(
        case.cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots, jnp.int32), backend="xla"
    )
    case.k_seqs[seq] = np.repeat(case.k_seqs[seq][:1], ctx, axis=0)
    return case


@pytest.mark.parametrize("scale,q_mult", [(1e6, 1e4), (1e30, 1.0)])
def test_huge_logits_prefill(backend, rng, scale, q_mult):
    dtype = suite_dtype(backend)
    case = build_case(rng, [(1, 50), (20, 45), (6, 6), (3, 70)], pad_rows=1, dtype=dtype)
    case = _with_equal_keys(case, 3)
    case.q = (case.q.astype(jnp.float32) * q_mult).astype(dtype)
    out = _attention(backend, case, scale=scale)
    assert_close(out, case.reference(scale=scale), dtype, what=f"scale {scale} q x{q_mult}")


@pytest.mark.parametrize("scale,q_mult", [(1e6, 1e4), (1e30, 1.0)])
def test_huge_logits_decode(backend, rng, scale, q_mult):
    dtype = suite_dtype(backend)
    case = build_case(rng, [(1, 600), (1, 50), (1, 0), (1, 130)], max_blocks=70, dtype=dtype)
    case = _with_equal_keys(case, 3)
    case.q = (case.q.astype(jnp.float32) * q_mult).astype(dtype)
    out = _decode(backend, case, case.q, scale=scale)
    assert_close(out, case.reference(scale=scale), dtype, what=f"decode scale {scale}")


# ------------------------------------------------------------------------------------------
# d. rows outside every sequence
# ------------------------------------------------------------------------------------------


def test_rows_outside_sequences_are_zero(backend, rng):
    dtype = suite_dtype(backend)
    case = build_case(rng, [(1, 50), (20, 45), (6, 6)], pad_rows=3, dtype=dtype)
    # One more row in front: the sequences start at row 1 (cu_seqlens_q[0] = 1). The first
    # row (finite, so a kernel that attends with it shows) and the rows after the last
    # sequence (NaN) belong to no sequence.
    first = jnp.ones((1,) + case.q.shape[1:], dtype)
    q = jnp.concatenate([first, case.q])
    cu = case.cu_seqlens_q + 1
    meta = jpa.AttentionMetadata(
        case.meta.block_tables, case.meta.context_lens, jnp.asarray(cu, jnp.int32)
    )
    out = _f32(_attention(backend, case, meta=meta, q=q, sinks=jnp.asarray(SINKS)))
    want = np.concatenate([np.zeros_like(out[:1]), _sink_reference(case)])
    assert_close(out, want, dtype, what="shifted rows")
    assert np.all(out[0] == 0) and np.all(out[cu[-1] :] == 0)


# ------------------------------------------------------------------------------------------
# e. block ids outside the cache, contexts longer than their table row
# ------------------------------------------------------------------------------------------

# A: a used table entry far past NB; B: one far below 0; C: a context 37 tokens longer than
# its 3-block table row holds; D, E: ordinary sequences that must stay right.
BAD_SEQS = [(1, 40), (5, 30), (7, 33), (1, 20), (4, 4)]


def _bad_metadata(case):
    tables = np.asarray(case.meta.block_tables).copy()
    lens = np.asarray(case.meta.context_lens).copy()
    nb = case.cache.num_blocks
    tables[0, 1] = nb + (1 << 28)
    tables[1, 0] = -(1 << 28)
    lens[2] = tables.shape[1] * case.cache.block_size + 37
    return jnp.asarray(tables), jnp.asarray(lens)


def test_block_ids_outside_cache_prefill(backend, rng):
    dtype = suite_dtype(backend)
    case = build_case(rng, BAD_SEQS, pad_rows=2, max_blocks=3, dtype=dtype)
    tables, lens = _bad_metadata(case)
    meta = jpa.AttentionMetadata(tables, lens, case.meta.cu_seqlens_q)
    out = _f32(_attention(backend, case, meta=meta))
    good = slice(int(case.cu_seqlens_q[3]), None)  # D, E and the padding rows
    assert_close(out[good], case.reference()[good], dtype, what="other sequences")


def test_block_ids_outside_cache_decode(backend, rng):
    dtype = suite_dtype(backend)
    case = build_case(rng, [(1, kv) for _, kv in BAD_SEQS], max_blocks=3, dtype=dtype)
    tables, lens = _bad_metadata(case)
    out = _f32(_decode(backend, case, case.q, tables, lens))
    assert_close(out[3:], case.reference()[3:], dtype, what="other sequences")


def test_write_kv_slots_outside_cache_write_nothing(backend, rng):
    cache = jpa.KVCache.init(5, 16, 2, 64, jnp.float32)
    cache = jpa.KVCache(jnp.full(cache.k.shape, 7.0), jnp.full(cache.v.shape, -7.0))
    nb_slots = cache.num_blocks * cache.block_size
    # valid, block NB, far past the cache, int32-sized, padding, far below 0, valid
    slots = np.array([3, nb_slots, nb_slots + 1000, 2**31 - 1, -1, -(2**31), 77], np.int32)
    k = jnp.asarray(rng.standard_normal((7, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((7, 2, 64)), jnp.float32)
    if "kv_write" not in backends.TABLE[backend].ops:
        with pytest.raises(NotImplementedError, match="backends that implement kv_write"):
            jpa.write_kv(cache, k, v, jnp.asarray(slots), **run_kw(backend))
        return
    new = jpa.write_kv(cache, k, v, jnp.asarray(slots), **run_kw(backend))
    in_cache = (slots >= 0) & (slots < nb_slots)
    want_k, want_v = oracle.write_kv(
        cache, np.asarray(k)[in_cache], np.asarray(v)[in_cache], slots[in_cache]
    )
    np.testing.assert_array_equal(np.asarray(new.k), want_k)
    np.testing.assert_array_equal(np.asarray(new.v), want_v)


# ------------------------------------------------------------------------------------------
# f. int64 metadata under jax_enable_x64
# ------------------------------------------------------------------------------------------


@pytest.fixture
def x64():
    """jax_enable_x64 for the test, set globally: the Mosaic GPU interpreter runs kernels on
    worker threads, which a ``jax.enable_x64`` context (thread-local) would not reach."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def test_int64_metadata_under_x64(backend, rng, x64):
    dtype = suite_dtype(backend)
    case = build_case(rng, [(1, 50), (20, 45), (6, 6)], pad_rows=1, dtype=dtype)
    want = case.reference()
    bt, lens, cu = (
        jnp.asarray(np.asarray(a), jnp.int64)
        for a in (case.meta.block_tables, case.meta.context_lens, case.meta.cu_seqlens_q)
    )
    assert bt.dtype == jnp.int64
    api = _attention(backend, case, meta=jpa.AttentionMetadata(bt, lens, cu))
    assert_close(api, want, dtype, what="api")
    # The kernel entry points, called as the API would not (with int64 metadata).
    impl = backends.TABLE[backend].ops
    opts = dict(scale=1 / 8, softcap=None, sliding_window=None, alibi_slopes=None, sinks=None)
    opts.update(k_scale=None, v_scale=None, interpret=run_kw(backend)["interpret"])
    pages = (case.cache.k, case.cache.v)
    kernel = impl["attention"].paged_attention(case.q, *pages, bt, lens, cu, **opts)
    assert_close(kernel, want, dtype, what="kernel")
    last = np.asarray(case.cu_seqlens_q[1:]) - 1  # the last row of each sequence: at L - 1
    dec = impl["decode"].paged_decode(case.q[last], *pages, bt, lens, **opts)
    assert_close(dec, want[last], dtype, what="decode kernel")


def test_int64_ids_and_slots_under_x64(backend, rng, x64):
    dtype = suite_dtype(backend)
    x, wgu, wd, w, ids, want = _moe_case(rng, 9, 8, 2, 32, 48, dtype, bad_experts=())
    ids = jnp.asarray(np.asarray(ids), jnp.int64)
    assert_close(jpa.fused_moe(x, wgu, wd, w, ids, **run_kw(backend)), want, dtype, what="moe")
    cache = jpa.KVCache.init(4, 16, 2, 64, jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)
    slots = np.array([5, -1, 40])
    if "kv_write" not in backends.TABLE[backend].ops:
        with pytest.raises(NotImplementedError, match="backends that implement kv_write"):
            jpa.write_kv(cache, k, k, jnp.asarray(slots, jnp.int64), **run_kw(backend))
        return
    new = jpa.write_kv(cache, k, k, jnp.asarray(slots, jnp.int64), **run_kw(backend))
    want_k, _ = oracle.write_kv(cache, np.asarray(k), np.asarray(k), slots)
    np.testing.assert_array_equal(np.asarray(new.k), want_k)
