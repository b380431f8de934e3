"""KV-cache writes and block ops: written slots exact, every other byte untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import backends
from jax_paged_attn.testing import FP8, nan_cache
from tests.conftest import run_kw


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


def _expected_stored(x, cache):
    if cache.is_float8:
        s = cache.k_scale[:, None]
        return jnp.clip(x / s, -448, 448).astype(FP8)
    return x.astype(cache.dtype)


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
    written = slots >= 0
    blk, off = slots[written] // bs, slots[written] % bs
    for old_pages, new_pages, x in ((cache.k, new.k, k), (cache.v, new.v, v)):
        got = np.asarray(new_pages)[blk, :, off]
        want = np.asarray(_expected_stored(x[written], cache))
        np.testing.assert_array_equal(_bits(got), _bits(want))
        untouched = np.ones((nb, bs), bool)
        untouched[blk, off] = False
        np.testing.assert_array_equal(
            _bits(np.asarray(new_pages).transpose(0, 2, 1, 3)[untouched]),
            _bits(np.asarray(old_pages).transpose(0, 2, 1, 3)[untouched]),
        )


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
