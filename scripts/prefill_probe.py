"""Prefill probe (GPU): Mosaic chunked-prefill variants against cuDNN, in one process.

Shapes (the benchmarks'): one causal prompt of 8192 tokens, and a mixed batch 4 x (2048 cached + 2048
new); 32 query / 8 KV heads, head dim 128, bf16, block 16, permuted block tables. Rows: cuDNN
through ``jax.nn.dot_product_attention`` on contiguous KV (prompt only: cuDNN aligns the causal
mask top-left, so it has no mixed-batch twin), Mosaic with its defaults (one item per CTA, the
hardware schedules the grid), optionally with one persistent CTA per SM (``--persistent``) and an
earlier copy of mosaic.py (``--base FILE``, e.g. from ``git show HEAD:pallas_kernels/...``),
each in ``--rounds`` rounds (A B ... A B; default 2; the summary is the median).
``--kernels`` lists where each Mosaic call's time goes (a profile).
Timing: GPU busy time per call (``benchmarks.timing.time_fn``; wall-clock on the CPU).
  python3 scripts/prefill_probe.py [--budget-s 300] [--lengths 8192,1024] [--base FILE]
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import probe_common
from probe_common import CPU

import jax_paged_attn as jpa
from benchmarks import timing
from jax_paged_attn.testing import random_paged_kv
from pallas_kernels.paged_attention import mosaic

ap = argparse.ArgumentParser()
ap.add_argument("--budget-s", type=float, default=300.0)
ap.add_argument("--iters", type=int, default=3 if CPU else 20)
ap.add_argument("--rounds", type=int, default=2, help="A B ... rounds (the median is shown)")
ap.add_argument("--lengths", default="8192", help="prompt lengths (one sequence each)")
ap.add_argument("--no-mixed", action="store_true", help="skip the mixed 4 x (2k + 2k) batch")
ap.add_argument("--persistent", action="store_true", help="also one persistent CTA per SM")
ap.add_argument("--base", help="an earlier mosaic.py to time beside the current one")
ap.add_argument("--kernels", action="store_true", help="profile: time per kernel per call")
ap.add_argument(
    "--pages",
    default="",
    help="also these KV block sizes (tokens per page), e.g. 64,128 (the main rows use 16)",
)
ap.add_argument(
    "--fa3",
    action="store_true",
    help="also JAX's attention_mgpu (FA3, contiguous float16 KV; prompts only)",
)
ap.add_argument(
    "--blocks",
    default="",
    help="also these block sizes, e.g. 128x3x2,64x4x2 (block_kv x stages x warpgroups), "
    "optionally x the softmax form (128x2x2xraw)",
)
args = ap.parse_args()
T0 = time.perf_counter()


def load_base(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mosaic_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mosaic_base"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


BASE = load_base(args.base) if args.base else None


def timed(f, *a):
    return timing.time_fn(f, *a, iters=args.iters, device=not CPU)


def paged(batch, total, Hkv, D, bs, k=None, v=None):
    """Pages ``[NB, Hkv, bs, D]`` of ``batch`` sequences of ``total`` tokens in a random
    permutation, and the block table. Random K/V, or the contiguous ``k``, ``v``
    ``[batch, total, Hkv, D]`` written into that layout."""
    cache, tables, _ = random_paged_kv(
        jax.random.key(0), [total] * batch, num_kv_heads=Hkv, head_dim=D, block_size=bs
    )
    if k is not None:
        pos = jnp.arange(total)
        slots = (tables[:, pos // bs] * bs + pos % bs).reshape(-1)
        flat = lambda x: x.reshape(batch * total, Hkv, D)
        cache = jpa.write_kv(cache, flat(k), flat(v), slots, backend="xla")
    return cache.k, cache.v, tables


def contiguous(pages, tables, total):
    """``[batch, total, Hkv, D]`` gathered from ``pages`` by ``tables``."""
    batch, _ = tables.shape
    _, hkv, bs, d = pages.shape
    x = pages[tables].transpose(0, 1, 3, 2, 4)  # [batch, MB, BS, Hkv, D]
    return x.reshape(batch, -1, hkv, d)[:, :total]


def run_shape(name, batch, cached, new, H=32, Hkv=8, D=128, BS=16):
    total = cached + new
    k_pages, v_pages, tables = paged(batch, total, Hkv, D, BS)
    k, v = contiguous(k_pages, tables, total), contiguous(v_pages, tables, total)
    q = jax.random.normal(jax.random.key(1), (batch * new, H, D), jnp.bfloat16)
    lens = jnp.full((batch,), total, jnp.int32)
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * new
    flops = 4 * batch * sum(cached + j + 1 for j in range(new)) * D * H

    def mosaic_row(num_ctas=None, module=mosaic, block_sizes=None, tables=tables):
        return jax.jit(
            lambda q, kp, vp: module.paged_attention(
                q,
                kp,
                vp,
                tables,
                lens,
                cu,
                scale=D**-0.5,
                interpret=CPU,
                num_ctas=num_ctas,
                block_sizes=block_sizes,
            )
        )

    rows = [("mosaic (defaults: one item per CTA)", mosaic_row(), (q, k_pages, v_pages))]
    for bs in map(int, filter(None, args.pages.split(","))):
        kp, vp, bt = paged(batch, total, Hkv, D, bs, k, v)
        rows.append((f"mosaic, page {bs}", mosaic_row(tables=bt), (q, kp, vp)))
    if args.fa3 and cached == 0 and batch == 1 and not CPU:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

        cfg = fa3.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        f16 = lambda x: x.astype(jnp.float16)
        rows.append(
            (
                "Pallas FA3 (attention_mgpu), contiguous f16",
                jax.jit(lambda q, k, v: fa3.attention(q[None], k, v, cfg)[0]),
                (f16(q * D**-0.5), f16(k), f16(v)),
            )
        )
    for spec in filter(None, args.blocks.split(",")):
        sizes, softmax = spec.split("x")[:3], spec.split("x")[3:]  # e.g. 128x2x2xraw
        bs = mosaic.BlockSizes(*map(int, sizes), *softmax)
        rows.append((f"mosaic {spec}", mosaic_row(block_sizes=bs), (q, k_pages, v_pages)))
    if BASE is not None:
        rows.append(
            (
                f"mosaic from {os.path.basename(args.base)}",
                mosaic_row(module=BASE),
                (q, k_pages, v_pages),
            )
        )
    if args.persistent:
        n = mosaic.num_sms()
        rows.append((f"mosaic, {n} persistent CTAs", mosaic_row(n), (q, k_pages, v_pages)))
    if args.kernels and not CPU:
        for label, f, a in rows:
            print(f"{name} kernels of '{label}' (us per call, launches per call):", flush=True)
            for us, n, kernel in timing.kernel_breakdown(f, *a)[:8]:
                print(f"  {us:9.1f} {n:4.1f}  {kernel[:90]}", flush=True)
    if cached == 0 and not CPU:
        cudnn = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q.reshape(batch, new, H, D), k, v, is_causal=True, implementation="cudnn"
            ).reshape(batch * new, H, D)
        )
        rows.insert(0, ("cuDNN, contiguous KV", cudnn, (q, k, v)))
    probe_common.ab_rounds(
        name,
        [(label, 0, functools.partial(timed, f, *a)) for label, f, a in rows],
        lambda t: f"{flops / t / 1e12:6.1f} TFLOP/s",
        deadline=T0 + args.budget_s,
        width=36,
        rounds=args.rounds,
    )


if CPU:  # smoke run under the interpreter (times mean nothing)
    run_shape("tiny", 1, 0, 128, H=4, Hkv=2, D=64)
    run_shape("tiny mixed", 2, 32, 32, H=4, Hkv=2, D=64)
else:
    for n in map(int, args.lengths.split(",")):
        run_shape(f"prefill {n}", 1, 0, n)
    if not args.no_mixed:
        run_shape("mixed 4x(2k+2k)", 4, 2048, 2048)
