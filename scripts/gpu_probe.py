"""Probe of the GPU machine: versions, the two Pallas lowerings, and the copy/matmul ceilings.

  python3 scripts/gpu_probe.py

Timing: ``benchmarks.timing`` (GPU busy time per call for JAX, CUDA events for torch; on a CPU
the wall-clock loop on small arrays).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from benchmarks import timing

CPU = not timing.on_gpu()


def bench(f, *args):
    return timing.time_fn(f, *args, iters=5 if CPU else 30, device=True)[0]


def add_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0


def lowerings():
    x = jnp.arange(1024, dtype=jnp.float32)
    try:
        y = pl.pallas_call(
            add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=CPU
        )(x)
        print("pallas default GPU lowering ok:", bool(jnp.all(y == x + 1)))
    except Exception as e:  # noqa: BLE001 - reported, the probe goes on
        print("pallas default lowering FAILED:", type(e).__name__, str(e)[:300])
    try:
        from jax.experimental.pallas import triton as pltriton

        y = pl.pallas_call(
            add_kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            compiler_params=pltriton.CompilerParams(num_warps=4),
            interpret=CPU,
        )(x)
        print("pallas triton lowering ok:", bool(jnp.all(y == x + 1)))
    except Exception as e:  # noqa: BLE001 - reported, the probe goes on
        print("pallas triton lowering FAILED:", type(e).__name__, str(e)[:300])
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        y = pl.pallas_call(
            add_kernel,
            out_shape=jax.ShapeDtypeStruct((128,), jnp.float32),
            compiler_params=plgpu.CompilerParams(),
            interpret=CPU,
        )(x[:128])
        print("pallas mosaic lowering ok:", bool(jnp.all(y == x[:128] + 1)))
    except Exception as e:  # noqa: BLE001 - reported, the probe goes on
        print("pallas mosaic lowering FAILED:", type(e).__name__, str(e)[:300])


def ceilings():
    n = 1 << (20 if CPU else 29)  # 1 GiB of bf16 on the GPU
    a = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    t = bench(jax.jit(lambda a: a * 1.5), a)
    print(f"copy ceiling XLA x*1.5: {2 * a.nbytes / t / 1e12:.2f} TB/s", flush=True)
    del a
    m = 256 if CPU else 8192
    b = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    t = bench(jax.jit(lambda a, b: a @ b), b, b)
    print(f"matmul ceiling XLA bf16 {m}^3: {2 * m**3 / t / 1e12:.1f} TFLOP/s", flush=True)
    del b
    try:
        import torch

        if not torch.cuda.is_available():
            print("torch: no CUDA device")
            return
        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        t = timing.time_torch(
            torch, lambda s, d: d.copy_(s), src, torch.empty_like(src), events=True
        )
        print(f"copy ceiling torch: {2 * src.numel() * 2 / t / 1e12:.2f} TB/s")
    except Exception as e:  # noqa: BLE001 - reported, the probe goes on
        print("torch:", e)


print("jax", jax.__version__, jax.devices(), flush=True)
lowerings()
ceilings()
