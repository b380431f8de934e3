"""Tensor-parallel attention and expert-parallel MoE under ``jax.shard_map`` (8 host devices).

Every sharded result is checked against the single-device call of the same backend on the same
inputs, and against the float64 oracle; caches come from ``build_case`` (permuted block tables,
NaN in every unused slot), so a device that reads a KV head or a page it should not shows NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_paged_attn as jpa
from jax_paged_attn import sharding as sh
from jax_paged_attn.testing import FP8, assert_close, build_case, oracle
from tests.conftest import run_kw, suite_dtype, supports
from tests.test_moe import _moe_inputs

AXIS = "tp"
MIXED = [(1, 37), (5, 20), (0, 0), (16, 16), (3, 50), (1, 1)]


def mesh_of(n: int, axis: str = AXIS) -> Mesh:
    devices = jax.devices()
    if len(devices) < n:
        pytest.skip(f"needs {n} devices, JAX sees {len(devices)}")
    return Mesh(np.array(devices[:n]), (axis,))


def _skip_interpreted_mosaic(backend):
    # jax 0.11's Mosaic GPU interpreter keeps one global shared memory for all devices and
    # checks after each kernel that *no* device still holds a barrier, so interpreted Mosaic
    # kernels cannot run on two devices at once (the other device's live barrier trips it, and
    # the interpreter stays failed for the rest of the process). On GPUs the kernels are real.
    if backend == "mosaic" and run_kw(backend)["interpret"]:
        pytest.skip("Mosaic GPU interpreter cannot run kernels on several devices at once")


def _require(backend, case):
    _skip_interpreted_mosaic(backend)
    if not supports(
        backend,
        head_dim=case.cache.head_dim,
        block_size=case.cache.block_size,
        q_dtype=case.q.dtype,
        kv_dtype=case.cache.dtype,
    ):
        pytest.skip(
            f"{backend} does not run this configuration (tests/test_attention.py "
            "checks its NotImplementedError)"
        )


def _single_and_oracle(case, backend, **opts):
    _require(backend, case)
    single = jpa.paged_attention(case.q, case.cache, case.meta, **opts, **run_kw(backend))
    return single, case.reference(**opts)


def _check_sharded(out, single, ref, what=""):
    assert out.shape == single.shape and out.dtype == single.dtype
    dtype = out.dtype
    assert_close(out, ref, dtype, what=f"{what} vs oracle")
    assert_close(
        out,
        np.asarray(single.astype(jnp.float32), np.float64),
        dtype,
        what=f"{what} vs single device",
    )
    empty = np.all(ref == 0, axis=(1, 2))  # padding rows and inactive sequences: exact zeros
    assert np.all(np.asarray(out.astype(jnp.float32))[empty] == 0)


# ----------------------------------------------------------------------------- layout helpers


@pytest.mark.parametrize(
    "heads,kv_heads,n,want",
    [
        (32, 8, 2, dict(replicas=1, cache_kv_heads=8, local_heads=16, local_kv_heads=4)),
        (16, 8, 8, dict(replicas=1, cache_kv_heads=8, local_heads=2, local_kv_heads=1)),
        (8, 2, 8, dict(replicas=4, cache_kv_heads=8, local_heads=1, local_kv_heads=1)),
        (16, 4, 8, dict(replicas=2, cache_kv_heads=8, local_heads=2, local_kv_heads=1)),
        (8, 1, 2, dict(replicas=2, cache_kv_heads=2, local_heads=4, local_kv_heads=1)),
    ],
)
def test_kv_head_layout(heads, kv_heads, n, want):
    layout = sh.kv_head_layout(heads, kv_heads, n)
    assert {k: getattr(layout, k) for k in want} == want
    group = heads // kv_heads
    for d in range(n):
        # Every query head h of device d reads KV head h // group, which the device holds.
        needed = {h // group for h in range(d * layout.local_heads, (d + 1) * layout.local_heads)}
        assert needed == set(layout.device_kv_heads(d))


@pytest.mark.parametrize("dtype", [jnp.float32, FP8])
def test_replicated_cache_means_the_same(rng, dtype):
    # Unsharded: a cache with each KV head repeated r times gives the original's attention.
    case = build_case(rng, MIXED, num_heads=8, num_kv_heads=2, kv_dtype=dtype, pad_rows=2)
    rep = sh.replicate_kv_heads(case.cache, 8)
    assert rep.k.shape[1] == 8 and rep.is_float8 == (dtype == FP8)
    for j in range(8):
        np.testing.assert_array_equal(
            np.asarray(rep.k[:, j].astype(jnp.float32)),
            np.asarray(case.cache.k[:, j // 4].astype(jnp.float32)),
        )
    if dtype == FP8:
        np.testing.assert_array_equal(rep.k_scale, np.repeat(case.cache.k_scale, 4))
    out = jpa.paged_attention(case.q, rep, case.meta, backend="xla")
    assert_close(out, case.reference(), jnp.float32, what="replicated cache")
    back = sh.unreplicate_kv_heads(rep, 2)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(case.cache)):
        np.testing.assert_array_equal(
            np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        )
    # Enough KV heads: nothing to replicate.
    assert sh.replicate_kv_heads(case.cache, 2) is case.cache
    assert sh.replicate_kv_heads(jnp.zeros((3, 2, 64)), 4).shape == (3, 4, 64)


@pytest.mark.parametrize("heads,kv_heads,n", [(8, 4, 2), (8, 2, 8), (8, 1, 8)])
def test_each_device_holds_the_kv_head_it_needs(rng, heads, kv_heads, n):
    mesh = mesh_of(n)
    case = build_case(rng, [(1, 20), (4, 33)], num_heads=heads, num_kv_heads=kv_heads)
    cache = sh.shard_cache(case.cache, mesh, AXIS, heads)
    layout = sh.kv_head_layout(heads, kv_heads, n)
    assert cache.k.sharding.spec == P(None, AXIS)
    pages = np.asarray(case.cache.k)
    for shard in cache.k.addressable_shards:
        d = list(mesh.devices.flat).index(shard.device)
        want = pages[:, list(layout.device_kv_heads(d))]
        np.testing.assert_array_equal(np.asarray(shard.data), want)  # NaN == NaN here


def test_attention_specs(rng):
    mesh = mesh_of(8)
    specs = sh.attention_specs(mesh, AXIS, num_heads=16, num_kv_heads=2, float8=True)
    assert specs.q == P(None, AXIS) and specs.kv == P(None, AXIS) and specs.meta == P()
    assert specs.cache.k == P(None, AXIS) and specs.cache.k_scale == P(AXIS)
    assert specs.heads == P(AXIS) and specs.layout.replicas == 4
    named = specs.shardings(mesh)
    assert named.cache.v == NamedSharding(mesh, P(None, AXIS))
    assert sh.attention_specs(mesh, AXIS, 16, 8).cache.k_scale is None


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    "heads,kv_heads,n",
    [
        (8, 4, 2),  # Hkv >= devices: 2 KV heads each
        (16, 8, 8),  # Hkv == devices, GQA 2
        (8, 2, 8),  # Hkv < devices: each KV head on 4 devices
        (4, 1, 2),  # MQA on 2 devices: the one KV head on both
    ],
)
def test_paged_attention_sharded(backend, rng, heads, kv_heads, n):
    mesh = mesh_of(n)
    case = build_case(
        rng, MIXED, num_heads=heads, num_kv_heads=kv_heads, pad_rows=3, dtype=suite_dtype(backend)
    )
    single, ref = _single_and_oracle(case, backend)
    attend = jax.jit(sh.shard_paged_attention(mesh, AXIS, **run_kw(backend)))
    out = attend(case.q, sh.shard_cache(case.cache, mesh, AXIS, heads), case.meta)
    assert out.sharding.spec == P(None, AXIS)
    _check_sharded(out, single, ref, what=f"{heads}/{kv_heads} heads on {n}")


OPTIONS = {
    "softcap_window": dict(softcap=20.0, sliding_window=9),
    "alibi_sinks": dict(
        alibi_slopes=np.geomspace(0.5, 0.004, 8).astype(np.float32),
        sinks=np.linspace(-2, 3, 8).astype(np.float32),
    ),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_paged_attention_sharded_options(backend, rng, option):
    # Per-head vectors are split with the heads: device d gets slopes/sinks of its heads.
    mesh = mesh_of(8)
    opts = {
        k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in OPTIONS[option].items()
    }
    static = {k: v for k, v in opts.items() if k in ("softcap", "sliding_window")}
    vectors = {k: v for k, v in opts.items() if k not in static}
    case = build_case(
        rng, MIXED, num_heads=8, num_kv_heads=2, pad_rows=1, dtype=suite_dtype(backend)
    )
    single, ref = _single_and_oracle(case, backend, **opts)
    attend = jax.jit(sh.shard_paged_attention(mesh, AXIS, **static, **run_kw(backend)))
    out = attend(case.q, sh.shard_cache(case.cache, mesh, AXIS, 8), case.meta, **vectors)
    _check_sharded(out, single, ref, what=option)


def test_paged_decode_sharded(backend, rng):
    mesh = mesh_of(8)
    case = build_case(
        rng,
        [(1, 1), (1, 16), (1, 17), (1, 0), (1, 70)],
        num_heads=8,
        num_kv_heads=2,
        dtype=suite_dtype(backend),
    )
    _require(backend, case)
    meta = case.meta
    single = jpa.paged_decode(
        case.q, case.cache, meta.block_tables, meta.context_lens, **run_kw(backend)
    )
    decode = jax.jit(sh.shard_paged_decode(mesh, AXIS, **run_kw(backend)))
    out = decode(
        case.q, sh.shard_cache(case.cache, mesh, AXIS, 8), meta.block_tables, meta.context_lens
    )
    _check_sharded(out, single, case.reference(), what="decode")


@pytest.mark.parametrize("dtype,kv_dtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, FP8)])
def test_paged_attention_sharded_dtypes(backend, rng, dtype, kv_dtype):
    # float8: the per-KV-head scales are replicated and sharded with the pages.
    mesh = mesh_of(8)
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
    single, ref = _single_and_oracle(case, backend)
    cache = sh.shard_cache(case.cache, mesh, AXIS, 8)
    assert cache.k.dtype == jnp.dtype(kv_dtype)
    out = jax.jit(sh.shard_paged_attention(mesh, AXIS, **run_kw(backend)))(case.q, cache, case.meta)
    _check_sharded(out, single, ref, what=f"{jnp.dtype(kv_dtype).name}")


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("heads,kv_heads,n", [(8, 4, 2), (8, 2, 8)])
def test_layer_sharded_writes_then_attends(backend, rng, heads, kv_heads, n):
    mesh = mesh_of(n)
    seqs = [(1, 30), (12, 12), (5, 21), (0, 0), (1, 17)]
    case = build_case(
        rng,
        seqs,
        num_heads=heads,
        num_kv_heads=kv_heads,
        write_new_only=True,
        pad_rows=2,
        dtype=suite_dtype(backend),
    )
    _require(backend, case)
    layer = jpa.PagedAttention(
        num_heads=heads, head_dim=64, num_kv_heads=kv_heads, softcap=25.0, backend=backend
    )
    interpret = run_kw(backend)["interpret"]
    k, v = jnp.asarray(case.new_k), jnp.asarray(case.new_v)
    single_out, single_cache = jax.jit(layer, static_argnames="interpret")(
        case.q, k, v, case.cache, case.meta, interpret=interpret
    )

    step = jax.jit(sh.shard_layer(mesh, AXIS, layer), donate_argnums=3, static_argnames="interpret")
    cache = sh.shard_cache(case.cache, mesh, AXIS, heads)
    out, cache = step(case.q, k, v, cache, case.meta, interpret=interpret)
    assert cache.k.sharding.spec == P(None, AXIS)
    _check_sharded(out, single_out, case.reference(softcap=25.0), what="layer")
    # Written slots are exact, untouched slots still NaN, and every replica of a KV head
    # received the same tokens.
    r = sh.kv_head_layout(heads, kv_heads, n).replicas
    for j in range(r):
        for got, want in ((cache.k, single_cache.k), (cache.v, single_cache.v)):
            # as float32: NumPy's NaN-equal comparison does not see NaN in bfloat16 arrays
            np.testing.assert_array_equal(
                np.asarray(got[:, j::r], np.float32), np.asarray(want, np.float32)
            )

    # A second decode step on the returned (sharded, donated) cache.
    case2 = build_case(
        np.random.default_rng(1),
        [(1, 5)],
        num_heads=heads,
        num_kv_heads=kv_heads,
        write_new_only=True,
        dtype=suite_dtype(backend),
    )
    out2, _ = step(
        case2.q,
        jnp.asarray(case2.new_k),
        jnp.asarray(case2.new_v),
        sh.shard_cache(case2.cache, mesh, AXIS, heads),
        case2.meta,
        interpret=interpret,
    )
    assert_close(out2, case2.reference(softcap=25.0), case2.q.dtype, what="second step")


def test_layer_sharded_alibi(backend, rng):
    mesh = mesh_of(8)
    slopes = tuple(float(s) for s in np.geomspace(0.5, 0.004, 8))
    layer = jpa.PagedAttention(
        num_heads=8,
        head_dim=64,
        num_kv_heads=2,
        alibi_slopes=slopes,
        sliding_window=13,
        backend=backend,
    )
    case = build_case(
        rng, MIXED, num_heads=8, num_kv_heads=2, write_new_only=True, dtype=suite_dtype(backend)
    )
    _require(backend, case)
    interpret = run_kw(backend)["interpret"]
    k, v = jnp.asarray(case.new_k), jnp.asarray(case.new_v)
    sinks = jnp.linspace(-1.0, 2.0, 8)
    single_out, _ = layer(case.q, k, v, case.cache, case.meta, sinks=sinks, interpret=interpret)
    out, cache = jax.jit(sh.shard_layer(mesh, AXIS, layer), static_argnames="interpret")(
        case.q,
        sh.replicate_kv_heads(k, 8),
        sh.replicate_kv_heads(v, 8),  # pre-replicated
        sh.shard_cache(case.cache, mesh, AXIS, 8),
        case.meta,
        sinks=sinks,
        interpret=interpret,
    )
    ref = case.reference(alibi_slopes=np.array(slopes), sliding_window=13, sinks=np.asarray(sinks))
    _check_sharded(out, single_out, ref, what="alibi layer")


def test_local_layer_inside_own_shard_map(rng):
    # A user's own shard_map (default check_vma=True): the per-device layer on local shards.
    mesh = mesh_of(2)
    layer = jpa.PagedAttention(num_heads=8, head_dim=64, num_kv_heads=4, backend="xla")
    local = sh.local_layer(layer, 2)
    assert (local.num_heads, local.num_kv_heads) == (4, 2)
    case = build_case(rng, MIXED, num_heads=8, num_kv_heads=4, write_new_only=True)
    specs = sh.attention_specs(mesh, AXIS, 8, 4)
    f = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(specs.q, specs.kv, specs.kv, specs.cache, specs.meta),
            out_specs=(specs.q, specs.cache),
        )
    )
    out, _ = f(case.q, jnp.asarray(case.new_k), jnp.asarray(case.new_v), case.cache, case.meta)
    assert_close(out, case.reference(), jnp.float32, what="local layer")


# ----------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_moe_expert_parallel(backend, rng, n, dtype):
    if dtype != jnp.float32:  # float32 MoE runs the Triton kernels on every backend
        _skip_interpreted_mosaic(backend)
    mesh = mesh_of(n, "ep")
    # ids outside [0, E) (another group's experts) must still contribute zero globally.
    x, wgu, wd, weights, ids, want = _moe_inputs(rng, 13, 8, 2, 64, 128, dtype)
    single = jpa.fused_moe(x, wgu, wd, weights, ids, **run_kw(backend))
    experts = NamedSharding(mesh, P("ep"))
    wgu_s, wd_s = jax.device_put(wgu, experts), jax.device_put(wd, experts)
    assert {s.data.shape[0] for s in wgu_s.addressable_shards} == {8 // n}
    moe = jax.jit(sh.shard_fused_moe(mesh, "ep", **run_kw(backend)))
    y = moe(x, wgu_s, wd_s, weights, ids)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, want, dtype, what=f"EP{n} vs oracle")
    assert_close(
        y, np.asarray(single.astype(jnp.float32), np.float64), dtype, what=f"EP{n} vs single device"
    )


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_moe_expert_parallel_activation(backend, rng, activation):
    mesh = mesh_of(4, "ep")
    x, wgu, wd, weights, ids, _ = _moe_inputs(rng, 9, 16, 3, 64, 64, jnp.float32)
    single = jpa.fused_moe(x, wgu, wd, weights, ids, activation=activation, **run_kw(backend))
    y = jax.jit(sh.shard_fused_moe(mesh, "ep", activation=activation, **run_kw(backend)))(
        x, wgu, wd, weights, ids
    )
    assert_close(y, np.asarray(single, np.float64), jnp.float32, what=activation)


def test_fused_moe_expert_parallel_gpt_oss_experts(backend, rng):
    """swigluoai with both biases, split over 4 devices: each device adds only its experts'
    biases (tokens routed elsewhere carry ids outside its range), so the psum is the oracle."""
    mesh = mesh_of(4, "ep")
    x, wgu, wd, weights, ids, _ = _moe_inputs(rng, 11, 8, 2, 64, 64, jnp.float32)
    bgu = jnp.asarray(rng.standard_normal((8, 128)) * 3, jnp.float32)  # beyond the clamp of 7
    bd = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    kw = dict(activation="swigluoai", swiglu_alpha=1.702, swiglu_limit=7.0)
    want = oracle.fused_moe(
        *(np.asarray(a, np.float64) for a in (x, wgu, wd, weights)),
        np.asarray(ids),
        b_gate_up=np.asarray(bgu, np.float64),
        b_down=np.asarray(bd, np.float64),
        **kw,
    )
    experts = NamedSharding(mesh, P("ep"))
    args = [jax.device_put(a, experts) for a in (wgu, wd)]
    biases = [jax.device_put(b, experts) for b in (bgu, bd)]
    moe = jax.jit(sh.shard_fused_moe(mesh, "ep", **kw, **run_kw(backend)))
    y = moe(x, *args, weights, ids, *biases)
    assert_close(y, want, jnp.float32, what="EP4 gpt-oss experts vs oracle")
    with pytest.raises(ValueError, match="b_down"):
        moe(x, wgu, wd, weights, ids, bgu, bd[:4])


def test_local_expert_ids():
    mesh = mesh_of(4, "ep")
    ids = jnp.array([[0, 5], [7, 2], [-1, 8]], jnp.int32)
    f = jax.shard_map(
        lambda i: sh.local_expert_ids(i, "ep", 2)[None], mesh=mesh, in_specs=P(), out_specs=P("ep")
    )
    local = np.asarray(f(ids))  # [4 devices, 3, 2]
    np.testing.assert_array_equal(local, np.asarray(ids)[None] - 2 * np.arange(4)[:, None, None])
    owned = (local >= 0) & (local < 2)
    # Each valid id is owned by exactly one device; -1 and 8 by none.
    np.testing.assert_array_equal(owned.sum(0), [[1, 1], [1, 1], [0, 0]])


# ----------------------------------------------------------------------------- validation


def _attend_call(heads, kv_heads, n, cache_heads=None):
    def call():
        cache = jpa.KVCache.init(4, 16, cache_heads or kv_heads, 64, jnp.float32)
        meta = jpa.AttentionMetadata.decode(
            jnp.zeros((2, 2), jnp.int32), jnp.array([3, 5], jnp.int32)
        )
        return sh.shard_paged_attention(mesh_of(n), AXIS, backend="xla")(
            jnp.zeros((2, heads, 64)), cache, meta
        )

    return call


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sh.kv_head_layout(6, 2, 4), "num_heads"),
        (lambda: sh.kv_head_layout(12, 3, 2), "num_kv_heads"),
        (lambda: sh.kv_head_layout(8, 3, 2), "num_heads .8. must be a multiple of num_kv_heads"),
        (lambda: sh.kv_head_layout(8, 2, 0), "axis_size"),
        (lambda: sh.attention_specs(mesh_of(8), "model", 8, 2), "axis"),
        (lambda: sh.attention_specs("mesh", AXIS, 8, 2), "mesh"),
        (_attend_call(6, 2, 8, cache_heads=8), "q has 6 heads"),
        (_attend_call(8, 2, 8), r"cache has 2 KV heads.*replicate_kv_heads"),
        (lambda: sh.replicate_kv_heads(jnp.zeros((3, 3, 8)), 2), "num_kv_heads"),
        (lambda: sh.unreplicate_kv_heads(jnp.zeros((3, 8, 8)), 3), "num_kv_heads"),
        (
            lambda: sh.local_layer(jpa.PagedAttention(8, 64, 2, alibi_slopes=(0.1,) * 8), 2),
            "alibi_slopes",
        ),
        (lambda: sh.local_layer("layer", 2), "layer"),
        (
            lambda: sh.shard_fused_moe(mesh_of(4, "ep"), "ep")(
                jnp.zeros((2, 8)),
                jnp.zeros((6, 8, 16)),
                jnp.zeros((6, 8, 8)),
                jnp.zeros((2, 1)),
                jnp.zeros((2, 1), jnp.int32),
            ),
            "w_gate_up has 6 experts",
        ),
        (lambda: sh.shard_fused_moe(mesh_of(2, "ep"), "ep", activation="relu"), "activation"),
    ],
)
def test_invalid_arguments_name_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_layer_rejects_unreplicated_cache(rng):
    mesh = mesh_of(8)
    layer = jpa.PagedAttention(num_heads=8, head_dim=64, num_kv_heads=2, backend="xla")
    case = build_case(rng, [(1, 3)], num_heads=8, num_kv_heads=2, write_new_only=True)
    with pytest.raises(ValueError, match=r"cache has 2 KV heads.*shard_cache"):
        sh.shard_layer(mesh, AXIS, layer)(
            case.q, jnp.asarray(case.new_k), jnp.asarray(case.new_v), case.cache, case.meta
        )
    with pytest.raises(ValueError, match="q must have shape"):
        sh.shard_layer(mesh, AXIS, layer)(
            case.q[:, :4],
            jnp.asarray(case.new_k),
            jnp.asarray(case.new_v),
            sh.replicate_kv_heads(case.cache, 8),
            case.meta,
        )


def test_local_layer_keeps_options():
    # local_layer returns a real, hashable PagedAttention (a static argument of jit).
    local = sh.local_layer(jpa.PagedAttention(32, 128, 8, sliding_window=4096), 16)
    assert hash(local) == hash(dataclasses.replace(local))
    assert local.sliding_window == 4096 and local.num_kv_heads == 1


def test_layer_rejects_bad_new_tokens_and_metadata(rng):
    mesh = mesh_of(8)
    layer = jpa.PagedAttention(num_heads=8, head_dim=64, num_kv_heads=2, backend="xla")
    case = build_case(rng, [(1, 3)], num_heads=8, num_kv_heads=2, write_new_only=True)
    step = sh.shard_layer(mesh, AXIS, layer)
    cache = sh.replicate_kv_heads(case.cache, 8)
    k = jnp.asarray(case.new_k)
    with pytest.raises(ValueError, match="k must have shape"):
        step(case.q, k[:, :1], k[:, :1], cache, case.meta)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        step(case.q, k, sh.replicate_kv_heads(k, 8), cache, case.meta)
    with pytest.raises(ValueError, match="meta.slot_mapping"):
        step(case.q, k, k, cache, dataclasses.replace(case.meta, slot_mapping=None))


@pytest.mark.parametrize("devices", ["1", "2"])
def test_sharded_decode_recipe_runs(devices):
    # The README's recipe end to end (its own process: it sets its CPU device count before jax).
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.sharded_decode",
            "--devices",
            devices,
            "--steps",
            "2",
            "--backend",
            "xla",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "agree with the single device" in done.stdout
