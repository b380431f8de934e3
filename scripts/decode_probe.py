"""Decode probe (GPU): Triton against Mosaic decode variants, in one process.

Rows: kernel x block sizes x splits x persistent CTAs on the benchmark decode shapes; block
tables are a random permutation of the pages (as the benchmarks) or the identity (each
sequence's pages in order; ``--identity``) to separate the DRAM cost of scattered 4 KB pages
from the kernels' own. Ceilings in the same process: torch copy, XLA read-only sum, and torch
gathers of rows of 4 KB (one page of one KV head) and 32 KB (one page of all KV heads) in
permuted order. Rows are timed in an A B ... A B order (``--rounds``, default 2; the summary
is the median) so drift shows.
Timing (``--timing``, ``benchmarks.timing.time_fn``): ``device`` (default on a GPU) is the GPU
busy time per call from a profiler trace of 20 back-to-back calls, as the benchmarks; ``wall`` is
the median of 20 samples of >= 3 ms of back-to-back calls. Every row's output is
compared with the first row of its shape with the same block table (relative L2).
``--only`` also takes SxCTX shapes (e.g. 8x65536: Triton and Mosaic's defaults only), and
``--page`` sets the KV block size (tokens per page; the benchmark shapes use 16).
  python3 scripts/decode_probe.py [--only 4096,32768,8x65536] [--page 16] [--budget-s 300]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import probe_common
from probe_common import CPU

from benchmarks import timing
from jax_paged_attn.testing import random_paged_kv
from pallas_kernels.paged_attention import mosaic, mosaic_decode
from pallas_kernels.paged_attention import triton as pa

ap = argparse.ArgumentParser()
ap.add_argument("--budget-s", type=float, default=300.0)
ap.add_argument("--only", default="4096,32768")
ap.add_argument("--iters", type=int, default=3 if CPU else 20)
ap.add_argument("--timing", choices=("device", "wall"), default="wall" if CPU else "device")
ap.add_argument("--identity", action="store_true", help="also rows with identity tables")
ap.add_argument("--page", type=int, default=16, help="KV block size (tokens per page)")
ap.add_argument("--rounds", type=int, default=2, help="A B ... rounds (the median is shown)")
args = ap.parse_args()
T0 = time.perf_counter()
KW = dict(
    softcap=None, sliding_window=None, alibi_slopes=None, sinks=None, k_scale=None, v_scale=None
)


def median_time(f, *a):
    return timing.time_fn(f, *a, iters=args.iters, device=args.timing == "device")


def ceilings(page_bytes=4096, heads=8):
    line = []
    y = jnp.ones((1 << (20 if CPU else 29),), jnp.bfloat16)  # 1 GiB, read only
    t, _ = median_time(jax.jit(lambda y: jnp.sum(y, dtype=jnp.float32)), y)
    line.append(f"xla sum (read only) {y.nbytes / t / 1e12:.3f}")
    del y
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():

        def tb_s(nbytes, fn, *a):
            return nbytes / timing.time_torch(torch, fn, *a, iters=20) / 1e12

        n = 1 << 29  # 1 GiB of bf16
        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        line.append(
            f"torch copy {tb_s(4 * n, lambda s, d: d.copy_(s), src, torch.empty_like(src)):.3f}"
        )
        for row in (page_bytes, page_bytes * heads):
            rows = src.view(-1, row // 2)
            idx = torch.randperm(rows.shape[0], device="cuda")
            gather = tb_s(
                4 * n,
                lambda r, i, o: torch.index_select(r, 0, i, out=o),
                rows,
                idx,
                torch.empty_like(rows),
            )
            line.append(f"torch gather of {row // 1024} KB rows (permuted) {gather:.3f}")
        del src
    print("ceilings, TB/s: " + "; ".join(line), flush=True)


def triton_row(block_sizes=None):
    def call(q, k, v, bt, L):
        return pa.paged_decode(
            q, k, v, bt, L, scale=q.shape[-1] ** -0.5, interpret=CPU, block_sizes=block_sizes, **KW
        )

    return call


def mosaic_row(bk=None, stages=None, stream=None, num_ctas=None):
    bs = None if bk is None else mosaic.BlockSizes(bk, stages, 1)

    def call(q, k, v, bt, L):
        return mosaic_decode.paged_decode(
            q,
            k,
            v,
            bt,
            L,
            scale=q.shape[-1] ** -0.5,
            interpret=CPU,
            block_sizes=bs,
            stream=stream,
            num_ctas=num_ctas,
            **KW,
        )

    return call


def paged_kv(S, ctx, Hkv, D, BS, identity):
    """K/V pages and block table of S contexts of ctx tokens: pages in a random permutation, or
    in order (``identity``)."""
    cache, tables, _ = random_paged_kv(
        jax.random.key(0),
        [ctx] * S,
        num_kv_heads=Hkv,
        head_dim=D,
        block_size=BS,
        permute=not identity,
    )
    return cache.k, cache.v, tables


def run_shape(name, S, ctx, rows, H=32, Hkv=8, D=128, BS=None):
    """rows: [(label, call, identity_table)]; each row runs --rounds times (A B ... A B)."""
    BS = BS or args.page
    name = name if BS == 16 else f"{name} (page {BS})"
    q = jax.random.normal(jax.random.key(7), (S, H, D), jnp.bfloat16)
    L = jnp.full((S,), ctx, jnp.int32)
    caches = {ident: paged_kv(S, ctx, Hkv, D, BS, ident) for ident in {r[2] for r in rows}}
    nbytes = 4 * S * ctx * Hkv * D

    def row(label, call, ident):
        k, v, bt = caches[ident]
        label = f"{label} ({'identity' if ident else 'permuted'})"
        return label, ident, lambda: median_time(jax.jit(call), q, k, v, bt, L)

    probe_common.ab_rounds(
        name,
        [row(*r) for r in rows],
        lambda t: f"{nbytes / t / 1e12:.3f} TB/s",
        deadline=T0 + args.budget_s,
        width=54,
        rounds=args.rounds,
    )


ceilings()
only = set(args.only.split(","))
if CPU:  # smoke run under the interpreters (times mean nothing)
    run_shape(
        "tiny",
        2,
        128,
        [
            ("triton", triton_row(), False),
            ("triton", triton_row(), True),
            ("mosaic", mosaic_row(), False),
            ("mosaic 64x2, 3 CTAs", mosaic_row(64, 2, num_ctas=3), True),
            ("mosaic stream-K, 5 CTAs", mosaic_row(64, 2, True, 5), False),
        ],
        H=8,
        Hkv=2,
        D=64,
    )
    raise SystemExit


def with_identity(rows):
    return rows + [(label, call, True) for label, call, _ in rows[:2]] if args.identity else rows


if "4096" in only:  # 512 (seq, KV head) pairs of 64 tiles (64 keys)
    run_shape(
        "decode 64x4096",
        64,
        4096,
        with_identity(
            [
                ("triton", triton_row(), False),
                ("mosaic (defaults: 64x3, whole pairs)", mosaic_row(), False),
                ("mosaic 64x3, one pair per CTA (512)", mosaic_row(64, 3, False, 512), False),
                ("mosaic 64x3, stream-K", mosaic_row(64, 3, True), False),
            ]
        ),
    )
if "32768" in only:  # 64 (seq, KV head) pairs
    run_shape(
        "decode 8x32768",
        8,
        32768,
        with_identity(
            [
                ("triton", triton_row(), False),
                ("mosaic (defaults: 64x3, stream-K, 128 CTAs)", mosaic_row(), False),
                ("mosaic 128x2, stream-K, 128 CTAs", mosaic_row(128, 2, True), False),
                (
                    f"mosaic 64x3, stream-K on all {mosaic.num_sms()} SMs",
                    mosaic_row(64, 3, True, mosaic.num_sms()),
                    False,
                ),
            ]
        ),
    )
for shape in (x for x in only if "x" in x):  # SxCTX: the defaults against Triton
    S, ctx = map(int, shape.split("x"))
    run_shape(
        f"decode {shape}",
        S,
        ctx,
        with_identity(
            [
                ("triton", triton_row(), False),
                ("mosaic (defaults)", mosaic_row(), False),
                (
                    "mosaic, stream-K on all SMs",
                    mosaic_row(stream=True, num_ctas=mosaic.num_sms()),
                    False,
                ),
            ]
        ),
    )
