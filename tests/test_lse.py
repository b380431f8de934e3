"""return_lse=True: the log of the softmax denominator of every row, from every backend, and
merge_attention_states over two disjoint block sets reproducing one call over the union."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn.testing import assert_close, build_case
from tests.conftest import run_kw, suite_dtype

# Rows with no key: an inactive sequence (0, 0), a chunk with more rows than keys (5, 3).
MIXED = [(1, 37), (5, 3), (0, 0), (16, 40), (3, 50), (1, 1)]
FEATURES = ["plain", "sinks", "softcap", "window", "alibi", "gqa"]


def _opts(feature, num_heads, rng):
    if feature == "sinks":  # finite, -inf (no sink) and +inf (all weight) sinks
        sinks = rng.normal(size=num_heads).astype(np.float32) * 2
        sinks[0], sinks[-1] = -np.inf, np.inf
        return dict(sinks=jnp.asarray(sinks))
    if feature == "softcap":
        return dict(softcap=5.0, scale=0.5)
    if feature == "window":
        return dict(sliding_window=7)
    if feature == "alibi":
        return dict(alibi_slopes=jnp.asarray(rng.uniform(0.01, 0.3, num_heads), jnp.float32))
    return {}


def _lse_tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-2, atol=3e-2)


def _check_lse(lse, want, dtype, what):
    lse = np.asarray(lse)
    assert lse.dtype == np.float32, what
    for value in (np.inf, -np.inf):  # exactly where the oracle has them
        np.testing.assert_array_equal(lse == value, want == value, err_msg=f"{what}: {value}")
    finite = np.isfinite(want)
    np.testing.assert_allclose(lse[finite], want[finite], **_lse_tol(dtype), err_msg=what)


def _heads(feature):
    return (8, 2) if feature == "gqa" else (4, 2)


@pytest.mark.parametrize("feature", FEATURES)
def test_prefill_lse(backend, rng, feature):
    num_heads, num_kv_heads = _heads(feature)
    dtype = suite_dtype(backend)
    case = build_case(
        rng, MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, pad_rows=3, dtype=dtype
    )
    opts = _opts(feature, num_heads, rng)
    out, lse = jpa.paged_attention(
        case.q, case.cache, case.meta, return_lse=True, **opts, **run_kw(backend)
    )
    want, want_lse = case.reference(return_lse=True, **opts)
    assert lse.shape == case.q.shape[:2]
    assert_close(out, want, dtype, what=f"{backend} out")
    _check_lse(lse, want_lse, dtype, f"{backend} lse")
    # Padding rows past the last sequence see nothing, whatever the sinks.
    assert np.isneginf(np.asarray(lse)[-3:]).all()
    # The same output as without return_lse.
    plain = jpa.paged_attention(case.q, case.cache, case.meta, **opts, **run_kw(backend))
    np.testing.assert_array_equal(np.asarray(plain, np.float32), np.asarray(out, np.float32))


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("contexts", ["short", "long"])
def test_decode_lse(backend, rng, feature, contexts):
    """Decode; long contexts over few sequences make the kernels split the KV (triton's split
    merge, mosaic's stream-K partials, metal's partitions and reduce)."""
    num_heads, num_kv_heads = _heads(feature)
    dtype = suite_dtype(backend)
    lens = [1, 17, 0, 40] if contexts == "short" else [1300, 0, 700]
    case = build_case(
        rng,
        [(1, n) for n in lens],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        block_size=32 if contexts == "long" else 16,
        dtype=dtype,
    )
    opts = _opts(feature, num_heads, rng)
    tables, lens = case.meta.block_tables, case.meta.context_lens
    out, lse = jpa.paged_decode(
        case.q, case.cache, tables, lens, return_lse=True, **opts, **run_kw(backend)
    )
    want, want_lse = case.reference(return_lse=True, **opts)
    assert lse.shape == case.q.shape[:2]
    assert_close(out, want, dtype, what=f"{backend} out")
    _check_lse(lse, want_lse, dtype, f"{backend} lse")


@pytest.mark.parametrize("with_sinks", [False, True])
def test_merge_of_prefix_and_suffix(backend, rng, with_sinks):
    """A shared prefix through one block table and the suffix through another: the suffix's
    queries see the whole prefix (one call, each row its own sequence over the prefix) and
    causally the suffix (a second call); merged, they are one call over the whole context."""
    block_size, prefix, n = 16, 48, 20
    num_heads = 4
    dtype = suite_dtype(backend)
    case = build_case(
        rng, [(n, prefix + n)], num_heads=num_heads, block_size=block_size, dtype=dtype
    )
    sinks = jnp.asarray(rng.normal(size=num_heads), jnp.float32) if with_sinks else None
    full, full_lse = jpa.paged_attention(
        case.q, case.cache, case.meta, sinks=sinks, return_lse=True, **run_kw(backend)
    )
    table = case.meta.block_tables[0]
    nb = prefix // block_size
    prefix_meta = jpa.AttentionMetadata(
        jnp.tile(table[:nb][None], (n, 1)),
        jnp.full((n,), prefix, jnp.int32),
        jnp.arange(n + 1, dtype=jnp.int32),
    )
    a, lse_a = jpa.paged_attention(
        case.q, case.cache, prefix_meta, return_lse=True, **run_kw(backend)
    )
    suffix_meta = jpa.AttentionMetadata(
        table[nb:][None], jnp.array([n], jnp.int32), jnp.array([0, n], jnp.int32)
    )
    # The sink counts in one side only.
    b, lse_b = jpa.paged_attention(
        case.q, case.cache, suffix_meta, sinks=sinks, return_lse=True, **run_kw(backend)
    )
    out, lse = jpa.merge_attention_states(a, lse_a, b, lse_b)
    want, want_lse = case.reference(sinks=sinks, return_lse=True)
    assert_close(out, want, dtype, what=f"{backend} merged")
    _check_lse(lse, want_lse, dtype, f"{backend} merged lse")
    assert_close(out, np.asarray(full, np.float64), dtype, what=f"{backend} merged vs one call")
    _check_lse(lse, np.asarray(full_lse, np.float64), dtype, f"{backend} merged vs one call")
    # The decode kernels give the prefix state as well.
    a2, lse_a2 = jpa.paged_decode(
        case.q,
        case.cache,
        prefix_meta.block_tables,
        prefix_meta.context_lens,
        return_lse=True,
        **run_kw(backend),
    )
    _check_lse(lse_a2, np.asarray(lse_a, np.float64), dtype, f"{backend} decode prefix lse")
    assert_close(a2, np.asarray(a, np.float64), dtype, what=f"{backend} decode prefix")


def test_lse_gradients(backend, rng):
    """lse is differentiable (through the xla path): d lse[r, h] / d sinks[h] is the sink's
    softmax weight exp(sinks[h] - lse[r, h])."""
    dtype = suite_dtype(backend)
    case = build_case(rng, [(3, 20), (1, 9)], dtype=dtype)
    sinks = jnp.asarray(rng.normal(size=4), jnp.float32)

    def total(s):
        _, lse = jpa.paged_attention(
            case.q, case.cache, case.meta, sinks=s, return_lse=True, **run_kw(backend)
        )
        return jnp.sum(lse)

    _, lse = jpa.paged_attention(
        case.q, case.cache, case.meta, sinks=sinks, return_lse=True, **run_kw(backend)
    )
    want = np.exp(np.asarray(sinks)[None] - np.asarray(lse, np.float64)).sum(0)
    got = jax.grad(total)(sinks)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4)
    gq = jax.grad(
        lambda q: jnp.sum(
            jpa.paged_attention(q, case.cache, case.meta, return_lse=True, **run_kw(backend))[1]
        )
    )(case.q)
    assert np.isfinite(np.asarray(gq, np.float32)).all()


def test_empty_calls_and_bad_flag(backend):
    cache = jpa.KVCache.init(4, 16, 2, 64, jnp.float32)
    meta = jpa.AttentionMetadata(
        jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.array([0, 0], jnp.int32)
    )
    out, lse = jpa.paged_attention(
        jnp.zeros((0, 4, 64), suite_dtype(backend)), cache, meta, return_lse=True, **run_kw(backend)
    )
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4) and lse.dtype == jnp.float32
    with pytest.raises(ValueError, match="return_lse"):
        jpa.paged_attention(jnp.zeros((2, 4, 64)), cache, meta, return_lse=1, backend="xla")


# Kernel paths the API's shapes may not pick on this machine, forced through the kernel modules
# (interpreted on a CPU, compiled on a GPU).
ON_GPU = jax.default_backend() == "gpu"


def _kernel_case(rng, seqs, dtype, sinks):
    case = build_case(rng, seqs, num_heads=8, num_kv_heads=2, dtype=dtype)
    args = (case.q, case.cache.k, case.cache.v, case.meta.block_tables, case.meta.context_lens)
    sink = None
    if sinks:
        sink = rng.normal(size=8).astype(np.float32)
        sink[1], sink[6] = -np.inf, np.inf
        sink = jnp.asarray(sink)
    kw = dict(scale=0.2, softcap=None, sliding_window=None, alibi_slopes=None, sinks=sink)
    kw.update(k_scale=None, v_scale=None, interpret=not ON_GPU, return_lse=True)
    return case, args, kw, case.reference(scale=0.2, sinks=sink, return_lse=True)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("sinks", [False, True])
def test_triton_decode_splits_lse(rng, splits, fold, sinks):
    """Triton decode: the single-split epilogue and the split merge, in both softmax domains."""
    from pallas_kernels.paged_attention import triton_decode
    from pallas_kernels.paged_attention.tuning import BlockSizes

    case, args, kw, (want, want_lse) = _kernel_case(
        rng, [(1, 150), (1, 0), (1, 17)], jnp.float32, sinks
    )
    blocks = BlockSizes(block_k=16, num_splits=splits, decode_fold=fold)
    out, lse = triton_decode.paged_decode(*args, block_sizes=blocks, **kw)
    assert_close(out, want, jnp.float32, what="triton decode")
    _check_lse(lse, want_lse, jnp.float32, f"triton decode, {splits} splits")


@pytest.mark.parametrize("stream,num_ctas", [(False, None), (True, 5), (True, 16)])
@pytest.mark.parametrize("sinks", [False, True])
def test_mosaic_decode_paths_lse(rng, stream, num_ctas, sinks):
    """Mosaic decode: whole pairs (their m and l go through the merge) and stream-K partials
    over few CTAs (a long pair spans several, short ones share one)."""
    from pallas_kernels.paged_attention import mosaic_decode

    case, args, kw, (want, want_lse) = _kernel_case(
        rng, [(1, 500), (1, 3), (1, 0)], jnp.bfloat16, sinks
    )
    out, lse = mosaic_decode.paged_decode(*args, stream=stream, num_ctas=num_ctas, **kw)
    assert_close(out, want, jnp.bfloat16, what="mosaic decode")
    _check_lse(lse, want_lse, jnp.bfloat16, f"mosaic decode stream={stream}")


@pytest.mark.parametrize("num_ctas", [None, 3])
def test_mosaic_prefill_persistent_lse(rng, num_ctas):
    """Mosaic prefill: each tile's epilogue writes its rows' m and l, also when a CTA runs
    several items (few persistent CTAs)."""
    from pallas_kernels.paged_attention import mosaic

    case, args, kw, (want, want_lse) = _kernel_case(
        rng, [(70, 90), (5, 3), (0, 0), (9, 9)], jnp.bfloat16, True
    )
    out, lse = mosaic.paged_attention(*args, case.meta.cu_seqlens_q, num_ctas=num_ctas, **kw)
    assert_close(out, want, jnp.bfloat16, what="mosaic prefill")
    _check_lse(lse, want_lse, jnp.bfloat16, "mosaic prefill")
