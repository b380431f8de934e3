"""Direct tests of the Pallas Triton paged-attention and KV-write kernels against float64 NumPy.

Kernel level (plain arrays, no API layer): caches built from a *permuted* block table, every
unused slot and page NaN, and every block-table entry past a sequence's blocks pointing at an
all-NaN page, so any read out of range shows up as NaN. On a CPU the kernels run under Pallas's
interpreter; with a GPU present they run compiled
(``python -m pytest tests/test_triton_kernels.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_write import triton as kvw
from pallas_kernels.paged_attention import triton as pa
from pallas_kernels.paged_attention.tuning import BlockSizes, choose_num_splits

INTERPRET = jax.default_backend() != "gpu"
FP8 = jnp.dtype(jnp.float8_e4m3fn)
# |out - ref| <= atol + rtol |ref| against float64 on the dtype-rounded inputs.
TOL = {
    jnp.dtype(jnp.float32): (2e-5, 2e-5) if INTERPRET else (1e-4, 1e-4),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (4e-3, 4e-3),
}


def _cdiv(a, b):
    return -(-a // b)


def make_cache(rng, kv_lens, hkv, d, bs, kv_dtype, *, k_scale=None, v_scale=None):
    """Paged K/V holding random values for each sequence's first kv_lens[i] keys, NaN elsewhere.

    Returns (k_pages, v_pages, block_tables, k_seqs, v_seqs) with k_seqs[i] [L_i, Hkv, D] the
    float64 values the cache holds (dequantised for float8).
    """
    nblocks = [_cdiv(n, bs) for n in kv_lens]
    mb = max(nblocks + [1]) + 1
    nb = sum(nblocks) + 2  # + a spare page and the poison page
    poison = nb - 1
    ids = rng.permutation(nb - 1)  # the spare page stays unused (NaN)
    k_pages = np.full((nb, hkv, bs, d), np.nan, np.float32)
    v_pages = np.full((nb, hkv, bs, d), np.nan, np.float32)
    bt = np.full((len(kv_lens), mb), poison, np.int32)
    k_seqs, v_seqs, used = [], [], 0
    for i, n in enumerate(kv_lens):
        bt[i, : nblocks[i]] = ids[used : used + nblocks[i]]
        used += nblocks[i]
        k = rng.standard_normal((n, hkv, d)).astype(np.float32)
        v = rng.standard_normal((n, hkv, d)).astype(np.float32)
        for t in range(n):
            k_pages[bt[i, t // bs], :, t % bs] = k[t]
            v_pages[bt[i, t // bs], :, t % bs] = v[t]
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    if jnp.dtype(kv_dtype) == FP8:  # store x / scale; NaN stays NaN
        k_pages = (k_pages / k_scale[None, :, None, None]).astype(FP8)
        v_pages = (v_pages / v_scale[None, :, None, None]).astype(FP8)
    else:
        k_pages, v_pages = k_pages.astype(kv_dtype), v_pages.astype(kv_dtype)
    kf = np.asarray(k_pages.astype(jnp.float32), np.float64)
    vf = np.asarray(v_pages.astype(jnp.float32), np.float64)
    if jnp.dtype(kv_dtype) == FP8:
        kf = kf * np.asarray(k_scale, np.float64)[None, :, None, None]
        vf = vf * np.asarray(v_scale, np.float64)[None, :, None, None]
    for i, n in enumerate(kv_lens):
        t = np.arange(n)
        k_seqs.append(kf[bt[i, t // bs], :, t % bs])
        v_seqs.append(vf[bt[i, t // bs], :, t % bs])
    return k_pages, v_pages, jnp.asarray(bt), k_seqs, v_seqs


def oracle(
    q, k_seqs, v_seqs, kv_lens, cu, *, scale, softcap=None, window=None, alibi=None, sinks=None
):
    """SPEC §3 in float64, one sequence at a time; rows with no visible key are 0."""
    q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
    t_total, h, _ = q.shape
    out = np.zeros_like(q)
    for i, ctx in enumerate(kv_lens):
        n = cu[i + 1] - cu[i]
        if ctx == 0 or n == 0:
            continue
        k, v = k_seqs[i], v_seqs[i]
        group = h // k.shape[1]
        kh, vh = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [L, H, D]
        pos = ctx - n + np.arange(n)  # [n]
        keys = np.arange(ctx)
        vis = keys[None, :] <= pos[:, None]
        if window is not None:
            vis &= keys[None, :] > pos[:, None] - window
        s = scale * np.einsum("nhd,thd->nht", q[cu[i] : cu[i + 1]], kh)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        if alibi is not None:
            s = s + np.asarray(alibi)[None, :, None] * (keys[None, None, :] - pos[:, None, None])
        s = np.where(vis[:, None, :], s, -np.inf)
        m = s.max(-1, keepdims=True)
        if sinks is not None:
            m = np.maximum(m, np.asarray(sinks, np.float64)[None, :, None])
        m = np.where(np.isfinite(m), m, 0.0)
        w = np.exp(s - m)
        den = w.sum(-1, keepdims=True)
        if sinks is not None:
            den = den + np.exp(np.asarray(sinks, np.float64)[None, :, None] - m)
        o = np.einsum("nht,thd->nhd", w / np.where(den == 0, 1, den), vh)
        out[cu[i] : cu[i + 1]] = np.where(vis.any(-1)[:, None, None], o, 0.0)
    return out


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
    """seqs: list of (q_len, kv_len). Runs the kernel and compares with the oracle."""
    rng = np.random.default_rng(seed)
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    q_lens = [n for n, _ in seqs]
    kv_lens = [c for _, c in seqs]
    k_scale = v_scale = None
    if jnp.dtype(kv_dtype) == FP8:
        k_scale = jnp.asarray(rng.uniform(0.01, 0.03, hkv), jnp.float32)
        v_scale = jnp.asarray(rng.uniform(0.01, 0.03, hkv), jnp.float32)
    k_pages, v_pages, bt, k_seqs, v_seqs = make_cache(
        rng, kv_lens, hkv, d, bs, kv_dtype, k_scale=k_scale, v_scale=v_scale
    )
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(cu[-1]) + pad_rows, h, d)), dtype)
    if pad_rows:  # padding rows hold NaN: they must not leak anywhere and come out as 0
        q = q.at[int(cu[-1]) :].set(jnp.nan)
    alibi_v = jnp.asarray(rng.uniform(0.05, 0.5, h), jnp.float32) if alibi else None
    sinks_v = jnp.asarray(rng.uniform(-1.0, 2.0, h), jnp.float32) if sinks else None
    scale = 1.0 / math.sqrt(d)
    kw = dict(
        scale=scale,
        softcap=softcap,
        sliding_window=window,
        alibi_slopes=alibi_v,
        sinks=sinks_v,
        k_scale=k_scale,
        v_scale=v_scale,
        interpret=INTERPRET,
        block_sizes=block_sizes,
    )
    lens = jnp.asarray(kv_lens, jnp.int32)
    if decode:
        assert all(n == 1 for n in q_lens) and not pad_rows
        out = pa.paged_decode(q, k_pages, v_pages, bt, lens, **kw)
    else:
        out = pa.paged_attention(q, k_pages, v_pages, bt, lens, jnp.asarray(cu), **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = oracle(
        q,
        k_seqs,
        v_seqs,
        kv_lens,
        cu,
        scale=scale,
        softcap=softcap,
        window=window,
        alibi=None if alibi_v is None else np.asarray(alibi_v),
        sinks=None if sinks_v is None else np.asarray(sinks_v),
    )
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.isfinite(out).all(), f"non-finite at {np.argwhere(~np.isfinite(out))[:4].tolist()}"
    atol, rtol = TOL[jnp.dtype(dtype)]
    err = np.abs(out - ref)
    assert (err <= atol + rtol * np.abs(ref)).all(), (
        f"max err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    )
    if pad_rows:
        assert (out[int(cu[-1]) :] == 0).all()


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
def test_experiment_switches(switches, monkeypatch):
    # Code shapes that are off by default (pa.EXPERIMENT): page-id prefetch, folded scale, grid.
    monkeypatch.setattr(pa, "EXPERIMENT", dict(pa.EXPERIMENT, **switches))
    jax.clear_caches()  # the switches are read at trace time, not part of the jit key
    try:
        run_case(
            [(1, c) for c in DECODE_LENS],
            h=8,
            hkv=2,
            decode=True,
            block_sizes=BlockSizes(block_k=16, num_splits=2),
        )
        run_case(
            [(1, c) for c in DECODE_LENS],
            h=8,
            hkv=2,
            window=20,
            sinks=True,
            decode=True,
            block_sizes=BlockSizes(block_k=32),
        )
        run_case(
            MIXED + [(40, 90)],
            h=8,
            hkv=2,
            pad_rows=2,
            block_sizes=BlockSizes(block_m=16, block_k=16),
        )
        run_case(
            MIXED,
            h=8,
            hkv=2,
            window=12,
            alibi=True,
            softcap=3.0,
            block_sizes=BlockSizes(block_m=32, block_k=16),
        )
    finally:
        jax.clear_caches()


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
    kp0, vp0 = np.asarray(k_pages.astype(jnp.float32)), np.asarray(v_pages.astype(jnp.float32))
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
    for pages, pages0, x in [(kp, kp0, k), (vp, vp0, v)]:
        want = pages0.copy()
        xs = np.asarray(x.astype(jnp.float32))  # expected values computed on the host (IEEE /)
        if scale is not None:
            xs = np.clip(xs / np.asarray(scale)[None, :, None], -448.0, 448.0)
        stored = xs.astype(kv_dtype).astype(np.float32)
        for i, s in enumerate(slots):
            if s >= 0:
                want[s // bs, :, s % bs] = stored[i]
        np.testing.assert_array_equal(np.asarray(pages.astype(jnp.float32)), want)


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
    for splits in (1, 4):
        _lower_for_h100(
            lambda q, k, v, bt, l, a, sk, ks, vs: pa.paged_decode(
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
            ),
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
