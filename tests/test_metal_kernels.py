"""The Metal kernels on the CPU emulator against a float64 numpy oracle.

Caches are NaN outside the written context (unused slots and whole unused pages) and block
tables are permuted, so any read outside a sequence's keys turns the output NaN. Every call
goes through the public entry points of ``metal_plugin`` with ``interpret=True`` (under
``jax.jit``), exactly as the API layer calls them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("metal_plugin")
import metal_plugin  # noqa: E402
from jax_paged_attn import (
    KVCache,  # noqa: E402
    testing,  # noqa: E402
)
from jax_paged_attn.testing import FULL_F32, assert_close, oracle  # noqa: E402
from metal_plugin import specs  # noqa: E402

FP8 = jnp.float8_e4m3fn


def build_case(
    rng,
    seqs,
    *,
    heads,
    kv_heads,
    head_dim,
    block_size,
    q_dtype="float32",
    kv_dtype="float32",
    pad_rows=1,
    extra_blocks=2,
):
    """seqs: [(q_len, kv_len)]. The kit's case (permuted pages, NaN in every unused page, slot
    and padding row, junk table entries past each sequence) as the NumPy arrays the kernels
    take."""
    case = testing.build_case(
        rng,
        seqs,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=q_dtype,
        kv_dtype=kv_dtype,
        pad_rows=pad_rows,
        spare_blocks=extra_blocks,
        junk_tables=True,
    )

    def host(x):
        return None if x is None else np.asarray(x)

    return dict(
        q=host(case.q),
        kp=host(case.cache.k),
        vp=host(case.cache.v),
        bt=host(case.meta.block_tables),
        ctx=case.context_lens,
        cu=case.cu_seqlens_q,
        k_scale=host(case.cache.k_scale),
        v_scale=host(case.cache.v_scale),
    )


def features(rng, heads, kind):
    if kind == "plain":
        return {}
    if kind == "softcap_alibi":
        return dict(softcap=3.0, alibi=(-rng.random(heads) * 0.3).astype(np.float32))
    if kind == "window_sinks":
        return dict(window=7, sinks=rng.standard_normal(heads).astype(np.float32))
    if kind == "all":
        return dict(
            softcap=5.0,
            window=13,
            alibi=(-rng.random(heads) * 0.2).astype(np.float32),
            sinks=rng.standard_normal(heads).astype(np.float32),
        )
    raise ValueError(kind)


def run_attention(c, feat, *, decode=False, partition_size=None):
    d = c["q"].shape[-1]
    kw = dict(
        scale=d**-0.5,
        softcap=feat.get("softcap"),
        sliding_window=feat.get("window"),
        alibi_slopes=None if feat.get("alibi") is None else jnp.asarray(feat["alibi"]),
        sinks=None if feat.get("sinks") is None else jnp.asarray(feat["sinks"]),
        k_scale=None if c["k_scale"] is None else jnp.asarray(c["k_scale"]),
        v_scale=None if c["v_scale"] is None else jnp.asarray(c["v_scale"]),
        interpret=True,
    )
    if decode:
        if partition_size:
            kw["partition_size"] = partition_size
        fn = jax.jit(lambda q, k, v, bt, cl: metal_plugin.paged_decode(q, k, v, bt, cl, **kw))
        return np.asarray(fn(c["q"], c["kp"], c["vp"], c["bt"], c["ctx"]))
    fn = jax.jit(
        lambda q, k, v, bt, cl, cu: metal_plugin.paged_attention(q, k, v, bt, cl, cu, **kw)
    )
    return np.asarray(fn(c["q"], c["kp"], c["vp"], c["bt"], c["ctx"], c["cu"]))


def oracle_for(c, feat, cu=None):
    """The kit's float64 oracle on the pages and tables of case ``c``."""
    return oracle.paged_attention(
        c["q"],
        c["kp"],
        c["vp"],
        c["bt"],
        c["ctx"],
        c["cu"] if cu is None else cu,
        k_scale=c["k_scale"],
        v_scale=c["v_scale"],
        scale=c["q"].shape[-1] ** -0.5 if feat.get("scale") is None else feat["scale"],
        softcap=feat.get("softcap"),
        sliding_window=feat.get("window"),
        alibi_slopes=feat.get("alibi"),
        sinks=feat.get("sinks"),
    )


def check_close(out, ref, dtype):
    """The kit's comparison; the emulator computes float32 exactly (FULL_F32 bounds)."""
    assert_close(out, ref, dtype, **(FULL_F32 if dtype == "float32" else {}))


# ----------------------------------------------------------------------------- attention
# (q_len, kv_len): decode, prefill, chunk of a longer context, inactive, n > L, BS +- 1.
MIXED = [(1, 1), (5, 5), (4, 37), (0, 0), (1, 17), (3, 15), (2, 1)]


@pytest.mark.parametrize("feat", ["plain", "softcap_alibi", "window_sinks", "all"])
def test_mixed_batch_features_f32(feat):
    rng = np.random.default_rng(1)
    c = build_case(rng, MIXED, heads=6, kv_heads=2, head_dim=64, block_size=16)  # GQA 3
    f = features(rng, 6, feat)
    out = run_attention(c, f)
    ref = oracle_for(c, f)
    check_close(out, ref, "float32")
    # Padding rows and rows with p < 0 (the (2, 1) sequence's first row) are exact zeros.
    assert np.all(out[int(c["cu"][-1]) :] == 0)
    assert np.all(out[int(c["cu"][-2])] == 0)


@pytest.mark.parametrize(
    "q_dtype,kv_dtype,head_dim,block_size,heads,kv_heads",
    [
        ("bfloat16", "bfloat16", 128, 8, 8, 1),
        ("float16", "float16", 80, 32, 4, 4),
        ("bfloat16", "float8_e4m3fn", 64, 16, 8, 2),
        ("float32", "float8_e4m3fn", 256, 8, 2, 1),
    ],
)
def test_prefill_dtypes(q_dtype, kv_dtype, head_dim, block_size, heads, kv_heads):
    rng = np.random.default_rng(2)
    c = build_case(
        rng,
        [(6, 9), (1, 33), (3, 3)],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        q_dtype=q_dtype,
        kv_dtype=kv_dtype,
    )
    f = features(rng, heads, "all")
    out = run_attention(c, f)
    assert out.dtype == jnp.dtype(q_dtype)
    check_close(out, oracle_for(c, f), q_dtype)


@pytest.mark.parametrize("feat", ["plain", "all"])
@pytest.mark.parametrize("partition_size", [None, 32])
def test_decode_partitioned(feat, partition_size):
    """partition_size=32 splits these contexts over up to 4 partitions + the reduce."""
    rng = np.random.default_rng(3)
    seqs = [(1, L) for L in (1, 33, 0, 100, 64, 17)]
    c = build_case(rng, seqs, heads=4, kv_heads=2, head_dim=64, block_size=16, pad_rows=0)
    f = features(rng, 4, feat)
    out = run_attention(c, f, decode=True, partition_size=partition_size)
    ref = oracle_for(c, f)
    check_close(out, ref, "float32")
    assert np.all(out[2] == 0)  # inactive sequence


def test_decode_fp8_partitioned_bf16():
    rng = np.random.default_rng(4)
    seqs = [(1, L) for L in (70, 5, 128)]
    c = build_case(
        rng,
        seqs,
        heads=8,
        kv_heads=2,
        head_dim=128,
        block_size=32,
        q_dtype="bfloat16",
        kv_dtype="float8_e4m3fn",
        pad_rows=0,
    )
    f = features(rng, 8, "window_sinks") | {"window": 50}
    out = run_attention(c, f, decode=True, partition_size=64)
    check_close(out, oracle_for(c, f), "bfloat16")


def test_specialisation_names_are_unique_per_header():
    seen = {}
    for decode in (False, True):
        for parts in (1, 3):
            for mb in (4, 9):
                s = specs.attention(
                    q_dtype="bfloat16",
                    kv_dtype="float8_e4m3fn",
                    head_dim=128,
                    block_size=16,
                    num_rows=3,
                    num_heads=8,
                    num_parts=parts,
                    partition=64 * mb,
                    decode=decode,
                )
                assert seen.setdefault(s.name, s.header) == s.header, s.name
    assert "paged_decode_bf16_kvf8e4m3_d128_b16" in seen


def test_check_supported_names_what_is_supported():
    with pytest.raises(NotImplementedError, match=r"head_dim=72.*backend='xla'"):
        metal_plugin.check_supported(
            head_dim=72, block_size=16, q_dtype=jnp.float32, kv_dtype=jnp.float32
        )
    with pytest.raises(NotImplementedError, match=r"block_size=12.*\(8, 16, 32"):
        metal_plugin.check_supported(
            head_dim=64, block_size=12, q_dtype=jnp.float32, kv_dtype=jnp.float32
        )
    with pytest.raises(NotImplementedError, match="q_dtype='float64'"):
        metal_plugin.check_supported(
            head_dim=64, block_size=16, q_dtype=np.float64, kv_dtype=jnp.float32
        )
    with pytest.raises(NotImplementedError, match=r"num_tokens \* top_k <= 256"):
        metal_plugin.check_supported(
            num_tokens=4096, top_k=2, num_experts=8, hidden=64, inter=32, dtype=jnp.bfloat16
        )
    metal_plugin.check_supported(head_dim=256, block_size=256, q_dtype=jnp.bfloat16, kv_dtype=FP8)


# ----------------------------------------------------------------------------- KV write
@pytest.mark.parametrize(
    "src,dst",
    [
        ("float32", "float32"),
        ("float32", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("bfloat16", "float8_e4m3fn"),
        ("float32", "float8_e4m3fn"),
    ],
)
def test_write_kv_exact_and_untouched(src, dst):
    rng = np.random.default_rng(5)
    nb, hkv, bs, d, t = 5, 2, 8, 64, 9
    k_pages = np.full((nb, hkv, bs, d), np.nan, np.float32).astype(jnp.dtype(dst))
    v_pages = k_pages.copy()
    k = (rng.standard_normal((t, hkv, d)) * 4).astype(jnp.dtype(src))
    v = (rng.standard_normal((t, hkv, d)) * 4).astype(jnp.dtype(src))
    k[0, 0, :4] = [1000, -1000, 1e-4, 0]  # saturation and the subnormal range of e4m3
    slots = rng.permutation(nb * bs)[:t].astype(np.int32)
    slots[[2, 5]] = -1
    scale = None
    if dst == "float8_e4m3fn":
        scale = (0.5 + rng.random(hkv)).astype(np.float32)
    fn = jax.jit(
        lambda *a: metal_plugin.write_kv(
            *a,
            k_scale=None if scale is None else jnp.asarray(scale),
            v_scale=None if scale is None else jnp.asarray(scale),
            interpret=True,
        )
    )
    nk, nv = map(np.asarray, fn(k_pages, v_pages, k, v, slots))

    cache = KVCache(k_pages, v_pages, scale, scale)
    exp_k, exp_v = oracle.write_kv(cache, k, v, slots)
    # Bitwise: written slots exact, every other byte (NaN) unchanged.
    assert nk.view(np.uint8).tobytes() == exp_k.view(np.uint8).tobytes()
    assert nv.view(np.uint8).tobytes() == exp_v.view(np.uint8).tobytes()


def test_e4m3_encoding_matches_ml_dtypes_on_every_grid_point():
    """All finite e4m3 values, midpoints between them (ties to even) and NaN."""
    vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = np.sort(vals[np.isfinite(vals)])
    mids = (finite[1:] + finite[:-1]) / 2
    x = np.concatenate(
        [
            finite,
            mids,
            np.nextafter(mids, np.inf, dtype=np.float32),
            np.nextafter(mids, -np.inf, dtype=np.float32),
            [np.nan],
        ]
    )
    x = x.astype(np.float32)
    x = np.resize(x, (-(-x.size // 32) * 32,)).reshape(-1, 1, 32)
    pages = np.zeros((x.shape[0], 1, 1, 32), ml_dtypes.float8_e4m3fn)
    spec_in = jnp.asarray(x)
    nk, _ = metal_plugin.write_kv(
        jnp.asarray(pages),
        jnp.asarray(pages),
        spec_in,
        spec_in,
        jnp.arange(x.shape[0], dtype=jnp.int32),
        k_scale=jnp.ones(1),
        v_scale=jnp.ones(1),
        interpret=True,
    )
    got = np.asarray(nk).reshape(-1).view(np.uint8)
    want = x.reshape(-1).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    nan = np.isnan(x.reshape(-1))
    assert np.array_equal(got[~nan], want[~nan])
    assert np.all((got[nan] & 0x7F) == 0x7F)


# ----------------------------------------------------------------------------- MoE
@pytest.mark.parametrize(
    "activation,dtype", [("silu", "float32"), ("gelu", "float32"), ("gelu_tanh", "bfloat16")]
)
def test_fused_moe_gemv(activation, dtype):
    rng = np.random.default_rng(6)
    t, hd, inter, e, k = 5, 96, 40, 4, 2
    dt = jnp.dtype(dtype)
    x = rng.standard_normal((t, hd)).astype(dt)
    wgu = (rng.standard_normal((e, hd, 2 * inter)) / math.sqrt(hd)).astype(dt)
    wd = (rng.standard_normal((e, inter, hd)) / math.sqrt(inter)).astype(dt)
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    ids[1, 0], ids[3, 1] = e, -1  # experts owned by another device contribute zero
    w = rng.random((t, k)).astype(np.float32)
    fn = jax.jit(lambda *a: metal_plugin.fused_moe(*a, activation=activation, interpret=True))
    y = np.asarray(fn(x, wgu, wd, w, ids))
    assert y.dtype == dt
    ref = oracle.fused_moe(x, wgu, wd, w, ids, activation)
    check_close(y, ref, dtype)


# ----------------------------------------------------------------------------- the shim
SIMD_SRC = """
const uint lane = thread_index_in_simdgroup;
threadgroup float tg[64];
float x = inp[thread_position_in_grid.x];
tg[thread_index_in_threadgroup] = x;
threadgroup_barrier(mem_flags::mem_threadgroup);
out[thread_position_in_grid.x * 4 + 0] = simd_sum(x);
out[thread_position_in_grid.x * 4 + 1] = simd_max(x);
out[thread_position_in_grid.x * 4 + 2] = simd_shuffle_xor(x, ushort(5));
out[thread_position_in_grid.x * 4 + 3] = tg[63 - thread_index_in_threadgroup];
"""


def test_emulator_collectives_and_threadgroup_memory():
    from metal_plugin import emulator

    spec = specs.KernelSpec(
        "simd_probe",
        SIMD_SRC,
        "",
        ("inp",),
        ("out",),
        (128, 1, 1),
        (64, 1, 1),
        ((128, 4),),
        ("float32",),
    )
    x = np.random.default_rng(7).standard_normal(128).astype(np.float32)
    (out,) = emulator.run(spec, x)
    g = x.reshape(4, 32)
    np.testing.assert_allclose(out[:, 0], np.repeat(g.sum(1), 32), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], np.repeat(g.max(1), 32))
    np.testing.assert_array_equal(out[:, 2], x[np.arange(128) ^ 5])
    np.testing.assert_array_equal(out[:, 3], x.reshape(2, 64)[:, ::-1].reshape(-1))


def test_emulator_outputs_start_poisoned():
    """Outputs arrive uninitialised on Metal; the emulator fills them with NaN so a kernel
    that skips an element cannot pass by luck."""
    from metal_plugin import emulator

    spec = specs.KernelSpec(
        "half_writer",
        "if (thread_position_in_grid.x % 2 == 0) out[thread_position_in_grid.x] = 1.0f;",
        "",
        ("inp",),
        ("out",),
        (32, 1, 1),
        (32, 1, 1),
        ((32,),),
        ("float32",),
    )
    (out,) = emulator.run(spec, np.zeros(4, np.float32))
    assert np.all(out[::2] == 1) and np.all(np.isnan(out[1::2]))
