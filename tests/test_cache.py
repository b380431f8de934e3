"""KV-cache writes and block ops: written slots exact, every other byte untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import backends
from jax_paged_attn.testing import FP8, assert_close, build_case, nan_cache, oracle, random_paged_kv
from tests.conftest import on_cpu, run_kw


@pytest.fixture
def write_backend(backend):
    """The backend under test, for write_kv; a backend without a KV-write kernel must say so."""
    if "kv_write" not in backends.TABLE[backend].ops:
        cache = jpa.KVCache.init(2, 8, 1, 16, jnp.float32)
        with pytest.raises(NotImplementedError, match="backends that implement kv_write"):
            jpa.write_kv(
                cache,
                jnp.ones((1, 1, 16)),
                jnp.ones((1, 1, 16)),
                jnp.zeros((1,), jnp.int32),
                **run_kw(backend),
            )
        pytest.skip(f"backend={backend!r} has no KV-write kernel (NotImplementedError checked)")
    return backend


def _bits(x):
    x = np.asarray(x)
    return x.view(
        np.uint8 if x.dtype.itemsize == 1 else np.uint16 if x.dtype.itemsize == 2 else np.uint32
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, FP8])
def test_write_kv_exact_and_untouched(write_backend, rng, dtype):
    backend = write_backend
    nb, bs, hkv, d = 7, 16, 2, 64
    scale = rng.uniform(0.01, 0.05, hkv).astype(np.float32) if dtype == FP8 else None
    cache = nan_cache(nb, bs, hkv, d, dtype, scale)
    num_tokens = 40
    slots = rng.choice(nb * bs, size=num_tokens, replace=False).astype(np.int32)
    slots[[3, 17, 31]] = -1  # padding tokens write nothing
    k = jnp.asarray(rng.standard_normal((num_tokens, hkv, d)) * 3, jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_tokens, hkv, d)) * 3, jnp.float32)
    new = jpa.write_kv(cache, k, v, jnp.asarray(slots), **run_kw(backend))
    # Bitwise against the oracle: written slots exact, every other byte (NaN) unchanged.
    for got, want in zip((new.k, new.v), oracle.write_kv(cache, k, v, slots)):
        np.testing.assert_array_equal(_bits(got), _bits(want))


def _division_ties(scale):
    """Values ``x`` whose IEEE ``x / scale`` sits exactly on a float8 rounding tie while
    ``x * (1 / scale)`` lands one float32 ulp off it: the two round to neighbouring float8
    values, so only a store that divides matches ``saturate(x / scale)``."""
    f32 = np.float32
    grid = np.arange(256, dtype=np.uint8).view(FP8).astype(f32)
    grid = np.unique(grid[np.isfinite(grid)])
    s = f32(scale)
    found = []
    for mid in (grid[1:] + grid[:-1]) / 2:
        x0 = f32(mid * s)
        for x in (x0, np.nextafter(x0, f32(np.inf)), np.nextafter(x0, f32(-np.inf))):
            exact, recip = (np.clip(y, -448, 448).astype(FP8) for y in (x / s, x * (f32(1) / s)))
            if exact != recip:
                found.append(x)
    return np.array(found, f32)


def test_write_kv_float8_divides_at_rounding_ties(write_backend, request):
    backend = write_backend
    if backend in ("xla", "triton"):
        # XLA's algebraic simplifier turns x / broadcast(scale) into x * broadcast(1 / scale);
        # verified on the CPU (the xla path and the Triton kernel under the interpreter).
        request.applymarker(
            pytest.mark.xfail(
                strict=on_cpu(),
                reason="float8 store computes x * (1 / scale), not x / scale: at rounding ties "
                "it stores the neighbouring float8 value",
            )
        )
    scale = 0.0141351875
    ties = _division_ties(scale)
    assert ties.size >= 16
    x = np.resize(ties, (-(-ties.size // 16) * 16,)).reshape(-1, 1, 16)
    cache = jpa.KVCache.init(x.shape[0] // 16 + 1, 16, 1, 16, FP8, k_scale=scale, v_scale=scale)
    slots = np.arange(x.shape[0], dtype=np.int32)
    new = jpa.write_kv(
        cache, jnp.asarray(x), jnp.asarray(-x), jnp.asarray(slots), **run_kw(backend)
    )
    for got, want in zip((new.k, new.v), oracle.write_kv(cache, x, -x, slots)):
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_write_kv_float8_saturates(write_backend):
    backend = write_backend
    cache = jpa.KVCache.init(2, 8, 1, 16, FP8, k_scale=0.5, v_scale=0.5)
    k = jnp.full((2, 1, 16), 1000.0)  # 1000 / 0.5 = 2000 -> saturates to 448
    new = jpa.write_kv(cache, k, -k, jnp.array([0, 9], jnp.int32), **run_kw(backend))
    assert float(new.k[0, 0, 0, 0].astype(jnp.float32)) == 448.0
    assert float(new.v[1, 0, 1, 0].astype(jnp.float32)) == -448.0


def test_write_kv_in_place_under_donation(write_backend, rng):
    backend = write_backend
    cache = jpa.KVCache.init(64, 16, 2, 64, jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((5, 2, 64)), jnp.bfloat16)
    slots = jnp.array([0, 17, 100, -1, 1023], jnp.int32)
    kw = run_kw(backend)
    f = jax.jit(lambda c, k, v, s: jpa.write_kv(c, k, v, s, **kw), donate_argnums=0)
    hlo = f.lower(cache, k, k, slots).compile().as_text()
    assert "input_output_alias" in hlo, "the cache is not aliased to the output"
    old_k = cache.k
    new = f(cache, k, k, slots)
    assert old_k.is_deleted(), "the donated cache buffer was copied, not reused"
    np.testing.assert_array_equal(
        np.asarray(new.k[6, :, 4], np.float32), np.asarray(k[2], np.float32)
    )


def test_copy_gather_scatter_blocks(rng):
    nb, bs, hkv, d = 6, 8, 2, 16
    cache = jpa.KVCache.init(nb, bs, hkv, d, jnp.float32)
    cache = jpa.scatter_blocks(
        cache,
        jnp.arange(nb, dtype=jnp.int32),
        jnp.asarray(rng.standard_normal((nb, hkv, bs, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((nb, hkv, bs, d)), jnp.float32),
    )
    before_k, before_v = np.asarray(cache.k), np.asarray(cache.v)
    # copy 1->4 and 4->0 in one call: all reads happen before the writes; -1 is padding
    copied = jpa.copy_blocks(
        cache, jnp.array([1, 4, -1], jnp.int32), jnp.array([4, 0, 2], jnp.int32)
    )
    want_k = before_k.copy()
    want_k[4] = before_k[1]
    want_k[0] = before_k[4]
    np.testing.assert_array_equal(np.asarray(copied.k), want_k)
    want_v = before_v.copy()
    want_v[4] = before_v[1]
    want_v[0] = before_v[4]
    np.testing.assert_array_equal(np.asarray(copied.v), want_v)

    k, v = jpa.gather_blocks(cache, jnp.array([5, 2, -1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(k[:2]), before_k[[5, 2]])
    np.testing.assert_array_equal(np.asarray(v[:2]), before_v[[5, 2]])
    assert np.all(np.asarray(k[2]) == 0)
    # round trip through "host memory": scatter into other blocks of a fresh cache
    fresh = jpa.KVCache.init(nb, bs, hkv, d, jnp.float32)
    back = jpa.scatter_blocks(fresh, jnp.array([0, 3, -1], jnp.int32), k, v)
    np.testing.assert_array_equal(np.asarray(back.k[0]), before_k[5])
    np.testing.assert_array_equal(np.asarray(back.v[3]), before_v[2])
    assert np.all(np.asarray(back.k)[[1, 2, 4, 5]] == 0)


def test_gather_blocks_float8_keeps_raw_pages():
    cache = jpa.KVCache.init(3, 8, 1, 16, FP8, k_scale=0.1, v_scale=0.1)
    cache = jpa.write_kv(
        cache, jnp.ones((1, 1, 16)), jnp.ones((1, 1, 16)), jnp.array([9], jnp.int32)
    )
    k, _ = jpa.gather_blocks(cache, jnp.array([1], jnp.int32))
    assert k.dtype == FP8 and float(k[0, 0, 1, 0].astype(jnp.float32)) == 10.0


def test_update_kv_scales():
    cache = jpa.KVCache.init(2, 8, 2, 4, FP8, k_scale=1e-3, v_scale=1.0)
    k = jnp.zeros((3, 2, 4)).at[1, 0, 2].set(-48.0).at[2, 1, 0].set(0.12)
    new = jpa.update_kv_scales(cache, k, k)
    np.testing.assert_allclose(np.asarray(new.k_scale), [48.0 / 240, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.v_scale), [1.0, 1.0])  # scales never shrink


def test_kv_cache_is_a_pytree():
    cache = jpa.KVCache.init(2, 8, 2, 4, FP8)
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 4
    assert jax.tree.map(lambda x: x.shape, cache).k == (2, 2, 8, 4)
    assert cache.k_scale.dtype == jnp.float32 and cache.k_scale.shape == (2,)
    assert jpa.KVCache.init(2, 8, 2, 4).k_scale is None


# ----------------------------------------------------------------------------- the test kit


@pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8, jnp.float32])
@pytest.mark.parametrize("permute", [True, False])
def test_random_paged_kv_layout(dtype, permute):
    lens = [40, 0, 16, 33, 1]
    bs, nb = 16, 14  # 3 + 0 + 1 + 3 + 1 = 8 pages used, 6 spare
    cache, tables, ctx = random_paged_kv(
        jax.random.key(3),
        lens,
        num_kv_heads=2,
        head_dim=8,
        block_size=bs,
        dtype=dtype,
        num_blocks=nb,
        permute=permute,
        max_blocks=5,
    )
    assert cache.k.shape == (nb, 2, bs, 8) and cache.dtype == jnp.dtype(dtype)
    assert tables.shape == (5, 5) and tables.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ctx), lens)
    tables = np.asarray(tables)
    pages = [tables[i, : -(-n // bs)] for i, n in enumerate(lens)]
    used = np.concatenate(pages)
    assert len(set(used.tolist())) == used.size == 8  # no page shared
    if not permute:
        np.testing.assert_array_equal(used, np.arange(8))
    live = np.zeros((nb, bs), bool)
    for i, n in enumerate(lens):
        t = np.arange(n)
        live[tables[i, t // bs], t % bs] = True
    for x in (cache.k, cache.v):
        nan = np.isnan(np.asarray(x.astype(jnp.float32))).all(axis=(1, 3))  # [NB, BS]
        finite = np.isfinite(np.asarray(x.astype(jnp.float32))).all(axis=(1, 3))
        np.testing.assert_array_equal(finite, live)
        np.testing.assert_array_equal(nan, ~live)
    for i, n in enumerate(lens):  # entries past a sequence's pages: a page nobody holds
        assert not live[tables[i, -(-n // bs) :]].any()
    if jnp.dtype(dtype) == FP8:
        for s in (cache.k_scale, cache.v_scale):
            assert np.all((np.asarray(s) >= 1 / 64) & (np.asarray(s) <= 1 / 32))
    else:
        assert cache.k_scale is None


def test_random_paged_kv_against_oracle():
    cache, tables, lens = random_paged_kv(
        jax.random.key(0), [70, 1, 0, 33], num_kv_heads=2, head_dim=64, block_size=16, dtype=FP8
    )
    q = jax.random.normal(jax.random.key(1), (4, 8, 64), jnp.float32)
    out = jpa.paged_decode(q, cache, tables, lens, backend="xla")
    ref = oracle.paged_attention(
        q,
        cache.k,
        cache.v,
        tables,
        lens,
        np.arange(5),
        k_scale=cache.k_scale,
        v_scale=cache.v_scale,
    )
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("junk", [False, True])
def test_build_case_poisons_everything_unused(rng, junk):
    seqs = [(1, 37), (5, 20), (0, 0), (16, 16)]
    case = build_case(rng, seqs, pad_rows=3, spare_blocks=4, junk_tables=junk, kv_dtype=FP8)
    tables, bs, nb = np.asarray(case.meta.block_tables), case.cache.block_size, 10
    assert case.cache.num_blocks == nb  # 3 + 2 + 0 + 1 pages and 4 spare
    live = np.zeros((nb, bs), bool)
    for i, (_, n) in enumerate(seqs):
        t = np.arange(n)
        live[tables[i, t // bs], t % bs] = True
    past = np.concatenate([tables[i, -(-n // bs) :] for i, (_, n) in enumerate(seqs)])
    if junk:  # anything: mostly ids outside the cache
        assert np.any((past < 0) | (past >= nb))
    else:  # spare pages, all NaN
        assert not live[past].any()
    finite = np.isfinite(np.asarray(case.cache.k.astype(jnp.float32))).all(axis=(1, 3))
    np.testing.assert_array_equal(finite, live)
    assert np.isnan(np.asarray(case.q[int(case.cu_seqlens_q[-1]) :])).all()
    assert not np.array_equal(case.cache.k_scale, case.cache.v_scale)
    # the oracle's keys are what the pages hold
    ref = oracle.paged_attention(
        case.q,
        case.cache.k,
        case.cache.v,
        tables,
        case.context_lens,
        case.cu_seqlens_q,
        k_scale=case.cache.k_scale,
        v_scale=case.cache.v_scale,
    )
    np.testing.assert_array_equal(ref, case.reference())
