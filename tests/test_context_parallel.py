"""Context-parallel decode under ``jax.shard_map`` on the CPU's virtual devices (conftest sets 8
host devices before the CPU backend starts): each device holds a share of every sequence's KV,
decodes it with ``return_lse=True`` and the states are merged across the devices.

Checked against the float64 oracle over each sequence's whole context and against single-device
``paged_decode`` of the same backend; caches from ``build_case`` (permuted blocks, NaN in every
unused page and slot), so a device that reads outside its share shows NaN.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_paged_attn as jpa
from jax_paged_attn import context_parallel as cp
from jax_paged_attn.testing import FP8, assert_close, build_case, oracle
from tests.conftest import run_kw, suite_dtype, supports

AXIS = "cp"


def mesh_of(n: int) -> Mesh:
    devices = jax.devices()
    if len(devices) < n:
        pytest.skip(f"needs {n} devices, JAX sees {len(devices)}")
    return Mesh(np.array(devices[:n]), (AXIS,))


def _require(backend, q_dtype, kv_dtype, head_dim=64, block_size=16):
    # jax 0.11's Mosaic GPU interpreter cannot run kernels on several devices at once (see
    # tests/test_sharding.py); on GPUs the kernels are real.
    if backend == "mosaic" and run_kw(backend)["interpret"]:
        pytest.skip("Mosaic GPU interpreter cannot run kernels on several devices at once")
    if not supports(
        backend, head_dim=head_dim, block_size=block_size, q_dtype=q_dtype, kv_dtype=kv_dtype
    ):
        pytest.skip(f"{backend} does not run this configuration")


def _place(mesh, cache, tables, lens):
    named = cp.context_parallel_specs(mesh, AXIS, float8=cache.is_float8).shardings(mesh)
    return (
        jax.device_put(cache, named.cache),
        jax.device_put(tables, named.block_tables),
        jax.device_put(lens, named.context_lens),
    )


def _check_lse(lse, want, dtype, what):
    lse = np.asarray(lse)
    assert lse.dtype == np.float32, what
    for value in (np.inf, -np.inf):
        np.testing.assert_array_equal(lse == value, want == value, err_msg=f"{what}: {value}")
    finite = np.isfinite(want)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-2, atol=3e-2)
    np.testing.assert_allclose(lse[finite], want[finite], **tol, err_msg=what)


# Contexts of 1, 17, 0 (inactive), 40, 100, 33 tokens, block 16 -> 8 table entries; on 4 devices
# split_context gives each device runs of 2 blocks (32 tokens): 1 and 17 lie wholly on device 0
# (the others hold nothing: lse = -inf there), 100 spans all four.
LENS = [1, 17, 0, 40, 100, 33]


@pytest.mark.parametrize("n", [2, 4])
def test_split_context_matches_single_device(backend, rng, n):
    dtype = suite_dtype(backend)
    _require(backend, dtype, dtype)
    mesh = mesh_of(n)
    case = build_case(rng, [(1, L) for L in LENS], num_heads=8, num_kv_heads=2, dtype=dtype)
    tables, lens = case.meta.block_tables, case.meta.context_lens
    single, single_lse = jpa.paged_decode(
        case.q, case.cache, tables, lens, return_lse=True, **run_kw(backend)
    )
    want, want_lse = case.reference(return_lse=True)
    cache, cp_tables, cp_lens = _place(mesh, *jpa.split_context(case.cache, tables, lens, n))
    assert cache.k.sharding.spec == P(AXIS)
    np.testing.assert_array_equal(np.asarray(cp_lens).sum(0), LENS)
    if n == 4:  # sequence 1 (17 tokens) lies wholly on device 0
        np.testing.assert_array_equal(np.asarray(cp_lens)[:, 1], [17, 0, 0, 0])
    decode = jax.jit(cp.context_parallel_decode(mesh, AXIS, return_lse=True, **run_kw(backend)))
    out, lse = decode(case.q, cache, cp_tables, cp_lens)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert_close(out, want, dtype, what=f"{backend} n={n} vs oracle")
    assert_close(out, np.asarray(single.astype(jnp.float32), np.float64), dtype, what="vs single")
    _check_lse(lse, want_lse, dtype, f"{backend} n={n} lse")
    _check_lse(lse, np.asarray(single_lse, np.float64), dtype, f"{backend} n={n} lse vs single")
    assert np.all(np.asarray(out.astype(jnp.float32))[2] == 0)  # the inactive sequence
    assert out.sharding.is_fully_replicated


def _shares_case(rng, shares, *, num_heads=8, num_kv_heads=2, dtype=jnp.float32):
    """Per-device shares ``shares[d][i]`` tokens of sequence ``i`` (any sizes, partial blocks in
    the middle of a sequence included), each device's pool built by ``build_case``. Returns
    (q, cache, tables [n, S, MB], lens [n, S], k_full, v_full, total lens)."""
    num_seqs = len(shares[0])
    widest = max(-(-L // 16) for row in shares for L in row) + 1
    blocks = sum(-(-L // 16) for row in shares for L in row) + 3  # room for every device's share
    cases = [
        build_case(
            rng,
            [(0, L) for L in row],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            dtype=dtype,
            num_blocks=blocks,
            max_blocks=widest,
        )
        for row in shares
    ]
    k_full = [np.concatenate([c.k_seqs[i] for c in cases]) for i in range(num_seqs)]
    v_full = [np.concatenate([c.v_seqs[i] for c in cases]) for i in range(num_seqs)]
    cache = jpa.KVCache(
        jnp.concatenate([c.cache.k for c in cases]),
        jnp.concatenate([c.cache.v for c in cases]),
        cases[0].cache.k_scale,
        cases[0].cache.v_scale,
    )
    tables = jnp.stack([c.meta.block_tables for c in cases])
    lens = jnp.asarray(np.asarray(shares, np.int32))
    q = jnp.asarray(rng.standard_normal((num_seqs, num_heads, 64)), dtype)
    return q, cache, tables, lens, k_full, v_full, np.asarray(shares).sum(0)


# 4 devices, 5 sequences: one wholly on the last device, one wholly on device 1, one spread
# with partial blocks in the middle, one inactive, one of a single token on device 2.
SHARES = [
    [0, 0, 7, 0, 0],
    [0, 33, 20, 0, 0],
    [0, 0, 1, 0, 1],
    [45, 0, 16, 0, 0],
]


@pytest.mark.parametrize("feature", ["plain", "alibi", "sinks", "softcap"])
def test_uneven_shares(backend, rng, feature):
    dtype = suite_dtype(backend)
    _require(backend, dtype, dtype)
    mesh = mesh_of(4)
    q, cache, tables, lens, k_full, v_full, total = _shares_case(rng, SHARES, dtype=dtype)
    opts = {}
    if feature == "alibi":
        opts = dict(alibi_slopes=jnp.asarray(rng.uniform(0.05, 0.5, 8), jnp.float32))
    elif feature == "sinks":
        sinks = rng.normal(size=8).astype(np.float32)
        sinks[0], sinks[-1] = -np.inf, np.inf
        opts = dict(sinks=jnp.asarray(sinks))
    elif feature == "softcap":
        opts = dict(softcap=5.0, scale=0.5)
    static = {k: opts.pop(k) for k in ("softcap", "scale") if k in opts}
    decode = jax.jit(
        cp.context_parallel_decode(mesh, AXIS, return_lse=True, **static, **run_kw(backend))
    )
    out, lse = decode(q, *_place(mesh, cache, tables, lens), **opts)
    want, want_lse = oracle.attention(
        q.astype(jnp.float32),
        k_full,
        v_full,
        total,
        np.arange(len(total) + 1),
        return_lse=True,
        **static,
        **opts,
    )
    assert_close(out, want, dtype, what=f"{backend} {feature}")
    _check_lse(lse, want_lse, dtype, f"{backend} {feature} lse")


def test_float8_cache(rng):
    mesh = mesh_of(2)
    case = build_case(rng, [(1, L) for L in LENS], num_heads=4, kv_dtype=FP8)
    tables, lens = case.meta.block_tables, case.meta.context_lens
    cache, cp_tables, cp_lens = _place(mesh, *jpa.split_context(case.cache, tables, lens, 2))
    assert cache.k_scale.sharding.is_fully_replicated
    out = cp.context_parallel_decode(mesh, AXIS, backend="xla")(case.q, cache, cp_tables, cp_lens)
    assert_close(out, case.reference(), jnp.float32, what="float8")


def test_merge_states_across_inside_own_shard_map(rng):
    """The collective merge alone: device d's state over key set d, -inf where it has none."""
    mesh = mesh_of(4)
    out = jnp.asarray(rng.normal(size=(4, 3, 2, 8)), jnp.float32)  # [devices, T, H, D]
    lse = rng.normal(size=(4, 3, 2)).astype(np.float32)
    lse[1:, 0] = -np.inf  # row 0: device 0 only
    lse[:, 1, 1] = -np.inf  # row 1, head 1: no device
    out = out.at[1:, 0].set(jnp.nan)  # an empty side's out never matters
    merge = jax.shard_map(
        lambda o, l: cp.merge_states_across(o[0], l[0], AXIS),
        mesh=mesh,
        in_specs=(P(AXIS), P(AXIS)),
        out_specs=(P(), P()),
        check_vma=False,
    )
    got, got_lse = merge(out, jnp.asarray(lse))
    want, want_lse = out[0], jnp.asarray(lse[0])
    for d in range(1, 4):
        want, want_lse = jpa.merge_attention_states(want, want_lse, out[d], jnp.asarray(lse[d]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), rtol=1e-6)
    assert np.isneginf(np.asarray(got_lse)[1, 1]) and np.all(np.asarray(got)[1, 1] == 0)


def test_invalid_arguments_name_them(rng):
    mesh = mesh_of(2)
    case = build_case(rng, [(1, 20), (1, 5)])
    cache, tables, lens = jpa.split_context(
        case.cache, case.meta.block_tables, case.meta.context_lens, 2
    )
    decode = cp.context_parallel_decode(mesh, AXIS, backend="xla")
    with pytest.raises(ValueError, match="^sliding_window"):
        cp.context_parallel_decode(mesh, AXIS, sliding_window=8)
    with pytest.raises(ValueError, match="^axis"):
        cp.context_parallel_decode(mesh, "tp")
    with pytest.raises(ValueError, match="^return_lse"):
        cp.context_parallel_decode(mesh, AXIS, return_lse=1)
    with pytest.raises(ValueError, match="^block_tables"):
        decode(case.q, cache, tables[0], lens)
    with pytest.raises(ValueError, match="^block_tables"):
        decode(case.q, cache, jnp.concatenate([tables, tables]), lens)
    with pytest.raises(ValueError, match="^context_lens"):
        decode(case.q, cache, tables, lens[0])
    odd = jpa.KVCache(cache.k[:-1], cache.v[:-1])
    with pytest.raises(ValueError, match="^cache has"):
        decode(case.q, odd, tables, lens)
    with pytest.raises(ValueError, match="^sinks"):
        decode(case.q, cache, tables, lens, sinks=jnp.zeros(3))
    with pytest.raises(ValueError, match="^num_devices"):
        jpa.split_context(case.cache, case.meta.block_tables, case.meta.context_lens, 0)


def test_docstring_examples():
    result = doctest.testmod(cp)
    assert result.attempted > 0 and result.failed == 0
