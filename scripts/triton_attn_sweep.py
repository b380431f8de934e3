"""Sweep of the Triton paged-attention kernels on the benchmark shapes (GPU; tiny smoke run on CPU).

Each row: a set of code-shape variants x tiles, as one ``BlockSizes`` (tuning.py: the static
fields ``decode_prefetch``, ``prefill_prefetch``, ``decode_fold``, ``prefill_fold``,
``heads_inner`` beside block_m / block_k / warps / stages / splits; each is its own compiled
kernel), or ``default`` (the tuning table's entry). Timing: ``benchmarks.timing.time_fn``
(warm-up, then >= 20 samples, each ``reps`` back-to-back calls lasting >= 3 ms, so host dispatch
overlaps the device, then block_until_ready; the median sample / reps; ``--timing device``: the
GPU busy time per call). Every row's output is compared with the first row of its shape
(relative L2 error printed: a wrong variant shows). Copy ceilings (torch copy, XLA x * 1.5) are
measured in the same process.
  python3 scripts/triton_attn_sweep.py [--budget-s 200] [--only decode,long,prefill,more]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from probe_common import CPU

from benchmarks import timing
from jax_paged_attn.testing import random_paged_kv, rel_error
from pallas_kernels.paged_attention import triton as pa
from pallas_kernels.paged_attention.tuning import BlockSizes as B

ap = argparse.ArgumentParser()
ap.add_argument("--budget-s", type=float, default=200.0)
ap.add_argument("--only", default="decode,prefill,long,more")
ap.add_argument("--iters", type=int, default=3 if CPU else 20)
ap.add_argument("--timing", choices=("device", "wall"), default="device")
args = ap.parse_args()
T0 = time.perf_counter()
KW = dict(
    softcap=None,
    sliding_window=None,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    interpret=CPU,
)


def median_time(f, *a):
    return timing.time_fn(f, *a, iters=args.iters, device=args.timing == "device")


def run_rows(name, rows, make, call, figure):
    """rows: [(label, BlockSizes | None)]; None: the tuning table's entry."""
    inputs = make()
    ref = None
    for label, b in rows:
        if time.perf_counter() - T0 > args.budget_s:
            print(f"{name} {label} {b}: skipped (budget)", flush=True)
            continue
        f = jax.jit(lambda *a, b=b: call(*a, b))
        try:
            t, out = median_time(f, *inputs)
        except Exception as e:  # noqa: BLE001 - a failing config is reported, the sweep goes on
            print(f"{name} {label} {b}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        ref = out if ref is None else ref
        print(
            f"{name} {label} {b}: {t * 1e6:8.1f} us {figure(t)} err {rel_error(out, ref):.1e}",
            flush=True,
        )


def paged(S, ctx, Hkv, D, BS):
    cache, tables, lens = random_paged_kv(
        jax.random.key(0), [ctx] * S, num_kv_heads=Hkv, head_dim=D, block_size=BS
    )
    return cache.k, cache.v, tables, lens


def decode_rows(name, S, ctx, rows, H=32, Hkv=8, D=128, BS=16):
    def make():
        k, v, bt, lens = paged(S, ctx, Hkv, D, BS)
        q = jax.random.normal(jax.random.key(7), (S, H, D), jnp.bfloat16)
        return q, k, v, bt, lens

    run_rows(
        name,
        rows,
        make,
        lambda q, k, v, bt, L, b: pa.paged_decode(
            q, k, v, bt, L, scale=D**-0.5, block_sizes=b, **KW
        ),
        lambda t: f"{4 * S * ctx * Hkv * D / t / 1e12:.3f} TB/s",
    )


def prefill_rows(name, S, n, ctx, rows, H=32, Hkv=8, D=128, BS=16):
    def make():
        k, v, bt, lens = paged(S, ctx, Hkv, D, BS)
        q = jax.random.normal(jax.random.key(7), (S * n, H, D), jnp.bfloat16)
        return q, k, v, bt, lens, jnp.arange(S + 1, dtype=jnp.int32) * n

    pairs = S * sum(min(ctx, ctx - n + j + 1) for j in range(n))
    run_rows(
        name,
        rows,
        make,
        lambda q, k, v, bt, L, cu, b: pa.paged_attention(
            q, k, v, bt, L, cu, scale=D**-0.5, block_sizes=b, **KW
        ),
        lambda t: f"{4 * pairs * D * H / t / 1e12:.1f} TFLOP/s",
    )


def ceilings():
    x = jnp.ones((1 << (20 if CPU else 28),), jnp.float32)
    t, _ = median_time(jax.jit(lambda x: x * 1.5), x)
    line = f"ceiling xla x*1.5: {2 * x.nbytes / t / 1e12:.3f} TB/s"
    y = jnp.ones((1 << (20 if CPU else 29),), jnp.bfloat16)  # read-only: 1 GiB reduced
    t, _ = median_time(jax.jit(lambda y: jnp.sum(y, dtype=jnp.float32)), y)
    line += f"  xla sum (read only): {y.nbytes / t / 1e12:.3f} TB/s"
    del y
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
            t = timing.time_torch(torch, lambda s, d: d.copy_(s), src, torch.empty_like(src))
            line += f"  torch copy: {2 * src.numel() * 4 / t / 1e12:.3f} TB/s"
            del src
    except ImportError:
        pass
    print(line, flush=True)


# Code-shape variants (BlockSizes fields; a row's fields not named here keep their defaults).
OFF = dict(
    decode_prefetch=False,
    prefill_prefetch=False,
    decode_fold=False,
    prefill_fold=False,
    heads_inner=False,
)  # the code before
PF = dict(OFF, decode_prefetch=True)
PFF = dict(PF, decode_fold=True)
F = dict(OFF, prefill_fold=True)
FH = dict(F, heads_inner=True)  # prefill default
FP = dict(F, prefill_prefetch=True)
FHP = dict(FH, prefill_prefetch=True)
only = set(args.only.split(","))
ceilings()

if CPU:  # smoke run: tiny shapes under the interpreter (times mean nothing)
    decode_rows(
        "decode",
        2,
        64,
        [("off", B(block_k=16, **OFF)), ("pf+fold", B(block_k=16, **PFF))],
        H=8,
        Hkv=2,
        D=64,
    )
    prefill_rows(
        "prefill",
        1,
        64,
        64,
        [
            ("off", B(block_m=32, block_k=16, **OFF)),
            ("fold+hi+pf", B(block_m=32, block_k=16, **FHP)),
        ],
        H=8,
        Hkv=2,
        D=64,
    )
    raise SystemExit


def d(bk, nw, ns, splits=None, **switches):
    return B(block_k=bk, num_warps=nw, num_stages=ns, num_splits=splits, **switches)


def p(bm, bk, nw, ns, **switches):
    return B(block_m=bm, block_k=bk, num_warps=nw, num_stages=ns, **switches)


if "decode" in only:
    decode_rows(
        "decode 64x4096",
        64,
        4096,
        [
            ("off", d(128, 8, 3, **OFF)),  # before: table entry, 2 programs / SM (98 regs)
            ("default", None),
            ("pf", d(128, 8, 3, **PF)),
            ("pf", d(32, 4, 3, **PF)),  # 38 KB, 64 regs: all 512 programs resident
            ("pf", d(32, 4, 4, **PF)),
            ("pf", d(32, 2, 3, **PF)),
            ("pf", d(64, 4, 2, **PF)),  # 39 KB, 80 regs: all resident, 1 buffer each
            ("pf", d(64, 4, 3, **PF)),
            ("pf", d(64, 4, 4, **PF)),
            ("off", d(64, 4, 3, **OFF)),  # 122 regs: 4 programs / SM, 1 buffer
            ("off", d(32, 4, 3, **OFF)),
            ("pf", d(64, 8, 2, **PF)),
            ("pf+fold", d(32, 4, 3, **PFF)),
            ("pf", d(16, 4, 4, **PF)),
            ("pf", d(32, 4, 5, **PF)),
            ("pf", d(32, 4, 3, 2, **PF)),
            ("off", d(128, 8, 3, **OFF)),  # noise check: the first row again
        ],
    )
if "prefill" in only:
    prefill_rows(
        "prefill 1x8192",
        1,
        8192,
        8192,
        [
            ("off", p(128, 128, 8, 3, **OFF)),  # before
            ("default", None),
            ("fold", p(128, 128, 8, 3, **F)),
            ("fold+hi", p(128, 128, 8, 3, **FH)),
            ("fold+pf", p(128, 128, 8, 3, **FP)),
            ("fold+hi+pf", p(128, 128, 8, 3, **FHP)),
            ("fold", p(128, 64, 4, 3, **F)),
            ("fold+hi", p(128, 64, 4, 3, **FH)),
            ("fold+hi", p(128, 64, 4, 2, **FH)),
            ("fold+hi", p(128, 64, 4, 4, **FH)),
            ("fold+hi", p(128, 32, 4, 3, **FH)),
            ("fold+hi", p(128, 64, 8, 3, **FH)),
            ("fold+hi", p(128, 128, 8, 2, **FH)),
            ("fold+hi", p(64, 64, 4, 3, **FH)),
            ("fold+hi", p(64, 128, 4, 3, **FH)),
            ("fold+hi", p(64, 32, 4, 3, **FH)),
            ("fold+hi+pf", p(128, 64, 4, 2, **FHP)),
            ("off", p(128, 128, 8, 3, **OFF)),  # noise check
        ],
    )
if "long" in only:
    decode_rows(
        "decode 8x32768",
        8,
        32768,
        [
            ("off", d(128, 8, 3, **OFF)),
            ("default", None),
            ("pf", d(128, 8, 3, **PF)),
            ("pf", d(32, 4, 3, **PF)),
            ("pf", d(64, 4, 2, **PF)),
            ("pf", d(64, 4, 4, **PF)),
        ],
    )
if "more" in only:
    prefill_rows(
        "prefill 1x16384",
        1,
        16384,
        16384,
        [
            ("off", p(128, 128, 8, 3, **OFF)),
            ("default", None),
            ("fold+hi", p(128, 128, 8, 3, **FH)),
        ],
    )
    prefill_rows(
        "mixed 4x(2048+2048)",
        4,
        2048,
        4096,
        [
            ("off", p(128, 128, 8, 3, **OFF)),
            ("default", None),
            ("fold+hi", p(128, 128, 8, 3, **FH)),
        ],
    )
print(f"sweep done in {time.perf_counter() - T0:.0f} s", flush=True)
