"""Nsight Compute profile of the bandwidth-bound kernels against a plain copy (GPU with ncu).

  python3 scripts/ncu_probe.py                 # profiles every case below, prints one table
  python3 scripts/ncu_probe.py --case triton   # (what ncu runs) one case, profiled region only

Each case builds its inputs, compiles and warms up outside the profiled region, then runs once
between cudaProfilerStart/Stop, so ncu (``--profile-from-start off``) sees only that call's
kernels. Clocks are left alone (``--clock-control none``). Cases: torch copy of 1 GiB, torch SDPA
decode on contiguous KV, the Triton and Mosaic paged decode (64 x 4096, permuted pages, as the
benchmarks), the Triton fused MoE at the decode shape, and the Triton chunked prefill (8192
tokens, causal).
"""

import argparse
import csv
import io
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ("copy", "sdpa", "triton", "mosaic", "moe", "prefill")
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
SHOW = (
    "Duration",
    "DRAM Throughput",
    "Memory Throughput",
    "L2 Hit Rate",
    "Mem Busy",
    "Max Bandwidth",
    "Achieved Occupancy",
    "Theoretical Occupancy",
    "Registers Per Thread",
    "Dynamic Shared Memory Per Block",
    "Waves Per SM",
    "Grid Size",
    "Block Size",
    "Warp Cycles Per Issued Instruction",
    "Compute (SM) Throughput",
    "Block Limit Shared Mem",
    "Block Limit Registers",
)


def profiled(fn):
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def run_case(case):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import torch

    from jax_paged_attn.testing import random_paged_kv

    S, H, HKV, D, CTX, BS = 64, 32, 8, 128, 4096, 16

    def paged(num_seqs, ctx):
        cache, tables, lens = random_paged_kv(
            jax.random.key(0), [ctx] * num_seqs, num_kv_heads=HKV, head_dim=D, block_size=BS
        )
        return cache.k, cache.v, tables, lens

    if case == "copy":
        src = torch.randn(1 << 29, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        return profiled(lambda: dst.copy_(src))
    if case == "sdpa":
        q = torch.randn(S, H, 1, D, dtype=torch.bfloat16, device="cuda")
        k, v = (torch.randn(S, HKV, CTX, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        f = torch.nn.functional.scaled_dot_product_attention
        return profiled(lambda: f(q, k, v, enable_gqa=True))
    if case in ("triton", "mosaic"):
        from pallas_kernels.paged_attention import mosaic_decode
        from pallas_kernels.paged_attention import triton as pa

        k, v, bt, lens = paged(S, CTX)
        q = jax.random.normal(jax.random.key(7), (S, H, D), jnp.bfloat16)
        kw = dict(
            scale=D**-0.5,
            softcap=None,
            sliding_window=None,
            alibi_slopes=None,
            sinks=None,
            k_scale=None,
            v_scale=None,
        )
        mod = pa if case == "triton" else mosaic_decode
        f = jax.jit(lambda q, k, v, bt, lens: mod.paged_decode(q, k, v, bt, lens, **kw))
        return profiled(lambda: jax.block_until_ready(f(q, k, v, bt, lens)))
    if case == "prefill":  # Triton chunked prefill, one sequence of 8192 tokens, causal
        from pallas_kernels.paged_attention import triton as pa

        n = 8192
        k, v, bt, lens = paged(1, n)
        q = jax.random.normal(jax.random.key(7), (n, H, D), jnp.bfloat16)
        cu = jnp.array([0, n], jnp.int32)
        kw = dict(
            scale=D**-0.5,
            softcap=None,
            sliding_window=None,
            alibi_slopes=None,
            sinks=None,
            k_scale=None,
            v_scale=None,
        )
        f = jax.jit(lambda *a: pa.paged_attention(*a, **kw))
        return profiled(lambda: jax.block_until_ready(f(q, k, v, bt, lens, cu)))
    if case == "moe":
        from benchmarks import moe_kernels as bench
        from pallas_kernels.moe import triton

        x, wgu, wd, w, ids = bench.case(bench.SHAPES["decode"])
        f = jax.jit(lambda *a: triton.fused_moe(*a, activation="silu"))
        return profiled(lambda: jax.block_until_ready(f(x, wgu, wd, w, ids)))
    raise SystemExit(f"unknown case {case}")


def profile_all(cases):
    for case in cases:
        cmd = [
            "ncu",
            "--profile-from-start",
            "off",
            "--clock-control",
            "none",
            "--csv",
            "--page",
            "details",
            *[a for s in SECTIONS for a in ("--section", s)],
            sys.executable,
            os.path.abspath(__file__),
            "--case",
            case,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        body = res.stdout[res.stdout.find('"ID"') :] if '"ID"' in res.stdout else ""
        if res.returncode or not body:
            print(
                f"== {case}: ncu failed (rc {res.returncode})\n{res.stdout[-1500:]}\n"
                f"{res.stderr[-1500:]}",
                flush=True,
            )
            continue
        kernels = {}
        for row in csv.DictReader(io.StringIO(body)):
            key = (row["ID"], row["Kernel Name"][:60])
            if row["Metric Name"] in SHOW:
                kernels.setdefault(key, {})[row["Metric Name"]] = (
                    f"{row['Metric Value']} {row['Metric Unit']}".strip()
                )
        print(f"== {case}: {len(kernels)} kernels", flush=True)
        for (kid, name), metrics in kernels.items():
            print(f"  [{kid}] {name}", flush=True)
            for m in SHOW:
                if m in metrics:
                    print(f"      {m:36s} {metrics[m]}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None, choices=CASES)
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    if a.case:
        run_case(a.case)
    else:
        profile_all(a.cases.split(","))
