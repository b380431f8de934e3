"""Kernel-level tests of the Mosaic GPU paged-attention kernels against the kit's float64 oracle.

On a GPU the real Mosaic GPU lowering runs; on the CPU, Pallas's Mosaic GPU interpreter.
Cases come from the test kit: permuted block tables with NaN in every unused slot and page,
garbage in block-table entries past each context, and NaN in q padding rows.

GPU check + timing (H100):  python -m tests.test_mosaic_kernels --bench
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_paged_attn.testing import assert_close, build_case, random_paged_kv
from pallas_kernels.paged_attention import mosaic, mosaic_decode

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def make_case(
    seqs,
    *,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    block_size=16,
    dtype=jnp.bfloat16,
    pad_rows=3,
    seed=0,
):
    """seqs: list of (q_len, kv_len). Returns the kernel arguments and the kit's case (its
    ``reference`` is the float64 oracle)."""
    case = build_case(
        np.random.default_rng(seed),
        seqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        pad_rows=pad_rows,
        junk_tables=True,
    )
    args = dict(
        q=case.q,
        k_pages=case.cache.k,
        v_pages=case.cache.v,
        block_tables=case.meta.block_tables,
        context_lens=case.meta.context_lens,
        cu_seqlens_q=case.meta.cu_seqlens_q,
    )
    return args, case


def _features(name, num_heads):
    rng = np.random.default_rng(7)
    return {
        "plain": {},
        "softcap": dict(softcap=5.0),
        "window": dict(sliding_window=19),
        "alibi": dict(alibi_slopes=rng.uniform(0.01, 0.3, num_heads).astype(np.float32)),
        "sinks": dict(sinks=rng.uniform(-1, 2, num_heads).astype(np.float32)),
    }[name]


def _run(kind, seqs, feature="plain", **case_kw):
    args, case = make_case(seqs, **case_kw)
    dtype = case_kw.get("dtype", jnp.bfloat16)
    num_heads, head_dim = args["q"].shape[1:]
    scale = 1 / math.sqrt(head_dim)
    opts = _features(feature, num_heads)
    ref = case.reference(scale=scale, **opts)
    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
    if kind == "decode":
        n = len(seqs)
        out = mosaic_decode.paged_decode(
            args["q"][:n],
            args["k_pages"],
            args["v_pages"],
            args["block_tables"],
            args["context_lens"],
            scale=scale,
            interpret=INTERPRET,
            **kw,
        )
        ref = ref[:n]
    else:
        out = mosaic.paged_attention(**args, scale=scale, interpret=INTERPRET, **kw)
    assert_close(out, ref, dtype, what=f"mosaic {kind}")


# (q_len, kv_len): lengths 0, 1, BS±1, chunks at the tail of cached context, n > L.
PREFILL = [(70, 70), (1, 1), (15, 15), (17, 40), (0, 0), (3, 0), (5, 3)]
MIXED = [(1, 33), (20, 100), (1, 16), (0, 9), (130, 150)]


@pytest.mark.parametrize("seqs", [PREFILL, MIXED], ids=["prefill", "mixed"])
def test_prefill_mixed(seqs):
    _run("prefill", seqs)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,num_ctas,feature",
    [(4, 2, 3, "plain"), (8, 2, 2, "sinks"), (3, 1, 5, "alibi")],
)
def test_prefill_persistent_ctas(num_heads, num_kv_heads, num_ctas, feature):
    """Few CTAs, many (tile, heads) items each in snake order: the K/V ring and the two
    warpgroups' turns run on across items, each next q tile loads during an epilogue."""
    args, case = make_case(MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, seed=5)
    opts = _features(feature, num_heads)
    ref = case.reference(scale=0.2, **opts)
    kw = {k: jnp.asarray(v) for k, v in opts.items()}
    out = mosaic.paged_attention(
        **args,
        scale=0.2,
        num_ctas=num_ctas,
        interpret=INTERPRET,
        block_sizes=mosaic.BlockSizes(64, 2, 2 if num_heads // num_kv_heads % 2 == 0 else 1),
        **kw,
    )
    assert_close(out, ref, jnp.bfloat16)


def test_snake_items_balance_heaviest_first():
    """Every item once; with items sorted heaviest first, CTA totals within one item."""
    for n, c in [(10, 3), (2080, 132), (7, 7), (5, 1)]:
        order = mosaic.snake_items(n, c)
        assert sorted(order[order >= 0].tolist()) == list(range(n))
        sizes = np.append(np.arange(n, 0, -1), 0)  # item k weighs n - k
        totals = sizes[order].sum(axis=0)
        assert totals.max() - totals.min() <= n


@pytest.mark.parametrize("feature", ["softcap", "window", "alibi", "sinks"])
def test_prefill_features(feature):
    _run("prefill", [(40, 90), (1, 17), (9, 9)], feature)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (3, 1), (8, 1)])
def test_prefill_gqa(num_heads, num_kv_heads):
    _run("prefill", [(30, 47), (2, 2)], num_heads=num_heads, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize(
    "head_dim,block_size,dtype",
    [(128, 32, jnp.float16), (64, 128, jnp.bfloat16), (256, 8, jnp.bfloat16)],
)
def test_prefill_shapes(head_dim, block_size, dtype):
    _run("prefill", [(20, 150), (3, 4)], head_dim=head_dim, block_size=block_size, dtype=dtype)


@pytest.mark.parametrize("feature", ["plain", "window", "alibi", "sinks", "softcap"])
def test_decode(feature):
    _run(
        "decode",
        [(1, 1), (1, 0), (1, 15), (1, 17), (1, 200)],
        feature,
        num_heads=8,
        num_kv_heads=2,
        pad_rows=0,
    )


@pytest.mark.parametrize(
    "head_dim,block_size,dtype,num_heads,num_kv_heads",
    [(128, 16, jnp.float16, 3, 3), (256, 256, jnp.bfloat16, 4, 1), (64, 8, jnp.bfloat16, 7, 1)],
)
def test_decode_shapes(head_dim, block_size, dtype, num_heads, num_kv_heads):
    _run(
        "decode",
        [(1, 65), (1, 300)],
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        pad_rows=0,
    )


@pytest.mark.parametrize("num_ctas", [5, 16])
def test_decode_stream_k(num_ctas):
    """Stream-K: 6 pairs over 5 or 16 CTAs; a long pair spans several, short ones share one."""
    args, case = make_case([(1, 500), (1, 3), (1, 0)], num_heads=4, num_kv_heads=2, pad_rows=0)
    ref = case.reference(scale=0.2)
    out = mosaic_decode.paged_decode(
        args["q"],
        args["k_pages"],
        args["v_pages"],
        args["block_tables"],
        args["context_lens"],
        scale=0.2,
        stream=True,
        num_ctas=num_ctas,
        interpret=INTERPRET,
    )
    assert_close(out, ref, jnp.bfloat16)


@pytest.mark.parametrize("feature", ["plain", "window", "alibi", "softcap", "sinks"])
def test_decode_whole_pairs(feature):
    """stream=False: one item per (seq, KV head), normalised in the kernel (sinks: merged in
    jnp)."""
    seqs = [(1, 200), (1, 0), (1, 17), (1, 1)]
    args, case = make_case(seqs, num_heads=8, num_kv_heads=2, pad_rows=0)
    opts = _features(feature, 8)
    ref = case.reference(scale=0.2, **opts)
    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
    out = mosaic_decode.paged_decode(
        args["q"],
        args["k_pages"],
        args["v_pages"],
        args["block_tables"],
        args["context_lens"],
        scale=0.2,
        stream=False,
        interpret=INTERPRET,
        **kw,
    )
    assert_close(out, ref, jnp.bfloat16)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,stream,num_ctas,feature",
    [
        (12, 4, False, 3, "plain"),
        (12, 4, False, 4, "alibi"),
        (10, 2, True, 5, "sinks"),
        (10, 2, True, 7, "alibi"),
        (10, 2, True, 2, "window"),
    ],
)
def test_decode_persistent_ctas(num_heads, num_kv_heads, stream, num_ctas, feature):
    """Few CTAs, many items each: the K/V ring runs on across items; GQA groups of 3 and 5 heads
    sit at every offset of the flat q rows (S H = 132 or 110: q padded to a multiple of 8)."""
    seqs = [(1, n) for n in (40, 0, 17, 1, 100, 33, 16, 64, 5, 2, 80)][: 132 // num_heads]
    args, case = make_case(seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, pad_rows=0, seed=3)
    opts = _features(feature, num_heads)
    ref = case.reference(scale=0.2, **opts)
    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
    out = mosaic_decode.paged_decode(
        args["q"],
        args["k_pages"],
        args["v_pages"],
        args["block_tables"],
        args["context_lens"],
        scale=0.2,
        block_sizes=mosaic.BlockSizes(64, 2, 1),
        stream=stream,
        num_ctas=num_ctas,
        interpret=INTERPRET,
        **kw,
    )
    assert_close(out, ref, jnp.bfloat16)


def test_decode_rows_cover_each_group():
    """The 64 q rows a decode item loads hold its G heads at r_off, start on a multiple of 8
    and stay inside q."""
    for s, hkv, g in [(11, 4, 3), (1, 1, 1), (3, 2, 64), (64, 8, 4), (5, 7, 5)]:
        q_rows = max(-(-s * hkv * g // 8) * 8, 64)
        seqs, heads = np.meshgrid(np.arange(s), np.arange(hkv), indexing="ij")
        row0, r_off, start = (
            np.asarray(x)
            for x in mosaic.decode_rows(jnp.asarray(seqs), jnp.asarray(heads), hkv, g, q_rows)
        )
        assert np.all(row0 % 8 == 0) and np.all(row0 >= 0) and np.all(row0 + 64 <= q_rows)
        assert np.all(row0 + r_off == start) and np.all(r_off >= 0) and np.all(r_off + g <= 64)
        assert np.array_equal(start.ravel(), np.arange(s * hkv) * g)


def test_stream_k_covers_each_tile_once():
    """Every flat tile has one CTA; a pair's CTAs are consecutive and its slots are theirs."""
    for pairs, tiles, ctas in [(64, 256, 132), (6, 8, 5), (6, 8, 16), (1, 3, 3), (8, 4096, 132)]:
        total = pairs * tiles
        owner = np.repeat(np.arange(ctas), np.diff(np.arange(ctas + 1) * total // ctas))
        assert owner.shape == (total,)
        first, last = mosaic.stream_ctas(np.arange(pairs), tiles, pairs, ctas)
        per_pair = owner.reshape(pairs, tiles)
        assert np.array_equal(first, per_pair[:, 0]) and np.array_equal(last, per_pair[:, -1])
        slots, valid = mosaic_decode.stream_plan(pairs, tiles, ctas)
        assert slots == (last - first).max() + 1 and valid.sum() == (last - first + 1).sum()


def test_even_split_ctas():
    """A whole number of CTAs per pair when at most 1/32 of the CTAs idle; then a pair whose
    tiles divide evenly has one slot per CTA and no CTA spans two pairs."""
    cases = {
        (64, 132): 128,
        (16, 132): 128,
        (8, 132): 128,
        (3, 132): 132,
        (5, 132): 130,
        (40, 132): 132,
        (50, 132): 132,
        (132, 132): 132,
        (200, 132): 132,
    }
    for (pairs, ctas), want in cases.items():
        assert mosaic_decode.even_split_ctas(pairs, ctas) == want, (pairs, ctas)
    slots, valid = mosaic_decode.stream_plan(64, 512, 128)
    assert slots == 2 and valid.all()


def test_prefill_unaligned_rows_and_page_256():
    # sequence starts off multiples of 8, T not a multiple of 8, a page larger than the KV tile
    _run("prefill", [(3, 300), (13, 20), (61, 61), (2, 700)], block_size=256, pad_rows=5)


def test_unsupported_raise():
    for kw, what in [
        (dict(head_dim=96), "head_dim"),
        (dict(block_size=12), "block_size"),
        (dict(q_dtype=jnp.float32), "q_dtype"),
        (dict(kv_dtype=jnp.float8_e4m3fn), "float8"),
    ]:
        base = dict(head_dim=128, block_size=16, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16)
        base.update(kw)
        if "q_dtype" in kw:
            base["kv_dtype"] = kw["q_dtype"]
        with pytest.raises(NotImplementedError, match=what):
            mosaic.check_supported(**base)


@pytest.mark.parametrize(
    "kind,head_dim,block_size,feature",
    [
        ("prefill", 128, 16, "window"),
        ("prefill", 256, 8, "alibi"),
        ("decode", 128, 16, "alibi"),
        ("decode", 256, 256, "plain"),
    ],
)
def test_real_lowering_traces_on_any_host(kind, head_dim, block_size, feature):
    """The real Mosaic GPU lowering (layout inference, shared-memory budget) runs without a GPU."""
    sds = jax.ShapeDtypeStruct
    pages = sds((64, 2, block_size, head_dim), jnp.bfloat16)
    opts = {
        k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
        for k, v in _features(feature, 8).items()
    }
    if kind == "decode":
        f = jax.jit(lambda *a: mosaic_decode.paged_decode(*a, scale=0.1, **opts))
        args = (
            sds((3, 8, head_dim), jnp.bfloat16),
            pages,
            pages,
            sds((3, 9), jnp.int32),
            sds((3,), jnp.int32),
        )
    else:
        f = jax.jit(lambda *a: mosaic.paged_attention(*a, scale=0.1, **opts))
        args = (
            sds((100, 8, head_dim), jnp.bfloat16),
            pages,
            pages,
            sds((3, 9), jnp.int32),
            sds((3,), jnp.int32),
            sds((4,), jnp.int32),
        )
    assert "mosaic" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text().lower()


def test_plan_tiles_cover_each_row_once():
    cu = jnp.asarray([0, 1, 130, 130, 200], jnp.int32)
    lens = jnp.asarray([5, 129, 0, 300], jnp.int32)
    info = np.asarray(mosaic.plan_tiles(cu, lens, 210, None, 128))
    hits = np.zeros(210, int)
    for t in info:
        hits[t[mosaic.Info.ROW0] + t[mosaic.Info.LO] : t[mosaic.Info.ROW0] + t[mosaic.Info.HI]] += 1
    assert (hits == 1).all()


# ---------------------------------------------------------------------------------------------
# GPU check and timing: python -m tests.test_mosaic_kernels --bench


def _time(fn, *args, iters=30):
    import time

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _contiguous(pages, tables):
    """[NB, Hkv, BS, D] pages of full-page sequences -> contiguous [S, L, Hkv, D]."""
    s, mb = tables.shape
    _, hkv, bs, d = pages.shape
    return pages[tables].transpose(0, 1, 3, 2, 4).reshape(s, mb * bs, hkv, d)


def _prefill_call(tables, lens, cu, scale, interpret):
    return jax.jit(
        lambda q, kp, vp: mosaic.paged_attention(
            q, kp, vp, tables, lens, cu, scale=scale, interpret=interpret
        )
    )


def _decode_call(kernel, tables, lens, scale, **kw):
    return jax.jit(lambda q, kp, vp: kernel(q, kp, vp, tables, lens, scale=scale, **kw))


def bench(
    prefill=((1, 0, 8192), (4, 2048, 2048)),
    decode=((64, 4096), (8, 32768)),
    h=32,
    hkv=8,
    d=128,
    bs=16,
    iters=30,
):
    """Prints max error vs XLA and the median time of each shape (on the CPU: interpreted)."""
    dt = jnp.bfloat16
    scale = 1 / math.sqrt(d)
    kv = dict(num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dt)
    # 1) one 8192-token causal prefill from the paged cache, vs cuDNN on contiguous KV.
    for batch, cached, new in prefill:
        total = cached + new
        cache, tables, lens = random_paged_kv(jax.random.key(0), [total] * batch, **kv)
        ks, vs = _contiguous(cache.k, tables), _contiguous(cache.v, tables)
        q = jax.random.normal(jax.random.key(2), (batch * new, h, d), dt)
        cu = jnp.arange(batch + 1, dtype=jnp.int32) * new
        f = _prefill_call(tables, lens, cu, scale, INTERPRET)
        out = f(q, cache.k, cache.v)
        qb = q.reshape(batch, new, h, d)
        mask = (jnp.arange(new)[:, None] + cached) >= jnp.arange(total)[None, :]
        ref = jax.nn.dot_product_attention(qb, ks, vs, mask=mask[None, None], implementation="xla")
        err = float(
            jnp.abs(out.reshape(ref.shape).astype(jnp.float32) - ref.astype(jnp.float32)).max()
        )
        pairs = batch * sum(min(total, cached + j + 1) for j in range(new))
        flops = 4 * pairs * d * h
        t = _time(f, q, cache.k, cache.v, iters=iters)
        line = f"prefill {batch}x({cached}+{new}): max err {err:.3g}  {t * 1e3:.3f} ms  {flops / t / 1e12:.1f} TFLOP/s"
        if cached == 0:
            g = jax.jit(
                lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn"
                )
            )
            try:
                tc = _time(g, qb, ks, vs, iters=iters)
                line += f" | cuDNN contiguous {flops / tc / 1e12:.1f} TFLOP/s"
            except Exception as e:  # noqa: BLE001 - report, keep timing the rest
                line += f" | cuDNN failed: {type(e).__name__}"
        print(line)
    # 2) decode: batch 64, context 4096, and batch 8 x 32768.
    for batch, ctx in decode:
        cache, tables, lens = random_paged_kv(jax.random.key(1), [ctx] * batch, **kv)
        q = jax.random.normal(jax.random.key(2), (batch, h, d), dt)
        f = _decode_call(mosaic_decode.paged_decode, tables, lens, scale, interpret=INTERPRET)
        out = f(q, cache.k, cache.v)
        kk, vv = _contiguous(cache.k, tables), _contiguous(cache.v, tables)
        ref = jax.nn.dot_product_attention(q[:, None], kk, vv, implementation="xla")[:, 0]
        err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
        t = _time(f, q, cache.k, cache.v, iters=iters)
        nbytes = 2 * batch * ctx * hkv * d * 2
        line = f"decode {batch}x{ctx}: max err {err:.3g}  {t * 1e6:.1f} us  {nbytes / t / 1e12:.2f} TB/s"
        try:  # the Triton kernel, same run
            from pallas_kernels.paged_attention import triton as tri

            none = dict.fromkeys(("softcap", "sliding_window", "alibi_slopes", "sinks"))
            g = _decode_call(
                tri.paged_decode, tables, lens, scale, k_scale=None, v_scale=None, **none
            )
            tt = _time(g, q, cache.k, cache.v, iters=iters)
            line += f" | triton {nbytes / tt / 1e12:.2f} TB/s"
        except Exception as e:  # noqa: BLE001 - report, keep timing the rest
            line += f" | triton failed: {type(e).__name__}: {str(e)[:200]}"
        print(line)
        x = jnp.ones((256 * 1024 * 1024 if ON_GPU else 1024,), dt)
        tc = _time(jax.jit(lambda x: x * 1.5), x, iters=iters)
        print(f"  copy ceiling (XLA x*1.5): {2 * x.size * 2 / tc / 1e12:.2f} TB/s")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        if ON_GPU:
            bench()
        else:  # smoke run of the benchmark code under the interpreter
            bench(prefill=((1, 0, 128), (2, 32, 48)), decode=((2, 256),), h=4, hkv=2, d=64, iters=1)
    else:
        sys.exit(pytest.main([__file__, "-q", "-x"]))
