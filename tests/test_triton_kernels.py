"""Direct tests of the Pallas Triton paged-attention and KV-write kernels against float64 NumPy.

Kernel level (plain arrays, no API layer) on the test kit's cases: a *permuted* block table,
every unused slot and page NaN, and random (mostly out-of-range) ids in every block-table entry
past a sequence's blocks, so any read out of range shows up as NaN or an error. On a CPU the kernels run under Pallas's
interpreter; with a GPU present they run compiled
(``python -m pytest tests/test_triton_kernels.py``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_paged_attn import KVCache
from jax_paged_attn.testing import FULL_F32, assert_close, build_case, oracle
from pallas_kernels.kv_write import triton as kvw
from pallas_kernels.paged_attention import triton as pa
from pallas_kernels.paged_attention.tuning import BlockSizes, choose_num_splits

INTERPRET = jax.default_backend() != "gpu"
FP8 = jnp.dtype(jnp.float8_e4m3fn)


def run_case(
    seqs,
    *,
    h=4,
    hkv=2,
    d=64,
    bs=16,
    dtype=jnp.float32,
    kv_dtype=None,
    pad_rows=0,
    softcap=None,
    window=None,
    alibi=False,
    sinks=False,
    decode=False,
    block_sizes=None,
    seed=0,
):
    """seqs: list of (q_len, kv_len). Runs the kernel on the kit's case (permuted blocks, NaN
    in every unused page and slot and in padding rows, junk past each sequence's table
    entries) and compares with the float64 oracle."""
    rng = np.random.default_rng(seed)
    case = build_case(
        rng,
        seqs,
        num_heads=h,
        num_kv_heads=hkv,
        head_dim=d,
        block_size=bs,
        dtype=dtype,
        kv_dtype=kv_dtype,
        pad_rows=pad_rows,
        spare_blocks=2,
        junk_tables=True,
    )
    opts = dict(
        scale=1.0 / math.sqrt(d),
        softcap=softcap,
        sliding_window=window,
        alibi_slopes=rng.uniform(0.05, 0.5, h).astype(np.float32) if alibi else None,
        sinks=rng.uniform(-1.0, 2.0, h).astype(np.float32) if sinks else None,
    )
    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
    kw.update(
        k_scale=case.cache.k_scale,
        v_scale=case.cache.v_scale,
        interpret=INTERPRET,
        block_sizes=block_sizes,
    )
    args = (case.q, case.cache.k, case.cache.v, case.meta.block_tables, case.meta.context_lens)
    if decode:
        assert all(n == 1 for n, _ in seqs) and not pad_rows
        out = pa.paged_decode(*args, **kw)
    else:
        out = pa.paged_attention(*args, case.meta.cu_seqlens_q, **kw)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    f32 = FULL_F32 if jnp.dtype(dtype) == jnp.float32 else {}
    assert_close(out, case.reference(**opts), dtype, what="triton kernel", **f32)
    if pad_rows:  # padding rows hold NaN: they must not leak anywhere and come out as 0
        assert (np.asarray(out[int(case.cu_seqlens_q[-1]) :]) == 0).all()


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------

BS = 16
DECODE_LENS = [0, 1, BS - 1, BS, BS + 1, 3 * BS + 5, 70]


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (6, 2), (12, 4), (32, 4)])
def test_decode_gqa(h, hkv):
    run_case([(1, c) for c in DECODE_LENS], h=h, hkv=hkv, decode=True)


@pytest.mark.parametrize("d", [80, 128])
def test_decode_head_dims(d):
    run_case([(1, c) for c in DECODE_LENS], d=d, decode=True)


@pytest.mark.parametrize("splits", [2, 8])
def test_decode_splits(splits):
    # 8 splits over at most 6 tiles: empty splits must merge to nothing; sinks added once.
    run_case(
        [(1, c) for c in DECODE_LENS],
        h=6,
        hkv=2,
        sinks=True,
        decode=True,
        block_sizes=BlockSizes(block_k=16, num_splits=splits),
    )


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_features(splits):
    run_case(
        [(1, c) for c in DECODE_LENS],
        h=8,
        hkv=2,
        softcap=5.0,
        alibi=True,
        sinks=True,
        window=20,
        decode=True,
        block_sizes=BlockSizes(block_k=16, num_splits=splits),
    )


@pytest.mark.parametrize("window", [1, 17])
def test_decode_window(window):
    run_case(
        [(1, c) for c in DECODE_LENS],
        window=window,
        decode=True,
        block_sizes=BlockSizes(block_k=16),
    )


@pytest.mark.parametrize("bs,block_k", [(8, 64), (256, 32)])
def test_decode_block_sizes(bs, block_k):
    # A tile spanning 8 pages, and 8 tiles inside one page.
    run_case(
        [(1, c) for c in [0, 1, bs - 1, bs + 1, 2 * bs + 3]],
        bs=bs,
        decode=True,
        block_sizes=BlockSizes(block_k=block_k),
    )


@pytest.mark.parametrize(
    "dtype,kv_dtype", [(jnp.bfloat16, None), (jnp.float16, None), (jnp.bfloat16, FP8)]
)
def test_decode_dtypes(dtype, kv_dtype):
    run_case(
        [(1, c) for c in DECODE_LENS],
        h=8,
        hkv=2,
        dtype=dtype,
        kv_dtype=kv_dtype,
        sinks=True,
        decode=True,
    )


# ---------------------------------------------------------------------------------------------
# Chunked prefill and mixed batches
# ---------------------------------------------------------------------------------------------

MIXED = [(1, 1), (5, 5), (16, 40), (0, 9), (3, 2), (1, 33), (0, 0), (17, 17), (2, 15)]


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (6, 2), (12, 4), (16, 2)])
def test_prefill_mixed_gqa(h, hkv):
    # block_m 16: several q tiles per sequence, and a head group that does not divide the tile.
    run_case(MIXED, h=h, hkv=hkv, pad_rows=3, block_sizes=BlockSizes(block_m=16, block_k=16))


@pytest.mark.parametrize("d", [80, 128])
def test_prefill_head_dims(d):
    run_case(MIXED, d=d, pad_rows=2)


def test_prefill_long_chunk_default_blocks():
    # Default tuning (block_m 64 in f32): unmasked tiles below the diagonal, masked above.
    run_case([(70, 100), (33, 33), (1, 50)], h=8, hkv=2, pad_rows=5)


@pytest.mark.parametrize("window", [1, 7, 40])
def test_prefill_window(window):
    run_case(
        MIXED + [(40, 90)],
        h=6,
        hkv=2,
        window=window,
        block_sizes=BlockSizes(block_m=16, block_k=16),
    )


def test_prefill_features():
    run_case(
        MIXED,
        h=8,
        hkv=2,
        softcap=3.0,
        alibi=True,
        sinks=True,
        window=12,
        pad_rows=2,
        block_sizes=BlockSizes(block_m=32, block_k=16),
    )


@pytest.mark.parametrize("bs,block_k", [(8, 32), (32, 16), (256, 32)])
def test_prefill_block_sizes(bs, block_k):
    run_case(
        [(3, bs - 1), (bs + 1, bs + 1), (5, 2 * bs + 3), (1, bs)],
        bs=bs,
        pad_rows=1,
        block_sizes=BlockSizes(block_m=16, block_k=block_k),
    )


@pytest.mark.parametrize(
    "dtype,kv_dtype",
    [(jnp.bfloat16, None), (jnp.float16, None), (jnp.bfloat16, FP8), (jnp.float32, FP8)],
)
def test_prefill_dtypes(dtype, kv_dtype):
    run_case(
        MIXED,
        h=8,
        hkv=2,
        dtype=dtype,
        kv_dtype=kv_dtype,
        sinks=True,
        pad_rows=1,
        block_sizes=BlockSizes(block_m=32, block_k=16),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_random_batches(seed):
    """Random batch compositions, tiles and features (seeded, so failures reproduce)."""
    rng = np.random.default_rng(100 + seed)
    seqs = []
    for _ in range(int(rng.integers(1, 7))):
        ctx = int(rng.integers(0, 90))
        n = int(rng.integers(0, ctx + 1)) if rng.random() < 0.9 else ctx + int(rng.integers(1, 4))
        seqs.append((n, ctx))
    hkv = int(rng.choice([1, 2]))
    h = hkv * int(rng.choice([1, 3, 4, 5]))
    run_case(
        seqs,
        h=h,
        hkv=hkv,
        d=int(rng.choice([64, 96])),
        bs=int(rng.choice([8, 16, 32])),
        pad_rows=int(rng.integers(0, 4)),
        softcap=float(rng.choice([0, 4.0])) or None,
        window=int(rng.choice([0, 1, 9, 33])) or None,
        alibi=bool(rng.integers(2)),
        sinks=bool(rng.integers(2)),
        seed=seed,
        block_sizes=BlockSizes(
            block_m=int(rng.choice([16, 32, 64])), block_k=int(rng.choice([16, 32, 64]))
        ),
    )


@pytest.mark.parametrize("d", [192, 256])
def test_large_head_dims(d):
    run_case([(1, c) for c in [0, 1, 17, 40]], d=d, h=4, hkv=1, sinks=True, decode=True)
    run_case([(5, 5), (3, 40), (0, 3)], d=d, h=4, hkv=1, window=9, pad_rows=1)


@pytest.mark.parametrize("window", [None, 20])
def test_paged_attention_decode_shaped(window):
    # T <= 2 S picks one-token tiles in the general kernel; a 2-token chunk and padding mixed in.
    run_case(
        [(1, c) for c in DECODE_LENS] + [(0, 5), (2, 30)],
        h=6,
        hkv=2,
        pad_rows=1,
        window=window,
        alibi=True,
        sinks=True,
    )


@pytest.mark.parametrize(
    "switches",
    [
        dict(decode_prefetch=True, decode_fold=True),
        dict(prefill_prefetch=True, prefill_fold=False, heads_inner=False),
    ],
)
def test_code_shape_variants(switches):
    # Code shapes that are off by default (BlockSizes fields): page-id prefetch, folded scale,
    # grid order.
    run_case(
        [(1, c) for c in DECODE_LENS],
        h=8,
        hkv=2,
        decode=True,
        block_sizes=BlockSizes(block_k=16, num_splits=2, **switches),
    )
    run_case(
        [(1, c) for c in DECODE_LENS],
        h=8,
        hkv=2,
        window=20,
        sinks=True,
        decode=True,
        block_sizes=BlockSizes(block_k=32, **switches),
    )
    run_case(
        MIXED + [(40, 90)],
        h=8,
        hkv=2,
        pad_rows=2,
        block_sizes=BlockSizes(block_m=16, block_k=16, **switches),
    )
    run_case(
        MIXED,
        h=8,
        hkv=2,
        window=12,
        alibi=True,
        softcap=3.0,
        block_sizes=BlockSizes(block_m=32, block_k=16, **switches),
    )


def test_prefill_all_padding():
    # Every sequence inactive: all rows zero.
    run_case([(0, 0), (0, 5)], pad_rows=7)


def test_check_supported():
    for kw, name in [
        (dict(head_dim=72), "head_dim"),
        (dict(block_size=12), "block_size"),
        (dict(q_dtype=jnp.float64), "q dtype"),
        (dict(kv_dtype=jnp.int8), "kv dtype"),
    ]:
        args = dict(head_dim=64, block_size=16, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16) | kw
        with pytest.raises(NotImplementedError, match=name) as e:
            pa.check_supported(**args)
        assert 'backend="xla"' in str(e.value)
    pa.check_supported(head_dim=192, block_size=256, q_dtype=jnp.float16, kv_dtype=FP8)


def test_num_splits_choice():
    assert choose_num_splits(64, 8, 4096, 64) == 1  # 512 programs: no split
    assert choose_num_splits(8, 8, 32768, 64) == 8  # 64 programs -> 512
    assert choose_num_splits(1, 1, 256, 64) == 1  # short context: never split
    with pytest.raises(ValueError, match="block_k"):
        BlockSizes(block_k=48)


# ---------------------------------------------------------------------------------------------
# KV write
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kv_dtype,d,bs", [(jnp.float32, 64, 16), (jnp.bfloat16, 80, 8), (FP8, 128, 32)]
)
def test_write_kv(kv_dtype, d, bs):
    rng = np.random.default_rng(1)
    nb, hkv, t = 6, 2, 37
    k_pages = jnp.asarray(rng.standard_normal((nb, hkv, bs, d)), jnp.float32).astype(kv_dtype)
    v_pages = jnp.asarray(rng.standard_normal((nb, hkv, bs, d)), jnp.float32).astype(kv_dtype)
    k = jnp.asarray(rng.standard_normal((t, hkv, d)) * 4, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((t, hkv, d)) * 4, jnp.bfloat16)
    slots = rng.choice(nb * bs, t, replace=False).astype(np.int32)
    slots[::5] = -1  # padding tokens: not written
    scale = None
    if jnp.dtype(kv_dtype) == FP8:
        scale = jnp.asarray([0.004, 0.02], jnp.float32)  # 0.004: some values saturate at 448
    want = oracle.write_kv(KVCache(k_pages, v_pages, scale, scale), k, v, slots)
    kp, vp = kvw.write_kv(
        k_pages,
        v_pages,
        k,
        v,
        jnp.asarray(slots),
        k_scale=scale,
        v_scale=scale,
        interpret=INTERPRET,
    )
    assert kp.dtype == k_pages.dtype and kp.shape == k_pages.shape
    for pages, expected in zip((kp, vp), want):
        np.testing.assert_array_equal(
            np.asarray(pages.astype(jnp.float32)), expected.astype(np.float32)
        )


def test_write_kv_donated_in_place():
    nb, hkv, bs, d = 4, 2, 8, 64
    k_pages = jnp.zeros((nb, hkv, bs, d), jnp.bfloat16)
    v_pages = jnp.zeros((nb, hkv, bs, d), jnp.bfloat16)
    k = jnp.ones((3, hkv, d), jnp.bfloat16)
    slots = jnp.asarray([5, -1, 30], jnp.int32)
    f = jax.jit(
        lambda kp, vp, k, v, s: kvw.write_kv(
            kp, vp, k, v, s, k_scale=None, v_scale=None, interpret=INTERPRET
        ),
        donate_argnums=(0, 1),
    )
    kp, vp = f(k_pages, v_pages, k, 2 * k, slots)
    kp, vp = np.asarray(kp.astype(jnp.float32)), np.asarray(vp.astype(jnp.float32))
    assert kp.sum() == 2 * hkv * d and vp.sum() == 4 * hkv * d
    assert (kp[0, :, 5] == 1).all() and (vp[3, :, 6] == 2).all()


# ---------------------------------------------------------------------------------------------
# Lowering to Triton IR for an H100, without a GPU: catches what the interpreter cannot
# (non-power-of-two tiles, unsupported casts or ops). Uses a private hook of Pallas's Triton
# lowering to pretend an H100 is present.
# ---------------------------------------------------------------------------------------------


def _lower_for_h100(fn, *shapes):
    try:
        from jax._src.pallas.triton import gpu_info
        from jax._src.pallas.triton import pallas_call_registration as reg

        h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    except (ImportError, AttributeError) as e:  # private API moved: nothing to check here
        pytest.skip(f"Pallas Triton lowering hooks unavailable: {e}")
    saved = reg.gpu_info_lib.get_gpu_info
    reg.gpu_info_lib.get_gpu_info = lambda: h100
    try:
        jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    finally:
        reg.gpu_info_lib.get_gpu_info = saved


@pytest.mark.skipif(not INTERPRET, reason="the GPU runs the real compiler in the other tests")
@pytest.mark.parametrize(
    "d,bs,dtype,kv_dtype",
    [
        (64, 8, jnp.bfloat16, jnp.bfloat16),
        (80, 16, jnp.float32, jnp.float32),
        (128, 16, jnp.bfloat16, FP8),
        (192, 256, jnp.float16, jnp.float16),
        (256, 32, jnp.bfloat16, jnp.bfloat16),
    ],
)
def test_lowers_to_triton_ir(d, bs, dtype, kv_dtype):
    sds = jax.ShapeDtypeStruct
    s, h, hkv, nb, mb, t = 4, 12, 4, 64, 16, 40
    fp8 = jnp.dtype(kv_dtype) == FP8
    pages = sds((nb, hkv, bs, d), kv_dtype)
    bt, lens, vec = sds((s, mb), jnp.int32), sds((s,), jnp.int32), sds((h,), jnp.float32)
    sc = sds((hkv,), jnp.float32) if fp8 else None
    feats = dict(scale=0.1, softcap=5.0, sliding_window=33)

    def decode(q, k, v, bt, l, a, sk, ks, vs, *, splits):
        return pa.paged_decode(
            q,
            k,
            v,
            bt,
            l,
            alibi_slopes=a,
            sinks=sk,
            k_scale=ks,
            v_scale=vs,
            block_sizes=BlockSizes(block_k=32, num_splits=splits),
            **feats,
        )

    for splits in (1, 4):
        _lower_for_h100(
            functools.partial(decode, splits=splits),
            sds((s, h, d), dtype),
            pages,
            pages,
            bt,
            lens,
            vec,
            vec,
            sc,
            sc,
        )
    _lower_for_h100(
        lambda q, k, v, bt, l, cu, a, sk, ks, vs: pa.paged_attention(
            q, k, v, bt, l, cu, alibi_slopes=a, sinks=sk, k_scale=ks, v_scale=vs, **feats
        ),
        sds((t, h, d), dtype),
        pages,
        pages,
        bt,
        lens,
        sds((s + 1,), jnp.int32),
        vec,
        vec,
        sc,
        sc,
    )
    _lower_for_h100(
        lambda kp, vp, k, v, sl, ks, vs: kvw.write_kv(kp, vp, k, v, sl, k_scale=ks, v_scale=vs),
        pages,
        pages,
        sds((t, hkv, d), dtype),
        sds((t, hkv, d), dtype),
        sds((t,), jnp.int32),
        sc,
        sc,
    )
