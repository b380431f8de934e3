"""The ``ceilings`` group: what the device does at its best, measured in the same run.

- copy: XLA ``x * 1.5`` on 1 GiB of float32 and torch ``dst.copy_(src)`` (if importable), bytes
  read + written;
- matmul: bfloat16 8192^3, XLA ``jnp.dot`` and ``torch.matmul`` (cuBLAS).

The best of each kind is ``ctx.ceilings[kind]["best"]``: every other row's ``frac_of_ceiling``
divides by it (TB/s by copy, TFLOP/s by matmul).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.harness import Ctx, derive, err_line, new_row, run_row, skip


def set_ceiling(ctx: Ctx, kind: str, impl: str, row: dict) -> None:
    """Records an ``ok`` ceiling row's value and the best of its kind."""
    if row["status"] != "ok":
        return
    c = ctx.ceilings.setdefault(kind, {})
    c[impl] = row["value"]
    best = max((v, k) for k, v in c.items() if k not in ("best", "best_impl"))
    c["best"], c["best_impl"] = best
    derive(ctx)


def _copy(src, dst):
    return dst.copy_(src)


def bench_ceilings(ctx: Ctx) -> None:
    quick = ctx.args.quick
    n = (1 << 22) if quick else (1 << 28)  # f32 elements: 16 MB quick, 1 GiB on the GPU
    nbytes = 4 * n
    copy_name = f"copy_{nbytes >> 20}MiB"
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    sets = [(x,)] + [(x + i,) for i in range(1, timing.num_sets(2 * nbytes))]
    row = new_row(
        "ceilings",
        copy_name,
        "copy_xla",
        "ceiling",
        "TB/s",
        work={"bytes": 2 * nbytes},
        config={"op": "x * 1.5", "dtype": "float32"},
    )
    run_row(ctx, row, jax.jit(lambda a: a * 1.5), sets, work_key="bytes")
    del x, sets
    set_ceiling(ctx, "copy", "xla", row)

    m = 256 if quick else 8192
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (m, m), jnp.bfloat16)
    b = jax.random.normal(kb, (m, m), jnp.bfloat16)
    sets = [(a, b)] + [(a + i, b) for i in range(1, timing.num_sets(3 * m * m * 2))]
    row = new_row(
        "ceilings",
        f"matmul_{m}",
        "matmul_xla",
        "ceiling",
        "TFLOP/s",
        work={"flops": 2 * m**3},
        config={"dtype": "bfloat16"},
    )
    run_row(ctx, row, jax.jit(jnp.dot), sets, work_key="flops")
    del a, b, sets
    set_ceiling(ctx, "matmul", "xla", row)

    torch = ctx.torch
    if torch is None:
        why = ctx.torch_missing()
        skip(ctx, new_row("ceilings", copy_name, "copy_torch", "ceiling", "TB/s"), why)
        skip(ctx, new_row("ceilings", f"matmul_{m}", "matmul_torch", "ceiling", "TFLOP/s"), why)
        return
    tsync = timing.torch_sync(torch)
    try:
        src = torch.randn(n, device="cuda", dtype=torch.float32)
        row = new_row(
            "ceilings",
            copy_name,
            "copy_torch",
            "ceiling",
            "TB/s",
            work={"bytes": 2 * nbytes},
            config={"op": "dst.copy_(src)"},
        )
        copy_sets = [(src, torch.empty_like(src))]
        run_row(ctx, row, _copy, copy_sets, sync=tsync, work_key="bytes")
        set_ceiling(ctx, "copy", "torch", row)
        del src, copy_sets
        ta = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        tb = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        row = new_row(
            "ceilings",
            f"matmul_{m}",
            "matmul_torch",
            "ceiling",
            "TFLOP/s",
            work={"flops": 2 * m**3},
            config={"op": "torch.matmul (cuBLAS)"},
        )
        run_row(ctx, row, torch.matmul, [(ta, tb)], sync=tsync, work_key="flops")
        set_ceiling(ctx, "matmul", "torch", row)
        del ta, tb
    except Exception as e:
        skip(ctx, new_row("ceilings", "torch", "torch", "ceiling", "TB/s"), err_line(e))
    torch.cuda.empty_cache()
