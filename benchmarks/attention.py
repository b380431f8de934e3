"""The attention groups: ``decode`` (``paged_decode``) and ``prefill`` / ``sweep`` / mixed
batches (``paged_attention``), our backends through the public API and the peers on the same data.

Inputs: random caches with permuted block tables, NaN in every spare page and every slot past a
sequence's context. Checks: each kernel's output against the ``xla`` backend on the same
inputs; for prefill, the rows of a window at the head and the tail of every sequence (the xla
backend computes only those rows: a sub-batch whose context lengths end at the window).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import peers, timing
from benchmarks import shapes as S
from benchmarks.harness import (
    NAMED_PEER,
    Ctx,
    api_kw,
    err_line,
    jpa,
    new_row,
    reference_check,
    run_row,
    skip,
)

CHECK_WINDOW = 128  # prefill check: this many rows at the head and tail of each sequence


@dataclasses.dataclass
class Paged:
    cache: object
    block_tables: jax.Array  # i32[S, MB]
    context_lens: jax.Array  # i32[S]
    bt_np: np.ndarray
    lens: tuple[int, ...]


def paged_cache(seed: int, lens, hkv, d, bs, dtype) -> Paged:
    """A cache holding random K/V for sequences of ``lens`` tokens in permuted blocks, and 1/8
    more spare pages (``jax_paged_attn.testing.random_paged_kv``). Slots past each context and
    all spare pages are NaN; block-table entries past a sequence's blocks point at a NaN page
    (never to be read)."""
    from jax_paged_attn.testing import random_paged_kv

    used = sum(max(1, -(-L // bs)) for L in lens)
    cache, tables, context_lens = random_paged_kv(
        jax.random.key(seed),
        list(lens),
        num_kv_heads=hkv,
        head_dim=d,
        block_size=bs,
        dtype=jnp.dtype(dtype),
        num_blocks=used + max(2, used // 8),
    )
    return Paged(cache, tables, context_lens, np.asarray(tables), tuple(lens))


def contiguous_kv(p: Paged, i: int):
    """K, V of sequence ``i`` as contiguous ``[L, Hkv, D]`` arrays gathered from the cache."""
    L = p.lens[i]
    nb = -(-L // p.cache.k.shape[2])
    idx = jnp.asarray(p.bt_np[i, :nb])

    def g(pages):
        _, hkv, _, d = pages.shape
        x = pages[idx].transpose(0, 2, 1, 3)  # [nb, BS, Hkv, D]
        return x.reshape(-1, hkv, d)[:L]

    return g(p.cache.k), g(p.cache.v)


def _xla_reference(ctx: Ctx, what: str, call) -> dict:
    """``{"out": float32 numpy}`` of the xla backend's ``call()``, or ``{"error": ...}``."""
    try:
        return {"out": np.asarray(jax.block_until_ready(call()), np.float32)}
    except Exception as e:
        ctx.log(f"{what}: xla reference failed: {err_line(e)}")
        return {"error": err_line(e)}


# ---------------------------------------------------------------------------------------------
# Decode


def bench_decode(ctx: Ctx, shape: S.DecodeShape) -> None:
    api = jpa()
    group, dt = "decode", shape.dtype
    H, D = shape.num_heads, shape.head_dim
    scale = 1.0 / math.sqrt(D)
    work = {"bytes": shape.kv_bytes, "flops": shape.flops}
    nsets = timing.num_sets(shape.kv_bytes)
    ctx.log(
        f"decode {shape.name}: building {nsets} input set(s), "
        f"{shape.kv_bytes / 2**20:.1f} MiB of K+V each"
    )
    sets = []
    for i in range(nsets):
        p = paged_cache(100 + i, shape.context_lens, shape.num_kv_heads, D, shape.block_size, dt)
        q = jax.random.normal(jax.random.key(200 + i), (shape.num_seqs, H, D), jnp.dtype(dt))
        sets.append((q, p))
    api_sets = [(q, p.cache, p.block_tables, p.context_lens) for q, p in sets]

    fns = {
        b: jax.jit(functools.partial(api.paged_decode, **api_kw(ctx, b)))
        for b in set(ctx.args.backends) | {"xla"}
    }
    ref = _xla_reference(ctx, f"decode {shape.name}", functools.partial(fns["xla"], *api_sets[0]))
    check = reference_check(ref, dt)

    peer = NAMED_PEER["decode"]
    for b in ctx.args.backends:
        row = new_row(group, shape, b, "ours", "TB/s", peer=peer, work=work, config=api_kw(ctx, b))
        run_row(ctx, row, fns[b], api_sets, check=None if b == "xla" else check, work_key="bytes")
    if ctx.args.no_peers:
        return

    # The hand-written XLA gather + softmax over the same paged cache.
    row = new_row(group, shape, "xla_gather_softmax", "peer", "TB/s", peer=peer, work=work)
    naive = jax.jit(functools.partial(peers.naive_paged_decode, scale=scale))
    naive_sets = [(q, p.cache.k, p.cache.v, p.block_tables, p.context_lens) for q, p in sets]
    run_row(ctx, row, naive, naive_sets, check=check, work_key="bytes")

    row = new_row(group, shape, "pallas_paged_attention", "peer", "TB/s", peer=peer, work=work)
    peers.pallas_paged_attention_row(ctx, row, sets, scale=scale, check=check)

    # Contiguous-KV peers: K, V as [S, L, Hkv, D], q as [S, 1, H, D].
    def contig(p):
        ks, vs = zip(*(contiguous_kv(p, i) for i in range(shape.num_seqs)))
        return jnp.stack(ks), jnp.stack(vs)

    csets = [(q[:, None],) + contig(p) for q, p in sets]

    def check4(out):
        return check(np.asarray(out, np.float32)[:, 0])

    for impl in ("cudnn", "xla_dpa"):
        config = {"layout": "contiguous [S, L, Hkv, D]"}
        row = new_row(group, shape, impl, "peer", "TB/s", peer=peer, work=work, config=config)
        peers.dpa_row(ctx, row, impl, csets, check=check4, work_key="bytes")

    config = {"layout": "contiguous [S, Hkv, L, D]"}
    row = new_row(group, shape, "torch_sdpa", "peer", "TB/s", peer=peer, work=work, config=config)
    peers.torch_sdpa_row(
        ctx,
        row,
        csets,
        causal=False,
        check=lambda o: check(peers.torch_np(o)[:, :, 0]),
        work_key="bytes",
    )
    del csets, sets, api_sets


# ---------------------------------------------------------------------------------------------
# Prefill / mixed (paged_attention)


def check_windows(shape: S.AttentionShape, m: int):
    """Row windows checked per sequence: ``(seq, j0, j1)``, head and tail of each chunk."""
    out = []
    for i, (_, n) in enumerate(shape.seqs):
        if n <= 2 * m:
            out.append((i, 0, n))
        else:
            out += [(i, 0, m), (i, n - m, n)]
    return out


def _window_reference(ctx, shape, group, fns, api_sets, sets, cu):
    """The xla backend's output on the checked rows, and those rows' indices in the output."""
    api = jpa()
    q0, p0, _ = sets[0]
    wins = check_windows(shape, CHECK_WINDOW)
    idx = np.concatenate([cu[i] + np.arange(j0, j1) for i, j0, j1 in wins])
    T = shape.num_tokens

    def call():
        if len(idx) == T and np.array_equal(idx, np.arange(T)):
            return fns["xla"](*api_sets[0])
        sub_cu = np.concatenate([[0], np.cumsum([j1 - j0 for _, j0, j1 in wins])])
        sub_meta = api.AttentionMetadata(
            jnp.asarray(p0.bt_np[[i for i, _, _ in wins]]),
            jnp.asarray(np.array([shape.seqs[i][0] + j1 for i, _, j1 in wins], np.int32)),
            jnp.asarray(sub_cu.astype(np.int32)),
        )
        xla = jax.jit(functools.partial(api.paged_attention, backend="xla"))
        return xla(q0[jnp.asarray(idx)], p0.cache, sub_meta)

    return _xla_reference(ctx, f"{group} {shape.name}", call), idx


def bench_attention(ctx: Ctx, shape: S.AttentionShape, group: str) -> None:
    api = jpa()
    dt = shape.dtype
    H, Hkv, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    scale = 1.0 / math.sqrt(D)
    work = {"flops": shape.flops, "bytes": shape.kv_bytes}
    T = shape.num_tokens
    nsets = timing.num_sets(shape.kv_bytes + 2 * T * H * D * S.itemsize(dt))
    ctx.log(
        f"{group} {shape.name}: {len(shape.seqs)} seq(s), {T} query tokens, "
        f"{shape.flops / 1e12:.4g} TFLOP, {nsets} input set(s)"
    )
    cu = np.concatenate([[0], np.cumsum([n for _, n in shape.seqs])]).astype(np.int32)
    sets = []
    for i in range(nsets):
        p = paged_cache(300 + i, shape.context_lens, Hkv, D, shape.block_size, dt)
        q = jax.random.normal(jax.random.key(400 + i), (T, H, D), jnp.dtype(dt))
        meta = api.AttentionMetadata(p.block_tables, p.context_lens, jnp.asarray(cu))
        sets.append((q, p, meta))
    api_sets = [(q, p.cache, meta) for q, p, meta in sets]
    fns = {
        b: jax.jit(functools.partial(api.paged_attention, **api_kw(ctx, b)))
        for b in set(ctx.args.backends) | {"xla"}
    }
    ref, idx = _window_reference(ctx, shape, group, fns, api_sets, sets, cu)
    ref_check = reference_check(ref, dt)

    def check(out_np_rows):
        return dict(ref_check(out_np_rows), rows_checked=int(len(idx)))

    def check_ours(out):
        return check(np.asarray(out, np.float32)[idx])

    peer = NAMED_PEER["mixed"] if not shape.is_prefill else NAMED_PEER[group]
    for b in ctx.args.backends:
        config = api_kw(ctx, b)
        row = new_row(group, shape, b, "ours", "TFLOP/s", peer=peer, work=work, config=config)
        chk = None if b == "xla" else check_ours
        run_row(ctx, row, fns[b], api_sets, work_key="flops", check=chk)
    if ctx.args.no_peers:
        return
    if not shape.is_prefill:
        ctx.log(
            f"{group} {shape.name}: no contiguous peer computes this mask (bottom-right "
            f"causal, q shorter than kv); peers skipped"
        )
        return
    _prefill_peers(ctx, shape, group, sets, check, work, peer, scale, idx)
    del sets, api_sets


def _prefill_peers(ctx, shape, group, sets, check, work, peer, scale, idx):
    """The contiguous-KV peers of one causal prompt (``[1, L, H|Hkv, D]``)."""
    H, D, L = shape.num_heads, shape.head_dim, shape.seq_len
    csets = []
    for q, p, _ in sets:
        k, v = contiguous_kv(p, 0)
        csets.append((q[None], k[None], v[None]))  # [1, L, H|Hkv, D]

    def check4(out):
        return check(np.asarray(out, np.float32).reshape(L, H, D)[idx])

    for impl in ("cudnn", "xla_dpa"):
        config = {"layout": "contiguous [1, L, H, D]", "is_causal": True}
        row = new_row(group, shape, impl, "peer", "TFLOP/s", peer=peer, work=work, config=config)
        if impl == "xla_dpa" and group == "sweep" and L > 8192 and not ctx.args.quick:
            why = (
                f"O(L^2) logits ({H * L * L * 4 / 2**30:.0f} GiB f32) and ~44 "
                "TFLOP/s at 8k: seconds per call, not measured past 8k"
            )
            skip(ctx, row, why)
            continue
        peers.dpa_row(ctx, row, impl, csets, check=check4, work_key="flops", causal=True)

    config = {"layout": "contiguous, KV repeated to H heads"}
    row = new_row(
        group, shape, "pallas_triton_mha", "peer", "TFLOP/s", peer=peer, work=work, config=config
    )
    peers.triton_mha_row(ctx, row, csets, scale=scale, check=check4)

    config = {"layout": "contiguous [1, L, H, D]", "q": "pre-scaled", "dtype": "float16"}
    row = new_row(
        group, shape, "pallas_mosaic_fa3", "peer", "TFLOP/s", peer=peer, work=work, config=config
    )
    peers.mosaic_fa3_row(ctx, row, csets, scale=scale, check=check4)

    config = {"layout": "contiguous [1, H, L, D]", "is_causal": True}
    row = new_row(
        group, shape, "torch_sdpa", "peer", "TFLOP/s", peer=peer, work=work, config=config
    )
    peers.torch_sdpa_row(
        ctx,
        row,
        csets,
        causal=True,
        check=lambda o: check(peers.torch_np(o)[0].transpose(1, 0, 2)[idx]),
        work_key="flops",
    )
    del csets
