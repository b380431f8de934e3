"""Probe of the xla fused MoE on a GPU: its forms against plain ``lax.ragged_dot``, with memory.

  python3 scripts/moe_xla_probe.py [--models all] [--tokens 64,4096] [--iters 5]
                                   [--variants xla,loop,ragged_dot] [--budget-s 140]
                                   [--breakdown mixtral:64,deepseek_v3:4096] [--skew MODEL:T]

For each model of ``benchmarks.shapes.MOE_MODELS`` (bf16 weights, made once per model) and each
token count, routing by ``moe_topk`` (softmax top-k) of random logits:

- ``xla``: ``reference.fused_moe`` as the library runs it (``moe_plan``'s form, printed);
- ``loop``: ``path="loop"``, the tile loop alone (the xla path before the capacity form);
- ``capacity``: ``path="capacity"`` (opt-in; ``xla`` already is this form unless 2 T k < E);
- ``ragged_dot``: ``lax.ragged_dot`` gate-up and down only, on expert-sorted rows (sort, gather,
  activation and combine not timed). XLA's GPU lowering expands it over every expert (E times
  the FLOPs, an ``[E, T k, Hd]`` temporary: 112 GiB for DeepSeek-V3 at 4096 tokens) and its
  compile autotunes those huge GEMMs (16-72 s each at 4096 tokens on an H200), so by default it
  runs above 512 tokens only for models of at most 16 experts (``--ragged-all``: everywhere);
- ``ragged_dot_gg`` (opt-in): the same compiled with XLA's experimental
  ``xla_gpu_experimental_use_ragged_dot_grouped_gemm`` (an experimental flag: may abort).

Each row: XLA's compiled temporaries (``memory_analysis``; a row whose temporaries and output
exceed the free device memory is reported ``OOM (compile-time)`` without running, and a run
that raises is reported with its error), the time (``benchmarks.timing.time_fn``: GPU busy time
per call), TFLOP/s of the routed work ``2 T k (Hd 2I + I Hd)`` and TB/s of the weights of the
experts touched, the relative error against ``loop`` (xla forms), and the device's
``peak_bytes_in_use`` after the row (cumulative over the process: it says when a row raised the
peak). ``--breakdown MODEL:T,...``: the top kernels of the ``xla`` row. ``--skew MODEL:T``:
one more ``xla``/``loop`` pair with a skewed routing (a per-expert logit bias ``-log(1 + e)``,
so a few experts take most rows: the capacity form's overflow loop does work).

On a CPU the same rows run on tiny matrices (``--tokens`` default 8,64).
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from probe_common import CPU, rel_error, timing  # noqa: E402

from benchmarks import shapes as S  # noqa: E402
from benchmarks.moe import moe_inputs, shape_biases  # noqa: E402
from jax_paged_attn import moe_topk, reference  # noqa: E402

GiB = 2**30


def line(*a):
    print(*a, flush=True)


def mem_stats():
    try:
        return jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every platform has allocator stats
        return {}


def free_bytes():
    m = mem_stats()
    if "bytes_limit" not in m:
        return None
    return m["bytes_limit"] - m.get("bytes_in_use", 0)


def variants(shape, act, bias):
    """name -> (function, argument names) of each variant."""

    def xla(path):
        def f(x, wgu, wd, w, ids, b_gu, b_d):
            return reference.fused_moe(
                x, wgu, wd, w, ids, activation=act, b_gate_up=b_gu, b_down=b_d, path=path
            )

        return f

    def ragged(xs, a, wgu, wd, gs):
        return lax.ragged_dot(xs, wgu, gs), lax.ragged_dot(a, wd, gs)

    return {
        "xla": (xla("auto"), "moe"),
        "capacity": (xla("capacity"), "moe"),
        "loop": (xla("loop"), "moe"),
        "ragged_dot": (ragged, "gemm"),
        "ragged_dot_gg": (ragged, "gemm"),
    }


def compile_row(name, fn, args):
    opts = {}
    if name == "ragged_dot_gg":
        opts = {"xla_gpu_experimental_use_ragged_dot_grouped_gemm": True}
    return jax.jit(fn, compiler_options=opts or None).lower(*args).compile()


def run_model(model, tokens, args, deadline, skew_tokens=()):
    label, E, K, Hd, I, act, bias = S.MOE_MODELS[model]
    if CPU:
        E, Hd, I = min(E, 16), 64, 32
    dt = jnp.bfloat16
    t0 = time.perf_counter()
    shape0 = S.MoEShape(model, tokens[0], E, K, Hd, I, activation=act, bias=bias)
    x, wgu, wd, _, _ = moe_inputs(jax.random.key(1), 1, E, K, Hd, I, dt)
    b_gu, b_d = shape_biases(shape0, jax.random.key(2))
    jax.block_until_ready(wd)
    line(
        f"== {label}: top-{K} of {E}, Hd {Hd}, I {I}, {act}{' + biases' if bias else ''}, "
        f"{E * shape0.expert_bytes / GiB:.2f} GiB of weights (made in {time.perf_counter() - t0:.1f} s)"
    )
    runs = [(t, False) for t in tokens] + [(t, True) for t in skew_tokens]
    for T, skewed in runs:
        if time.perf_counter() > deadline:
            line(f"{label} T={T}: skipped (budget)")
            continue
        kx, kl = jax.random.split(jax.random.key(10 + T))
        x = jax.random.normal(kx, (T, Hd), jnp.float32).astype(dt)
        logits = jax.random.normal(kl, (T, E), jnp.float32)
        if skewed:
            logits = logits - jnp.log1p(jnp.arange(E, dtype=jnp.float32))[None, :]
        w, ids = moe_topk(logits, K)
        ids_np = np.asarray(ids).reshape(-1)
        counts = np.bincount(ids_np, minlength=E)
        touched = int((counts > 0).sum())
        flops = 2 * T * K * (Hd * 2 * I + I * Hd)
        wbytes = touched * 3 * Hd * I * 2
        plan = reference.moe_plan(T, K, E)
        line(
            f"-- {label} T={T}{' SKEWED' if skewed else ''}: {touched}/{E} experts touched, "
            f"rows per expert max {counts.max()} mean {T * K / E:.1f}; plan {tuple(plan)}"
            + (f", {int(np.maximum(counts - plan.capacity, 0).sum())} overflow rows"
               if plan.form == "capacity" else "")
        )  # fmt: skip
        order = np.argsort(ids_np, kind="stable")
        gs = jnp.asarray(counts.astype(np.int32))
        moe_args = (x, wgu, wd, w, ids, b_gu, b_d)
        gemm_args = None
        names = ["xla", "loop"] if skewed else args.variants
        if T > 512 and E > 16 and not args.ragged_all:
            dropped = [n for n in names if n.startswith("ragged_dot")]
            names = [n for n in names if n not in dropped]
            if dropped:
                line(f"{label} T={T} {','.join(dropped)}: not run (E > 16; --ragged-all runs it)")
        outs = {}
        for name in names:
            if time.perf_counter() > deadline:
                line(f"{label} T={T} {name}: skipped (budget)")
                continue
            fn, kind = variants(shape0, act, bias)[name]
            if kind == "gemm" and gemm_args is None:
                xs = x[jnp.asarray(order // K)]
                a = jax.random.normal(jax.random.key(3), (T * K, I), jnp.float32).astype(dt)
                gemm_args = (xs, a, wgu, wd, gs)
            call_args = moe_args if kind == "moe" else gemm_args
            row = f"{label:16s} T={T:<5d}{'s' if skewed else ' '} {name:13s}"
            try:
                tc = time.perf_counter()
                compiled = compile_row(name, fn, call_args)
                ma = compiled.memory_analysis()
                temp = getattr(ma, "temp_size_in_bytes", 0) if ma is not None else 0
                outb = getattr(ma, "output_size_in_bytes", 0) if ma is not None else 0
                tcomp = time.perf_counter() - tc
                free = free_bytes()
                if free is not None and temp + outb > 0.97 * free:
                    line(
                        f"{row} OOM (compile-time): temporaries {temp / GiB:.1f} GiB + output "
                        f"{outb / GiB:.1f} GiB > free {free / GiB:.1f} GiB; not run"
                    )
                    continue
                t, out = timing.time_fn(
                    compiled, *call_args, iters=args.iters, warmup=1, device=True
                )
            except Exception as e:  # noqa: BLE001 - OOM or any failure: reported, the probe goes on
                msg = str(e).strip().splitlines()
                line(f"{row} FAILED {type(e).__name__}: {(msg[0] if msg else '')[:300]}")
                gc.collect()
                continue
            err = ""
            if kind == "moe":
                outs[name] = np.asarray(out, np.float32)
                if "loop" in outs and name != "loop":
                    err = f" err_vs_loop {rel_error(outs[name], outs['loop']):.1e}"
                elif name == "loop":
                    err = "".join(
                        f" err_{k}_vs_loop {rel_error(v, outs['loop']):.1e}"
                        for k, v in outs.items()
                        if k != "loop"
                    )
            peak = mem_stats().get("peak_bytes_in_use")
            line(
                f"{row} {t * 1e3:9.3f} ms {flops / t / 1e12:7.1f} TFLOP/s {wbytes / t / 1e12:6.2f} "
                f"TB/s  temp {temp / GiB:7.2f} GiB  peak {'-' if peak is None else f'{peak / GiB:.1f}'} "
                f"GiB  compile {tcomp:.1f} s{err}"
            )
            if f"{model}:{T}" in args.breakdown and name == "xla" and not skewed:
                for us, n, kname in timing.kernel_breakdown(compiled, *call_args, calls=3)[:8]:
                    line(f"    {us:9.1f} us x{n:4.1f}  {kname[:110]}")
            del compiled, out
        del moe_args, gemm_args, outs
        gc.collect()
    del x, wgu, wd, b_gu, b_d
    gc.collect()


def main(argv=None):
    p = argparse.ArgumentParser(prog="scripts/moe_xla_probe.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="all", help=f"comma-separated of {list(S.MOE_MODELS)}")
    p.add_argument("--tokens", default="8,64" if CPU else "64,4096")
    p.add_argument("--variants", default="xla,loop,ragged_dot")
    p.add_argument("--iters", type=int, default=3 if CPU else 5)
    p.add_argument("--ragged-all", action="store_true", help="ragged_dot at every size")
    p.add_argument("--budget-s", type=float, default=140.0)
    p.add_argument("--breakdown", default="mixtral:64,deepseek_v3:4096")
    p.add_argument("--skew", default="qwen3_235b_a22b:4096", help="MODEL:T,... ('' for none)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.breakdown = {b for b in args.breakdown.split(",") if b}
    models = list(S.MOE_MODELS) if args.models == "all" else args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    skew = {}
    for item in filter(None, args.skew.split(",")):
        m, t = item.split(":")
        skew.setdefault(m, []).append(8 if CPU else int(t))
    deadline = time.perf_counter() + args.budget_s
    dev = jax.devices()[0]
    m = mem_stats()
    line(
        f"device {getattr(dev, 'device_kind', dev)}, jax {jax.__version__}; memory limit "
        f"{m.get('bytes_limit', 0) / GiB:.1f} GiB; variants {args.variants}; tokens {tokens}"
    )
    for model in models:
        if time.perf_counter() > deadline:
            line(f"{model}: skipped (budget)")
            continue
        run_model(model, tokens, args, deadline, skew.get(model, ()))
    line("done")


if __name__ == "__main__":
    sys.exit(main())
