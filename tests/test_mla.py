"""Multi-head latent attention (absorbed form): ``write_mla_kv`` and ``paged_mla_attention``
against the float64 oracle, over caches whose every unused slot holds NaN, permuted block
tables, decode / prefill / chunked / mixed batches, padding rows, float8 caches, lse and its
merge, gradients, errors, and kernel backends (none yet: they must name ``backend="xla"``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import backends
from jax_paged_attn.testing import assert_close, oracle
from jax_paged_attn.testing.tolerance import FULL_F32

FP8 = jnp.float8_e4m3fn

# Batches as (n query rows, context length) per sequence.
BATCHES = {
    "decode": [(1, 37), (1, 1), (1, 80), (0, 0)],
    "prefill": [(23, 23), (9, 9), (0, 0), (40, 40)],
    "chunked": [(12, 50), (7, 19), (16, 70)],
    "mixed": [(1, 45), (17, 17), (0, 0), (1, 3), (10, 33), (1, 64)],
}


def _skip_without_mla(backend):
    if "mla" not in backends.TABLE[backend].ops:
        pytest.skip(f"{backend} has no MLA kernels yet (tested below: it names xla)")


@dataclasses.dataclass
class MLACase:
    q_nope: jax.Array
    q_pe: jax.Array
    cache: jpa.MLACache
    meta: jpa.AttentionMetadata
    scale: float

    def reference(self, **opts):
        m = self.meta
        return oracle.paged_mla_attention(
            self.q_nope.astype(jnp.float32),
            self.q_pe.astype(jnp.float32),
            self.cache.kv,
            m.block_tables,
            m.context_lens,
            m.cu_seqlens_q,
            scale=self.scale,
            kv_scale=self.cache.scale,
            **opts,
        )


def build(
    rng,
    seqs,
    *,
    rank=64,
    rope=32,
    heads=8,
    block_size=16,
    dtype=jnp.float32,
    kv_dtype=None,
    kv_scale=None,
    pad_rows=2,
    spare_blocks=3,
    magnitude=1.0,
) -> MLACase:
    """A batch over a NaN-filled cache written through ``write_mla_kv`` (in one call, in a
    random token order), blocks assigned from a random permutation; padding rows of q are NaN."""
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    blocks = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks) + spare_blocks
    max_blocks = max(max(blocks), 1) + 1
    perm = rng.permutation(num_blocks)
    tables = np.full((len(seqs), max_blocks), -1, np.int32)  # unused entries: never read
    slots, at = [], 0
    for i, ((_, ctx), nb) in enumerate(zip(seqs, blocks, strict=True)):
        tables[i, :nb] = perm[at : at + nb]
        at += nb
        t = np.arange(ctx)
        slots.append(tables[i, t // block_size] * block_size + t % block_size)
    slots = np.concatenate(slots).astype(np.int32)
    order = rng.permutation(slots.shape[0])
    cache = jpa.MLACache.init(num_blocks, block_size, rank, rope, kv_dtype, scale=kv_scale)
    cache = dataclasses.replace(cache, kv=jnp.full(cache.kv.shape, jnp.nan, cache.dtype))
    c_kv = magnitude * rng.standard_normal((slots.shape[0], rank), np.float32)
    k_pe = magnitude * rng.standard_normal((slots.shape[0], rope), np.float32)
    cache = jpa.write_mla_kv(
        cache, jnp.asarray(c_kv[order]), jnp.asarray(k_pe[order]), jnp.asarray(slots[order])
    )
    n = np.array([q for q, _ in seqs])
    cu = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    rows = int(cu[-1]) + pad_rows
    q_nope = rng.standard_normal((rows, heads, rank), np.float32)
    q_pe = rng.standard_normal((rows, heads, rope), np.float32)
    q_nope[cu[-1] :] = np.nan
    q_pe[cu[-1] :] = np.nan
    meta = jpa.AttentionMetadata(
        jnp.asarray(tables), jnp.asarray([c for _, c in seqs], jnp.int32), jnp.asarray(cu)
    )
    return MLACase(
        jnp.asarray(q_nope, dtype),
        jnp.asarray(q_pe, dtype),
        cache,
        meta,
        float(1.0 / np.sqrt(rank + rope)),
    )


def _run(case, backend, **kw):
    return jpa.paged_mla_attention(
        case.q_nope, case.q_pe, case.cache, case.meta, scale=case.scale, backend=backend, **kw
    )


def _check_lse(lse, want, what):
    lse, want = np.asarray(lse, np.float64), np.asarray(want, np.float64)
    assert lse.dtype == np.float64 and np.array_equal(np.isneginf(lse), np.isneginf(want)), what
    finite = np.isfinite(want)
    np.testing.assert_allclose(lse[finite], want[finite], atol=2e-3, rtol=1e-3, err_msg=what)


CONFIGS = [  # (rank, rope, heads, block_size, dtype, batch)
    (512, 64, 16, 16, jnp.float32, "mixed"),
    (512, 64, 8, 64, jnp.bfloat16, "chunked"),
    (512, 64, 128, 64, jnp.bfloat16, "decode"),
    (64, 32, 8, 16, jnp.float32, "prefill"),
    (64, 32, 16, 64, jnp.bfloat16, "mixed"),
    (64, 32, 8, 16, jnp.float32, "chunked"),
    (64, 32, 128, 16, jnp.float32, "decode"),
]


@pytest.mark.parametrize(
    "rank, rope, heads, block_size, dtype, batch",
    CONFIGS,
    ids=[f"R{r}P{p}-H{h}-BS{b}-{jnp.dtype(d).name}-{k}" for r, p, h, b, d, k in CONFIGS],
)
def test_matches_oracle(backend, rng, rank, rope, heads, block_size, dtype, batch):
    _skip_without_mla(backend)
    case = build(
        rng, BATCHES[batch], rank=rank, rope=rope, heads=heads, block_size=block_size, dtype=dtype
    )
    out, lse = _run(case, backend, return_lse=True)
    assert out.shape == case.q_nope.shape and out.dtype == dtype
    want, want_lse = case.reference(return_lse=True)
    tight = FULL_F32 if dtype == jnp.float32 else {}  # float32 at HIGHEST precision
    assert_close(out, want, dtype, what=f"{batch} out", **tight)
    _check_lse(lse, want_lse, f"{batch} lse")
    # Rows outside every sequence (NaN queries) are exactly zero.
    end = int(case.meta.cu_seqlens_q[-1])
    assert not np.any(np.asarray(out[end:], np.float32))
    np.testing.assert_array_equal(_run(case, backend), out)  # the lse-less call agrees


def test_softcap(backend, rng):
    _skip_without_mla(backend)
    case = build(rng, BATCHES["mixed"], magnitude=3.0)  # large logits: the cap bites
    out = _run(case, backend, softcap=5.0)
    assert_close(out, case.reference(softcap=5.0), jnp.float32, what="softcap")
    assert not np.allclose(np.asarray(out), case.reference(), atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_float8_cache(backend, rng, dtype):
    _skip_without_mla(backend)
    case = build(rng, BATCHES["mixed"], kv_dtype=FP8, kv_scale=0.03125, dtype=dtype)
    assert case.cache.kv.dtype == FP8 and case.cache.scale.shape == ()
    # The oracle reads the stored float8 values times the scale: it models the quantisation.
    assert_close(_run(case, backend), case.reference(), dtype, what="float8")


def test_write_semantics(rng):
    cache = jpa.MLACache.init(5, 16, kv_lora_rank=8, rope_dim=4, dtype=jnp.float32)
    cache = dataclasses.replace(cache, kv=jnp.asarray(rng.standard_normal(cache.kv.shape)))
    c_kv = rng.standard_normal((5, 8)).astype(np.float32)
    k_pe = rng.standard_normal((5, 4)).astype(np.float32)
    slots = np.array([37, -1, 0, 80, 79], np.int32)  # padding and one past the cache: skipped
    want = np.array(cache.kv)
    new = jax.jit(jpa.write_mla_kv, donate_argnums=0)(
        cache, jnp.asarray(c_kv), jnp.asarray(k_pe), jnp.asarray(slots)
    )
    assert cache.kv.is_deleted()  # donated: updated in place
    for i, s in enumerate(slots):
        if 0 <= s < 80:
            want[s // 16, s % 16] = np.concatenate([c_kv[i], k_pe[i]])
    np.testing.assert_array_equal(np.asarray(new.kv), want)
    assert (new.kv_lora_rank, new.rope_dim) == (8, 4)


def test_float8_write_saturates():
    cache = jpa.MLACache.init(2, 16, kv_lora_rank=8, rope_dim=4, dtype=FP8, scale=0.5)
    c_kv = jnp.array([[1000.0, -1000.0, 1.0, 0.3, 0, 0, 0, 0]])
    k_pe = jnp.array([[3.0, -0.7, 0, 0]])
    cache = jpa.write_mla_kv(cache, c_kv, k_pe, jnp.array([17], jnp.int32))
    row = np.asarray(cache.kv[1, 1].astype(jnp.float32))
    x = np.concatenate([np.asarray(c_kv[0]), np.asarray(k_pe[0])]) / 0.5
    want = np.clip(x, -448, 448).astype(FP8).astype(np.float32)
    np.testing.assert_array_equal(row, want)
    assert row[0] == 448 and row[1] == -448


def test_merge_of_two_halves(backend, rng):
    """A decode batch split into each sequence's first blocks and the rest: merging the two
    states reproduces attention over all keys."""
    _skip_without_mla(backend)
    bs = 16
    case = build(rng, [(1, 37), (1, 80), (1, 20), (1, 1)], block_size=bs)
    lens = np.asarray(case.meta.context_lens)
    tables = np.asarray(case.meta.block_tables)
    split = np.minimum(1, (lens - 1) // bs)  # blocks on side A: 1 when a second block exists
    a_lens = np.minimum(lens, split * bs)
    b_tables = np.stack([np.roll(t, -s) for t, s in zip(tables, split, strict=True)])

    def side(tables, lens):
        meta = jpa.AttentionMetadata(
            jnp.asarray(tables), jnp.asarray(lens, jnp.int32), case.meta.cu_seqlens_q
        )
        return _run(dataclasses.replace(case, meta=meta), backend, return_lse=True)

    out_a, lse_a = side(tables, a_lens)
    out_b, lse_b = side(b_tables, lens - a_lens)
    out, lse = jpa.merge_attention_states(out_a, lse_a, out_b, lse_b)
    want, want_lse = case.reference(return_lse=True)
    assert_close(out, want, jnp.float32, what="merged")
    _check_lse(lse, want_lse, "merged lse")


def _dense(q_nope, q_pe, kv, tables, lens, cu, scale, block_size):
    """MLA as dense float32 JAX over each sequence's gathered rows (for autodiff)."""
    rank = q_nope.shape[-1]
    out = jnp.zeros(q_nope.shape, jnp.float32)
    for i, ctx in enumerate(lens):
        start, end = int(cu[i]), int(cu[i + 1])
        if ctx == 0 or end == start:
            continue
        t = np.arange(ctx)
        rows = kv[tables[i, t // block_size], t % block_size]  # [L, R + P]
        q = jnp.concatenate([q_nope[start:end], q_pe[start:end]], -1)
        s = scale * jnp.einsum("nhd,td->nht", q, rows, precision="highest")
        pos = ctx - (end - start) + np.arange(end - start)
        s = jnp.where((t[None, :] <= pos[:, None])[:, None, :], s, -jnp.inf)
        o = jnp.einsum("nht,tr->nhr", jax.nn.softmax(s, -1), rows[:, :rank], precision="highest")
        out = out.at[start:end].set(o)
    return out


def test_grad_matches_dense_autodiff(backend, rng):
    _skip_without_mla(backend)
    bs = 16
    case = build(rng, [(1, 21), (9, 30), (0, 0), (4, 4)], rank=16, rope=8, heads=4, pad_rows=0)
    m = case.meta
    tables, lens, cu = (np.asarray(x) for x in (m.block_tables, m.context_lens, m.cu_seqlens_q))
    w = jnp.asarray(rng.standard_normal(case.q_nope.shape), jnp.float32)

    def loss(q_nope, q_pe, kv):
        cache = dataclasses.replace(case.cache, kv=kv)
        out = jpa.paged_mla_attention(q_nope, q_pe, cache, m, scale=case.scale, backend=backend)
        return jnp.sum(out * w)

    def dense_loss(q_nope, q_pe, kv):
        return jnp.sum(_dense(q_nope, q_pe, kv, tables, lens, cu, case.scale, bs) * w)

    args = (case.q_nope, case.q_pe, case.cache.kv)
    got = jax.grad(loss, argnums=(0, 1, 2))(*args)
    # The dense form reads only written rows: give it a cache whose NaN slots are 0.
    finite_kv = jnp.where(jnp.isnan(case.cache.kv), 0.0, case.cache.kv)
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(case.q_nope, case.q_pe, finite_kv)
    for name, g, h in zip(("q_nope", "q_pe", "cache.kv"), got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g))), name  # NaN slots get no (NaN) gradient
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-5, rtol=1e-4, err_msg=name)
    assert float(jnp.abs(got[2]).sum()) > 0


def test_auto_runs_xla(rng):
    case = build(rng, BATCHES["mixed"])
    np.testing.assert_array_equal(_run(case, "auto"), _run(case, "xla"))


def test_empty_batch():
    cache = jpa.MLACache.init(2, 16, 8, 4, jnp.float32)
    meta = jpa.AttentionMetadata.decode(jnp.zeros((0, 1), jnp.int32), jnp.zeros((0,), jnp.int32))
    out, lse = jpa.paged_mla_attention(
        jnp.zeros((0, 2, 8)), jnp.zeros((0, 2, 4)), cache, meta, scale=0.3, return_lse=True
    )
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)


@pytest.mark.parametrize("kernel", ["triton", "mosaic", "metal"])
def test_kernel_backends_name_xla(kernel, rng):
    if "mla" in backends.TABLE[kernel].ops:
        pytest.skip(f"{kernel} has MLA kernels")
    case = build(rng, [(1, 5)], rank=16, rope=8, heads=2)
    with pytest.raises(NotImplementedError, match="backend='xla'"):
        _run(case, kernel, interpret=True)
    with pytest.raises(NotImplementedError, match="backend='xla'"):
        jpa.write_mla_kv(
            case.cache,
            jnp.zeros((1, 16)),
            jnp.zeros((1, 8)),
            jnp.zeros((1,), jnp.int32),
            backend=kernel,
            interpret=True,
        )


def test_no_recompile_when_batch_contents_change(backend, rng):
    _skip_without_mla(backend)
    f = jax.jit(lambda a, b, c, m: jpa.paged_mla_attention(a, b, c, m, scale=0.1, backend=backend))
    kw = dict(rank=32, rope=16, heads=4)
    first = build(rng, [(1, 20), (6, 6), (3, 40)], spare_blocks=2, **kw)
    f(first.q_nope, first.q_pe, first.cache, first.meta).block_until_ready()
    second = build(rng, [(4, 10), (1, 1), (5, 41)], spare_blocks=3, **kw)
    shapes = [jax.tree.map(jnp.shape, (c.q_nope, c.q_pe, c.cache, c.meta)) for c in (first, second)]
    assert shapes[0] == shapes[1]
    out = f(second.q_nope, second.q_pe, second.cache, second.meta)
    assert f._cache_size() == 1
    second.scale = 0.1
    assert_close(out, second.reference(), jnp.float32, what="second batch")


def _errors(case):
    c = case.cache
    bad_width = dataclasses.replace(c, kv=c.kv[..., :-1])
    bf16 = jpa.MLACache.init(c.num_blocks, c.block_size, 16, 8, jnp.bfloat16)
    qn, qp = case.q_nope, case.q_pe
    return [
        (dict(scale=None), "scale is required"),
        (dict(scale=-1.0), "scale must be > 0"),
        (dict(softcap=0.0), "softcap must be > 0"),
        (dict(q_nope=qn[..., :-1]), "q_nope must have 16 features"),
        (dict(q_pe=qp[..., :-1]), "q_pe must have 8 features"),
        (dict(q_pe=qp[:, :1]), "q_pe must have q_nope's rows and heads"),
        (dict(q_pe=qp.astype(jnp.bfloat16)), "q_pe must have q_nope's dtype"),
        (dict(q_nope=qn.astype(jnp.int32)), "q_nope must be float32"),
        (dict(q_nope=qn[0]), "q_nope must have rank 3"),
        (dict(cache=bad_width), "cache.kv must have kv_lora_rank \\+ rope_dim = 24"),
        (dict(cache=dataclasses.replace(bf16, kv=bf16.kv.astype(FP8))), "cache.scale must be"),
        (dict(cache="kv"), "cache must be an MLACache"),
        (dict(meta=(1, 2)), "meta must be an AttentionMetadata"),
        (dict(return_lse=1), "return_lse must be a bool"),
        (dict(backend="cuda"), "backend must be one of"),
    ]


def test_bad_inputs_name_the_argument(rng):
    case = build(rng, [(2, 5)], rank=16, rope=8, heads=2)
    base = dict(q_nope=case.q_nope, q_pe=case.q_pe, cache=case.cache, meta=case.meta, scale=0.2)
    for change, message in _errors(case):
        kw = {**base, **change}
        args = [kw.pop(k) for k in ("q_nope", "q_pe", "cache", "meta")]
        with pytest.raises(ValueError, match=message):
            jpa.paged_mla_attention(*args, **kw)


def test_bad_writes_and_caches_name_the_argument(rng):
    cache = jpa.MLACache.init(2, 16, 8, 4, jnp.float32)
    c_kv, k_pe, slots = jnp.zeros((3, 8)), jnp.zeros((3, 4)), jnp.zeros((3,), jnp.int32)
    for args, message in [
        ((cache, c_kv[:, :7], k_pe, slots), "c_kv must have 8 features"),
        ((cache, c_kv, k_pe[:, :3], slots), "k_pe must have 4 features"),
        ((cache, c_kv, k_pe[:2], slots), "k_pe must have one row per c_kv row"),
        ((cache, c_kv, k_pe, slots[:2]), "slot_mapping must have shape"),
        ((cache, c_kv, k_pe, slots.astype(jnp.float32)), "slot_mapping must be an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            jpa.write_mla_kv(*args)
    with pytest.raises(ValueError, match="scale is only for float8_e4m3fn"):
        jpa.MLACache.init(2, 16, 8, 4, jnp.bfloat16, scale=0.5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        jpa.MLACache.init(2, 16, 8, 4, jnp.int8)
    with pytest.raises(ValueError, match="kv_lora_rank must be > 0"):
        jpa.MLACache.init(2, 16, 0, 4)
    with pytest.raises(ValueError, match="scale must be a scalar"):
        jpa.MLACache.init(2, 16, 8, 4, FP8, scale=jnp.ones(3))
