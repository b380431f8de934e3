"""Timing probe (GPU): back-to-back jitted calls from Python against the same calls chained
inside one jit, against torch with CUDA events, for the bandwidth-bound rows.

Question: is the time between two calls (JAX dispatch of one executable per call) part of what
the harness's wall-clock loop measures? ``loop``: a sample is ``reps`` back-to-back calls then
``block_until_ready`` (``benchmarks.timing``). ``chain``: one jit holding N calls, each feeding its
output to the next as input (no dead code, no host between them; an ``optimization_barrier``
keeps XLA ops apart), time / N. torch: the same ``loop`` and CUDA events around N calls.
  python3 scripts/timing_probe.py
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from probe_common import CPU

from benchmarks import timing
from jax_paged_attn.testing import random_paged_kv

N = 2 if CPU else 8
ITERS = 3 if CPU else 20


def loop_time(f, *a):
    return timing.time_fn(f, *a, iters=ITERS)[0]


def chain_time(step, x, *rest):
    """step(x, *rest) -> same shape/dtype as x; N steps in one jit."""

    def chained(x, *rest):
        for _ in range(N):
            x = jax.lax.optimization_barrier(step(x, *rest))
        return x

    g = jax.jit(chained)
    return loop_time(g, x, *rest) / N


def report(name, nbytes, f, step, x, *rest):
    tl = loop_time(jax.jit(f), x, *rest)
    tc = chain_time(step, x, *rest)
    print(
        f"{name:34s} loop {tl * 1e6:8.1f} us {nbytes / tl / 1e12:.3f} TB/s | chain "
        f"{tc * 1e6:8.1f} us {nbytes / tc / 1e12:.3f} TB/s | loop/chain {tl / tc:.3f}",
        flush=True,
    )


def torch_rows():
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return

    def both(name, nbytes, fn, *a):
        tl = timing.time_torch(torch, fn, *a, iters=ITERS)
        te = timing.time_torch(torch, fn, *a, iters=ITERS, events=True)
        print(
            f"{name:34s} loop {tl * 1e6:8.1f} us {nbytes / tl / 1e12:.3f} TB/s | events "
            f"{te * 1e6:8.1f} us {nbytes / te / 1e12:.3f} TB/s | loop/events {tl / te:.3f}",
            flush=True,
        )

    n = 1 << 29
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    both("torch copy 1 GiB", 4 * n, lambda s, d: d.copy_(s), src, torch.empty_like(src))
    del src
    S, H, HKV, D, CTX = 64, 32, 8, 128, 4096
    q = torch.randn(S, H, 1, D, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(S, HKV, CTX, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    both(
        "torch SDPA decode 64x4096",
        4 * S * CTX * HKV * D,
        lambda q, k, v: sdpa(q, k, v, enable_gqa=True),
        q,
        k,
        v,
    )


def main():
    from pallas_kernels.paged_attention import mosaic_decode
    from pallas_kernels.paged_attention import triton as pa

    x = jnp.ones((1 << (20 if CPU else 28),), jnp.float32)
    report("xla x*1.5 (1 GiB)", 2 * x.nbytes, lambda x: x * 1.5, lambda x: x * 1.5, x)
    del x
    S, H, HKV, D, CTX, BS = (2, 8, 2, 64, 128, 16) if CPU else (64, 32, 8, 128, 4096, 16)
    cache, bt, lens = random_paged_kv(
        jax.random.key(0), [CTX] * S, num_kv_heads=HKV, head_dim=D, block_size=BS
    )
    k, v = cache.k, cache.v
    q = jax.random.normal(jax.random.key(7), (S, H, D), jnp.bfloat16)
    kw = dict(
        scale=D**-0.5,
        softcap=None,
        sliding_window=None,
        alibi_slopes=None,
        sinks=None,
        k_scale=None,
        v_scale=None,
        interpret=CPU,
    )
    nbytes = 4 * S * CTX * HKV * D
    for name, mod in (("triton", pa), ("mosaic", mosaic_decode)):
        step = lambda q, k, v, bt, lens, mod=mod: mod.paged_decode(q, k, v, bt, lens, **kw)
        report(f"{name} decode {S}x{CTX}", nbytes, step, step, q, k, v, bt, lens)
    del cache, k, v
    if not CPU:
        from benchmarks import moe_kernels as bench
        from pallas_kernels.moe import triton as moe

        x, wgu, wd, w, ids = bench.case(bench.SHAPES["decode"])
        step = lambda x, wgu, wd, w, ids: moe.fused_moe(x, wgu, wd, w, ids, activation="silu")
        touched = int(jnp.unique(ids).size) * (wgu.nbytes + wd.nbytes) // wgu.shape[0]
        report("triton MoE decode (64 tokens)", touched, step, step, x, wgu, wd, w, ids)
        del x, wgu, wd
    torch_rows()


main()
