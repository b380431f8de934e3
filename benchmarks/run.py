"""One command for every benchmark: ceilings, our backends and the peers, one run.

    python -m benchmarks.run [--only decode,prefill,sweep,moe,kv_write,ceilings]
                             [--backends xla,triton,mosaic] [--quick] [--json PATH]
                             [--budget-s SECONDS] [--iters N] [--no-peers] [--no-torch]
    python -m benchmarks.run --only moe_zoo   # the MoE model zoo, not in the default run

What it does, in order (``ceilings`` always first unless ``--skip-ceilings``):
- ceilings (``benchmarks/ceilings.py``): device copy (XLA ``x * 1.5``; torch ``copy_`` if
  importable), bytes read + written; bf16 matmul 8192^3 (XLA; torch/cuBLAS if importable);
- each shape of ``benchmarks/shapes.py`` for each backend, through the public API only, and the
  peers (``benchmarks/peers.py``) on the same data (GPU-only peers are recorded as ``skipped``
  on a CPU): ``benchmarks/attention.py`` (decode, prefill, sweep), ``benchmarks/moe.py``,
  ``benchmarks/kv_write.py``.

Every kernel's output is first checked against the ``xla`` backend on the same inputs (prefill:
a window of rows at the head and at the tail of every sequence, computed by the xla backend
from the same cache); a wrong result marks the row ``invalid`` (its time is still recorded).
A backend or peer that raises is recorded with the first line of its error and the run goes
on. Each finished row is appended to the JSON at once (a run killed half way still leaves its
rows), and a progress line is printed (flushed) for each (``benchmarks/harness.py``).

Timing (``benchmarks/timing.py``): one compile-and-run call, warm-up calls, then ``--iters``
(>= 20 by default) timed samples; a sample is ``reps`` back-to-back calls (enough for >= 2 ms
on a GPU, so host dispatch overlaps the device) followed by ``block_until_ready`` (torch:
``cuda.synchronize``), divided by ``reps``; the median sample is the row's wall time
(``wall_time_s``). On a GPU the reported figure uses device time (``--timing device``, the
default there): for JAX calls, ``--device-calls`` back-to-back calls run under ``jax.profiler``
and the GPU's busy time (the union of its kernels' intervals) per call is the time; for torch
calls, CUDA events around the same number of calls. Why: between two jitted calls JAX leaves
the GPU idle for its dispatch (5-6% of a 0.4 ms decode call, against 0.2-0.4% for torch:
``scripts/timing_probe.py``, benchmarks/NOTES.md), which the wall-clock loop would charge to
our kernels and JAX peers only. Both times are in the JSON. Inputs smaller than the 50 MB L2
are rotated among several independent copies. A row whose single call takes longer than
``--max-row-s``/20 gets fewer samples (at least 3); the JSON says how many.
"""

from __future__ import annotations

import os

# JAX must not grab 75% of the GPU up front: torch (peers, ceilings) shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402

from benchmarks import shapes as S  # noqa: E402
from benchmarks.attention import bench_attention, bench_decode  # noqa: E402
from benchmarks.ceilings import bench_ceilings  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    DEFAULT_BACKENDS,
    Ctx,
    derive,
    err_line,
    jpa,
    new_row,
    table,
)
from benchmarks.kv_write import bench_kv_write  # noqa: E402
from benchmarks.moe import bench_moe  # noqa: E402

GROUP_BENCH = {
    "decode": lambda ctx, shape: bench_decode(ctx, shape),
    "prefill": lambda ctx, shape: bench_attention(ctx, shape, "prefill"),
    "sweep": lambda ctx, shape: bench_attention(ctx, shape, "sweep"),
    "moe": lambda ctx, shape: bench_moe(ctx, shape),
    "moe_zoo": lambda ctx, shape: bench_moe(ctx, shape, zoo=True),
    "kv_write": lambda ctx, shape: bench_kv_write(ctx, shape),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--only",
        default=",".join(S.DEFAULT_GROUPS),
        help=f"comma-separated groups of {S.GROUPS} (default: all but moe_zoo)",
    )
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS))
    ap.add_argument(
        "--quick", action="store_true", help="tiny shapes, few iterations (CPU smoke run)"
    )
    ap.add_argument(
        "--json",
        default=None,
        help="default: $OUT/bench.json if $OUT is set, else benchmarks/results/latest.json",
    )
    ap.add_argument(
        "--plot", default=None, help="PNG path (default: JSON path with .png); 'none' to skip"
    )
    ap.add_argument("--iters", type=int, default=None, help="timed samples (default 20, quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3, quick 1)")
    ap.add_argument(
        "--min-sample-s",
        type=float,
        default=None,
        help="a timed sample repeats the call up to this long (default 2e-3, quick 0)",
    )
    ap.add_argument(
        "--max-row-s",
        type=float,
        default=None,
        help="cap on one row's timed samples (default 10 s, quick 2 s)",
    )
    ap.add_argument(
        "--timing",
        choices=("device", "wall"),
        default="device",
        help="figure from device time on a GPU (default; see the module doc) or "
        "from the wall-clock loop",
    )
    ap.add_argument(
        "--device-calls",
        type=int,
        default=10,
        help="calls traced per row for device time (default 10)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="stop starting new rows after this many seconds (0: no limit)",
    )
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--skip-ceilings", action="store_true")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="pass interpret=True to our kernel backends (CPU test of the "
        "plumbing; times are meaningless)",
    )
    ap.add_argument(
        "--interpret-peers",
        action="store_true",
        help="run the Pallas Triton peers under the Pallas interpreter (CPU test "
        "of the harness's wiring; times are meaningless)",
    )
    ap.add_argument(
        "--shapes",
        default=None,
        help="comma-separated shape names to keep (default: all of each group)",
    )
    a = ap.parse_args(argv)
    a.only = [g.strip() for g in a.only.split(",") if g.strip()]
    bad = [g for g in a.only if g not in S.GROUPS]
    if bad:
        ap.error(f"unknown group(s) {bad}; choose from {S.GROUPS}")
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    a.shapes = None if a.shapes is None else {s.strip() for s in a.shapes.split(",")}
    if a.iters is None:
        a.iters = 5 if a.quick else 20
    if a.warmup is None:
        a.warmup = 1 if a.quick else 3
    if a.min_sample_s is None:
        a.min_sample_s = 0.0 if a.quick else 2e-3
    if a.max_row_s is None:
        a.max_row_s = 2.0 if a.quick else 10.0
    if a.json is None:
        a.json = (
            os.path.join(os.environ["OUT"], "bench.json")
            if os.environ.get("OUT")
            else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest.json")
        )
    return a


def run_groups(ctx: Ctx) -> None:
    """The ceilings, then every selected shape of every selected group, in order."""
    args = ctx.args
    groups = list(args.only)
    if "ceilings" in groups or not args.skip_ceilings:
        groups = ["ceilings"] + [g for g in groups if g != "ceilings"]
    shapes = S.suite(tiny=args.quick)
    done = set()
    for g in groups:
        if g == "ceilings":
            try:
                bench_ceilings(ctx)
            except Exception as e:
                ctx.log(f"ceilings failed: {err_line(e)}")
            continue
        for shape in shapes[g]:
            if args.shapes is not None and shape.name not in args.shapes:
                continue
            if shape in done:  # the sweep shares prefill_8k with the prefill group
                ctx.log(f"{g} {shape.name}: measured above, not repeated")
                continue
            done.add(shape)
            try:
                GROUP_BENCH[g](ctx, shape)
            except Exception as e:  # a setup failure: record it, go on with the next shape
                row = new_row(g, shape, "setup", "ours", "", work={})
                row.update(status="error", error=err_line(e))
                ctx.add(row)
            gc.collect()
            if ctx.torch is not None:
                ctx.torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = Ctx(args)
    ctx.log(
        f"device {ctx.device} ({ctx.platform}), jax {jax.__version__}, "
        f"torch {ctx.meta['torch_version']}; groups {args.only}; backends {args.backends}; "
        f"json {args.json}"
    )
    try:
        jpa()
    except Exception as e:
        ctx.log(f"jax_paged_attn not importable: {err_line(e)}")
    run_groups(ctx)
    derive(ctx)
    ctx.write_json()
    print("\n" + table(ctx), flush=True)
    ctx.log(f"wrote {args.json}")
    if args.plot != "none":
        png = args.plot or os.path.splitext(args.json)[0] + ".png"
        try:
            from benchmarks import plot

            plot.render(args.json, png)
            ctx.log(f"wrote {png}")
        except Exception as e:
            ctx.log(f"plot skipped: {err_line(e)}")
        if "moe_zoo" in args.only:  # its own plot: benchmarks/moe_plot.py
            png = os.path.splitext(png)[0] + "_moe.png"
            try:
                from benchmarks import moe_plot

                moe_plot.render(args.json, png)
                ctx.log(f"wrote {png}")
            except Exception as e:
                ctx.log(f"MoE plot skipped: {err_line(e)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
