"""Probe of the GPU machine: versions, the two Pallas lowerings, and the copy/matmul ceilings."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def bench(f, *args, n=30):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


print("jax", jax.__version__, jax.devices(), flush=True)


# Pallas Triton lowering
def add_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0


x = jnp.arange(1024, dtype=jnp.float32)
try:
    y = pl.pallas_call(add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
    print("pallas default GPU lowering ok:", bool(jnp.all(y == x + 1)))
except Exception as e:
    print("pallas default lowering FAILED:", type(e).__name__, str(e)[:300])
try:
    from jax.experimental.pallas import triton as pltriton

    y = pl.pallas_call(
        add_kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4),
    )(x)
    print("pallas triton lowering ok:", bool(jnp.all(y == x + 1)))
except Exception as e:
    print("pallas triton lowering FAILED:", type(e).__name__, str(e)[:300])
try:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    y = pl.pallas_call(
        add_kernel,
        out_shape=jax.ShapeDtypeStruct((128,), jnp.float32),
        compiler_params=plgpu.CompilerParams(),
    )(x[:128])
    print("pallas mosaic lowering ok:", bool(jnp.all(y == x[:128] + 1)))
except Exception as e:
    print("pallas mosaic lowering FAILED:", type(e).__name__, str(e)[:300])

# ceilings
n = 1 << 29  # 1 GiB of bf16 per buffer... 2 bytes * 512M = 1 GiB
a = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
t = bench(jax.jit(lambda a: a * 1.5), a)
print(f"copy ceiling XLA x*1.5: {2 * a.nbytes / t / 1e12:.2f} TB/s", flush=True)
m = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
t = bench(jax.jit(lambda a, b: a @ b), m, m)
print(f"matmul ceiling XLA bf16 8192^3: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s", flush=True)
try:
    import torch

    ta = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    tb = torch.empty_like(ta)
    for _ in range(3):
        tb.copy_(ta)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        tb.copy_(ta)
    e.record()
    torch.cuda.synchronize()
    print(
        f"copy ceiling torch: {2 * ta.numel() * 2 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s"
    )
except Exception as e:
    print("torch:", e)
