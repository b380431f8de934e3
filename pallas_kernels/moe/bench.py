"""GPU check + benchmark of the fused-MoE kernels (run on the lent GPU, prints a table).

    python -m pallas_kernels.moe.bench [--shapes mixtral,decode,small_experts] [--iters 20]

For each named shape: checks triton and mosaic against the ``xla`` path (sorted
``lax.ragged_dot``, jax_paged_attn.reference) by relative L2 error, then times all three
(median of ``--iters`` timed calls after warm-up, block_until_ready) and reports TFLOP/s
(2*T*k*(Hd*2I + I*Hd)) and TB/s of expert weights touched (distinct experts routed to),
plus a bf16 8192^3 XLA matmul and a device-copy ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # name: (T, Hd, I, E, k)
    "mixtral": (4096, 4096, 14336, 8, 2),
    "decode": (64, 4096, 14336, 8, 2),
    "small_experts": (4096, 2048, 1408, 64, 6),
}


def _time(fn, *args, iters=20):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def _case(shape, dtype=jnp.bfloat16, seed=0):
  T, Hd, I, E, k = shape
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (T, Hd), dtype)
  wgu = (jax.random.normal(ks[1], (E, Hd, 2 * I), jnp.float32) / Hd ** 0.5).astype(dtype)
  wd = (jax.random.normal(ks[2], (E, I, Hd), jnp.float32) / I ** 0.5).astype(dtype)
  logits = jax.random.normal(ks[3], (T, E), jnp.float32)
  w, ids = jax.lax.top_k(jax.nn.softmax(logits, -1), k)
  return x, wgu, wd, w, ids.astype(jnp.int32)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--backends", default="xla,triton,mosaic")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  from jax_paged_attn import reference
  from pallas_kernels.moe import mosaic, triton

  impls = {"xla": reference.fused_moe, "triton": triton.fused_moe, "mosaic": mosaic.fused_moe}
  rows = []
  a = jnp.ones((8192, 8192), jnp.bfloat16)
  mm_t = _time(jax.jit(lambda a: a @ a), a, iters=args.iters)
  big = jnp.ones((1 << 28,), jnp.bfloat16)
  cp_t = _time(jax.jit(lambda v: v * 1.5), big, iters=args.iters)
  ceil = dict(matmul_tflops=2 * 8192 ** 3 / mm_t / 1e12, copy_tbs=2 * big.nbytes / cp_t / 1e12)
  print(f"device {jax.devices()[0].device_kind}: XLA bf16 matmul 8192^3 "
        f"{ceil['matmul_tflops']:.0f} TFLOP/s, XLA x*1.5 copy {ceil['copy_tbs']:.2f} TB/s")
  for name in args.shapes.split(","):
    shape = SHAPES[name]
    T, Hd, I, E, k = shape
    x, wgu, wd, w, ids = _case(shape)
    flops = 2 * T * k * (Hd * 2 * I + I * Hd)
    touched = int(jnp.unique(ids).size) * (Hd * 2 * I + I * Hd) * 2
    ref = None
    for b in args.backends.split(","):
      fn = jax.jit(functools.partial(impls[b], activation="silu"))
      try:
        y = fn(x, wgu, wd, w, ids)
        if ref is None:
          ref = y.astype(jnp.float32)
        err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        t = _time(fn, x, wgu, wd, w, ids, iters=args.iters)
      except Exception as e:  # report and go on: one failing backend must not hide others
        print(f"{name:14s} {b:7s} FAILED: {type(e).__name__}: {str(e)[:300]}")
        continue
      row = dict(shape=name, backend=b, ms=t * 1e3, tflops=flops / t / 1e12,
                 weights_tbs=touched / t / 1e12, rel_err_vs_first=err)
      rows.append(row)
      print(f"{name:14s} {b:7s} {t*1e3:8.3f} ms {row['tflops']:7.1f} TFLOP/s "
            f"{row['weights_tbs']:5.2f} TB/s(weights) rel_err {err:.2e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(ceilings=ceil, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
