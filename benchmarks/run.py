"""One command for every benchmark of PERF.md: ceilings, our backends and the peers, one run.

    python -m benchmarks.run [--only decode,prefill,sweep,moe,kv_write,ceilings]
                             [--backends xla,triton,mosaic] [--quick] [--json PATH]
                             [--budget-s SECONDS] [--iters N] [--no-peers] [--no-torch]

What it does, in order (``ceilings`` always first unless ``--skip-ceilings``):
- ceilings: device copy (XLA ``x * 1.5``; torch ``copy_`` if importable), bytes read + written;
  bf16 matmul 8192^3 (XLA; torch/cuBLAS if importable);
- each shape of ``benchmarks/shapes.py`` for each backend, through the public API only, and the
  peers of PERF.md on the same data (GPU-only peers are recorded as ``skipped`` on a CPU).

Every kernel's output is first checked against the ``xla`` backend on the same inputs (prefill:
a window of rows at the head and at the tail of every sequence, computed by the xla backend
from the same cache); a wrong result marks the row ``invalid`` (its time is still recorded).
A backend or peer that raises is recorded with the first line of its error and the run goes
on. Each finished row is appended to the JSON at once (a run killed half way still leaves its
rows), and a progress line is printed (flushed) for each.

Timing: one compile-and-run call, warm-up calls, then ``--iters`` (>= 20 by default) timed
samples; a sample is ``reps`` back-to-back calls (enough for >= 2 ms on a GPU, so host dispatch
overlaps the device) followed by ``block_until_ready`` (torch: ``cuda.synchronize``), divided by
``reps``; the median sample is the row's wall time (``wall_time_s``). On a GPU the reported
figure uses device time (``--timing device``, the default there; PERF.md prefers device-side
timing): for JAX calls, ``--device-calls`` back-to-back calls run under ``jax.profiler`` and the
GPU's busy time (the union of its kernels' intervals) per call is the time; for torch calls,
CUDA events around the same number of calls. Why: between two jitted calls JAX leaves the GPU
idle for its dispatch (5-6% of a 0.4 ms decode call, against 0.2-0.4% for torch:
``scripts/timing_probe.py``, benchmarks/NOTES.md), which the wall-clock loop would charge to our
kernels and JAX peers only. Both times are in the JSON. Inputs smaller than the 50 MB L2 are
rotated among several independent copies. A row whose single call takes longer than
``--max-row-s``/20 gets fewer samples (at least 3); the JSON says how many.
"""

from __future__ import annotations

import os

# JAX must not grab 75% of the GPU up front: torch (peers, ceilings) shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import shapes as S  # noqa: E402

DEFAULT_BACKENDS = ("xla", "triton", "mosaic")
TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}  # rel. L2 error vs the xla backend
CHECK_WINDOW = 128  # prefill check: this many rows at the head and tail of each sequence

# The named peer of each group (PERF.md's goals are ratios to these, measured in the same run).
NAMED_PEER = {
    "decode": "pallas_paged_attention",
    "prefill": "cudnn",
    "sweep": "cudnn",
    "mixed": None,
    "moe": "xla",
    "kv_write": "xla",
}


# ---------------------------------------------------------------------------------------------
# Run context, rows, JSON


class Ctx:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.ceilings: dict = {}
        self.platform = jax.default_backend()
        self.on_gpu = self.platform in ("gpu", "cuda")
        dev = jax.devices()[0]
        self.device = getattr(dev, "device_kind", str(dev))
        self.torch = _import_torch() if (self.on_gpu and not args.no_torch) else None
        self.meta = {
            "device": self.device,
            "platform": self.platform,
            "num_devices": jax.device_count(),
            "jax_version": jax.__version__,
            "jaxlib_version": _jaxlib_version(),
            "torch_version": getattr(self.torch, "__version__", None),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "quick": args.quick,
            "iters": args.iters,
            "warmup": args.warmup,
            "compute_capability": getattr(dev, "compute_capability", None),
            "backends": list(args.backends),
            "groups": list(args.only),
            "counting": {
                "decode_TB/s": "2 * sum(context_lens) * Hkv * D * itemsize / time",
                "prefill_TFLOP/s": "4 * sum(visible q.k pairs) * D * H / time",
                "moe_TFLOP/s": "2 * T * k * (Hd * 2I + I * Hd) / time",
                "moe_TB/s": "distinct routed experts * 3 * Hd * I * itemsize / time",
                "kv_write_TB/s": "4 * T * Hkv * D * itemsize (read + write) / time",
                "copy_TB/s": "2 * nbytes (read + write) / time",
                "matmul_TFLOP/s": "2 * n^3 / time",
            },
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return bool(self.args.budget_s) and self.elapsed() > self.args.budget_s

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        derive(self)
        self.log(progress_line(row))
        self.write_json()
        return row

    def write_json(self) -> None:
        path = self.args.json
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        doc = dict(
            self.meta, elapsed_s=round(self.elapsed(), 2), ceilings=self.ceilings, rows=self.rows
        )
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=_json_default)
        os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # pragma: no cover
        return None


def _import_torch():
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch
    except Exception:
        return None


def err_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:400]}"


def new_row(group, shape, impl, kind, metric, *, peer=None, work=None, config=None) -> dict:
    row = {
        "group": group,
        "shape": getattr(shape, "name", shape),
        "impl": impl,
        "kind": kind,
        "status": "pending",
        "error": None,
        "metric": metric,
        "value": None,
        "time_s": None,
        "peer": peer,
        "work": work or {},
        "config": config or {},
        "check": None,
    }
    if dataclasses.is_dataclass(shape):
        row["shape_params"] = S.to_dict(shape)
        if isinstance(shape, S.AttentionShape):
            row["seq_len"] = shape.seq_len
            row["is_prefill"] = shape.is_prefill
    return row


def derive(ctx: Ctx) -> None:
    """Fills each row's value, fraction of ceiling and ratio to its named peer."""
    copy = ctx.ceilings.get("copy", {}).get("best")
    mm = ctx.ceilings.get("matmul", {}).get("best")
    by_key = {(r["shape"], r["impl"]): r for r in ctx.rows if r["status"] == "ok"}
    for r in ctx.rows:
        if r["kind"] == "ceiling" or r.get("value") is None:
            continue
        ceil = copy if r["metric"] == "TB/s" else mm
        r["ceiling"] = "copy" if r["metric"] == "TB/s" else "matmul"
        r["frac_of_ceiling"] = (r["value"] / ceil) if ceil else None
        p = by_key.get((r["shape"], r["peer"])) if r.get("peer") else None
        r["ratio_to_peer"] = (
            (r["value"] / p["value"]) if (p and p.get("value") and r["impl"] != r["peer"]) else None
        )


def progress_line(r: dict) -> str:
    head = f"{r['group']}/{r['shape']} {r['impl']}"
    if r["status"] not in ("ok", "invalid"):
        return f"{head}: {r['status'].upper()} {r.get('error') or ''}"
    s = f"{head}: {r['time_s'] * 1e3:.4g} ms  {r['value']:.4g} {r['metric']}"
    if r.get("frac_of_ceiling") is not None:
        s += f"  {100 * r['frac_of_ceiling']:.1f}% of {r['ceiling']}"
    if r.get("ratio_to_peer") is not None:
        s += f"  {r['ratio_to_peer']:.2f}x {r['peer']}"
    if r.get("check"):
        s += f"  err {r['check'].get('rel_err', float('nan')):.2e}"
    if r["status"] == "invalid":
        s += "  INVALID (wrong result)"
    return s


# ---------------------------------------------------------------------------------------------
# Timing


def jax_sync(out):
    jax.block_until_ready(out)


def sample_times(call, iters, reps, sync=jax_sync):
    """``iters`` samples of ``reps`` back-to-back ``call()``s, each closed by ``sync`` of the
    last output: (seconds per call of each sample, the last output)."""
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        for _ in range(reps):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - t) / reps)
    return samples, out


def measure(ctx: Ctx, fn, arg_sets, sync=jax_sync, *, on_first=None, iters=None, warmup=None):
    """Times ``fn(*arg_sets[i % n])``; returns a dict of timing fields.

    ``on_first(out)`` sees the output of the first call (compile + run) on ``arg_sets[0]``.
    """
    a = ctx.args
    iters = a.iters if iters is None else iters
    warmup = a.warmup if warmup is None else warmup
    n = len(arg_sets)
    t = time.perf_counter()
    out = fn(*arg_sets[0])
    sync(out)
    first = time.perf_counter() - t
    if on_first is not None:
        on_first(out)
    del out
    tw = time.perf_counter()
    single = None
    for i in range(max(1, warmup)):  # the last warm-up call estimates one call's time
        t = time.perf_counter()
        out = fn(*arg_sets[(i + 1) % n])
        sync(out)
        single = time.perf_counter() - t
        if time.perf_counter() - tw > a.max_row_s / 4:
            break
    reps = 1 if single >= a.min_sample_s else min(64, math.ceil(a.min_sample_s / max(single, 1e-7)))
    if single * reps * iters > a.max_row_s:
        iters = max(3, int(a.max_row_s / (single * reps)))
    k = itertools.count(1)  # input set of each call (0 was the first call's)
    samples, out = sample_times(lambda: fn(*arg_sets[next(k) % n]), iters, reps, sync)
    del out
    wall = statistics.median(samples)
    res = {
        "time_s": wall,
        "wall_time_s": wall,
        "time_min_s": min(samples),
        "time_max_s": max(samples),
        "iters": iters,
        "reps": reps,
        "input_sets": n,
        "first_call_s": round(first, 4),
        "timing": "wall",
    }
    if a.timing == "device" and ctx.on_gpu:
        calls = max(a.device_calls, reps)
        dev = (
            torch_device_time(ctx.torch, fn, arg_sets, calls)
            if sync is not jax_sync
            else jax_device_time(fn, arg_sets, calls)
        )
        if dev is not None:
            res.update(time_s=dev, device_time_s=dev, device_calls=calls, timing="device")
    return res


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "TraceMe", "Source")


def gpu_events(fn, arg_sets, calls):
    """[(kernel or copy name, start_ns, end_ns)] on the GPU planes' stream lines of a
    ``jax.profiler`` trace of ``calls`` back-to-back calls of a warm ``fn`` (derived lines,
    which repeat the kernels, are skipped)."""
    import glob
    import shutil
    import tempfile

    from jax import profiler

    d = tempfile.mkdtemp(prefix="jpa_prof_")
    try:
        n = len(arg_sets)
        profiler.start_trace(d)
        try:
            for i in range(calls):
                out = fn(*arg_sets[i % n])
            jax.block_until_ready(out)
        finally:
            profiler.stop_trace()
        events = []
        for path in glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[:1]:
            for plane in profiler.ProfileData.from_file(path).planes:
                if not plane.name.startswith("/device:GPU"):
                    continue
                for line in plane.lines:
                    if not line.name.startswith(_DERIVED_LINES):
                        events += [
                            (e.name, e.start_ns, e.end_ns) for e in line.events if e.duration_ns > 0
                        ]
        return events
    finally:
        shutil.rmtree(d, ignore_errors=True)


def jax_device_time(fn, arg_sets, calls):
    """GPU busy time per call of ``calls`` back-to-back calls, from a ``jax.profiler`` trace.

    Busy time is the union of the intervals of every event on the GPU planes' stream lines
    (kernels, copies), so gaps between kernels and between calls are not counted. None when
    the trace holds no GPU events.
    """
    spans = sorted((a, b) for _, a, b in gpu_events(fn, arg_sets, calls))  # fn is warm
    if not spans:
        return None
    busy, end = 0.0, -math.inf
    for a, b in spans:  # union of intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy * 1e-9 / calls


def torch_device_time(torch, fn, arg_sets, calls):
    """Per-call time of ``calls`` back-to-back torch calls between two CUDA events."""
    if torch is None:
        return None
    n = len(arg_sets)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start.record()
        for i in range(calls):
            fn(*arg_sets[i % n])
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3 / calls)
    return statistics.median(times)


def num_sets(ctx: Ctx, nbytes: int) -> int:
    """Independent input copies: 1 when the inputs exceed L2, else enough for ~100 MB (>= 2)."""
    if nbytes >= S.L2_BYTES:
        return 1
    return int(min(8, max(2, math.ceil(2 * S.L2_BYTES / max(nbytes, 1)))))


def compare(out, ref, dtype: str) -> dict:
    o = np.asarray(out, np.float32)
    r = np.asarray(ref, np.float32)
    nan = int(np.isnan(o).sum())
    diff = np.where(np.isnan(o), np.inf, o - r)
    denom = float(np.linalg.norm(r)) or 1.0
    rel = float(np.linalg.norm(diff) / denom) if o.size else 0.0
    max_abs = float(np.max(np.abs(diff))) if o.size else 0.0
    tol = TOL.get(dtype, 2e-2)
    ok = nan == 0 and bool(np.isfinite(rel)) and rel <= tol and not np.isnan(r).any()
    return {"rel_err": rel, "max_abs_err": max_abs, "nan_count": nan, "tol": tol, "ok": bool(ok)}


def run_row(
    ctx: Ctx,
    row: dict,
    fn,
    arg_sets,
    *,
    sync=jax_sync,
    check=None,
    work_key=None,
    scale=1e12,
    iters=None,
) -> dict:
    """Measures one row and records it; never raises."""
    if ctx.over_budget():
        row.update(status="skipped", error=f"time budget of {ctx.args.budget_s}s spent")
        return ctx.add(row)
    checked = {}

    def on_first(out):
        if check is not None:
            try:
                checked.update(check(out))
            except Exception as e:  # the check itself failed: say so, keep the timing
                checked.update({"ok": None, "error": err_line(e)})

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timing = measure(ctx, fn, arg_sets, sync, on_first=on_first, iters=iters)
    except NotImplementedError as e:
        row.update(status="not_implemented", error=err_line(e))
        return ctx.add(row)
    except Exception as e:
        row.update(status="error", error=err_line(e))
        return ctx.add(row)
    finally:
        gc.collect()
    row.update(timing)
    row["check"] = checked or None
    work = row["work"][work_key]
    row["value"] = work / timing["time_s"] / scale
    row["status"] = "invalid" if checked.get("ok") is False else "ok"
    return ctx.add(row)


def tune_and_run(
    ctx: Ctx,
    row: dict,
    candidates,
    arg_sets,
    *,
    sync=jax_sync,
    check=None,
    work_key=None,
    scale=1e12,
    fallback=(),
) -> dict:
    """Best of ``candidates`` by a short timing, then a full timing of the best.

    A candidate is ``(config, fn)`` (run on ``arg_sets``) or ``(config, fn, its_arg_sets)``;
    ``fallback`` candidates are tried only when none of ``candidates`` ran.
    """
    if ctx.over_budget():
        row.update(status="skipped", error=f"time budget of {ctx.args.budget_s}s spent")
        return ctx.add(row)
    tried, best = [], None
    for cands in (candidates, fallback):
        if best is not None:
            break
        for cand in cands:
            config, fn = cand[0], cand[1]
            sets = cand[2] if len(cand) > 2 else arg_sets
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = measure(ctx, fn, sets, sync, iters=min(5, ctx.args.iters), warmup=1)
                tried.append({"config": config, "time_s": t["time_s"]})
                if best is None or t["time_s"] < best[0]:
                    best = (t["time_s"], config, fn, sets)
            except Exception as e:
                tried.append({"config": config, "error": err_line(e)})
            gc.collect()
            if ctx.over_budget():
                break
    row["tried"] = tried
    if best is None:
        errs = [t["error"] for t in tried if "error" in t]
        row.update(
            status="not_implemented"
            if errs and all(e.startswith("NotImplementedError") for e in errs)
            else "error",
            error=(errs[0] if errs else "no candidate ran") + f" ({len(tried)} configs tried)",
        )
        return ctx.add(row)
    row["config"] = dict(row["config"], **best[1])
    return run_row(
        ctx, row, best[2], best[3], sync=sync, check=check, work_key=work_key, scale=scale
    )


def skip(ctx, row, why):
    row.update(status="skipped", error=why)
    return ctx.add(row)


# ---------------------------------------------------------------------------------------------
# Ceilings


def bench_ceilings(ctx: Ctx) -> None:
    quick = ctx.args.quick
    n = (1 << 22) if quick else (1 << 28)  # f32 elements: 16 MB quick, 1 GiB on the GPU
    nbytes = 4 * n
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    sets = [(x,)] + [(x + i,) for i in range(1, num_sets(ctx, 2 * nbytes))]
    row = new_row(
        "ceilings",
        f"copy_{nbytes >> 20}MiB",
        "copy_xla",
        "ceiling",
        "TB/s",
        work={"bytes": 2 * nbytes},
        config={"op": "x * 1.5", "dtype": "float32"},
    )
    run_row(ctx, row, jax.jit(lambda a: a * 1.5), sets, work_key="bytes")
    del x, sets
    _set_ceiling(ctx, "copy", "xla", row)

    m = 256 if quick else 8192
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (m, m), jnp.bfloat16)
    b = jax.random.normal(kb, (m, m), jnp.bfloat16)
    sets = [(a, b)] + [(a + i, b) for i in range(1, num_sets(ctx, 3 * m * m * 2))]
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
    _set_ceiling(ctx, "matmul", "xla", row)

    torch = ctx.torch
    if torch is None:
        why = "torch not importable / no CUDA" if ctx.on_gpu else "needs a CUDA GPU"
        if ctx.args.no_torch:
            why = "--no-torch"
        skip(
            ctx,
            new_row("ceilings", f"copy_{nbytes >> 20}MiB", "copy_torch", "ceiling", "TB/s"),
            why,
        )
        skip(ctx, new_row("ceilings", f"matmul_{m}", "matmul_torch", "ceiling", "TFLOP/s"), why)
        return
    tsync = _torch_sync(torch)
    try:
        src = torch.randn(n, device="cuda", dtype=torch.float32)
        dst = torch.empty_like(src)
        row = new_row(
            "ceilings",
            f"copy_{nbytes >> 20}MiB",
            "copy_torch",
            "ceiling",
            "TB/s",
            work={"bytes": 2 * nbytes},
            config={"op": "dst.copy_(src)"},
        )
        run_row(ctx, row, lambda s: dst.copy_(s), [(src,)], sync=tsync, work_key="bytes")
        _set_ceiling(ctx, "copy", "torch", row)
        del src, dst
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
        _set_ceiling(ctx, "matmul", "torch", row)
        del ta, tb
    except Exception as e:
        skip(ctx, new_row("ceilings", "torch", "torch", "ceiling", "TB/s"), err_line(e))
    torch.cuda.empty_cache()


def _set_ceiling(ctx, kind, impl, row):
    if row["status"] != "ok":
        return
    c = ctx.ceilings.setdefault(kind, {})
    c[impl] = row["value"]
    best = max((v, k) for k, v in c.items() if k not in ("best", "best_impl"))
    c["best"], c["best_impl"] = best
    derive(ctx)


def _torch_sync(torch):
    def sync(_):
        torch.cuda.synchronize()

    return sync


def _to_torch(ctx, x):
    """A torch CUDA tensor holding a copy of the JAX array ``x`` (dlpack, then clone)."""
    torch = ctx.torch
    return torch.from_dlpack(jnp.asarray(x)).clone()


def _torch_np(t):
    return t.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Paged data


def api_kw(ctx: Ctx, backend: str) -> dict:
    """Keyword arguments of a public API call for ``backend`` (``--interpret``: kernel backends
    run under the Pallas interpreter, a CPU test of the plumbing; times are meaningless)."""
    kw = {"backend": backend}
    if ctx.args.interpret and backend not in ("xla", "auto"):
        kw["interpret"] = True
    return kw


def _jpa():
    import jax_paged_attn

    return jax_paged_attn


def make_cache(k_pages, v_pages):
    jpa = _jpa()
    nb, hkv, bs, d = k_pages.shape
    base = jpa.KVCache.init(1, bs, hkv, d, dtype=k_pages.dtype)
    if dataclasses.is_dataclass(base):
        return dataclasses.replace(base, k=k_pages, v=v_pages)
    leaves, tree = jax.tree_util.tree_flatten(base)
    leaves = [k_pages if x is base.k else v_pages if x is base.v else x for x in leaves]
    return jax.tree_util.tree_unflatten(tree, leaves)


@dataclasses.dataclass
class Paged:
    cache: object
    block_tables: jax.Array  # i32[S, MB]
    context_lens: jax.Array  # i32[S]
    bt_np: np.ndarray
    lens: tuple[int, ...]


def paged_cache(seed: int, lens, hkv, d, bs, dtype) -> Paged:
    """A cache holding random K/V for sequences of ``lens`` tokens in permuted blocks. Slots past
    each context and all spare pages are NaN; block-table entries past a sequence's blocks point
    at a NaN page (never to be read)."""
    rng = np.random.default_rng(seed)
    nblk = [max(1, -(-L // bs)) for L in lens]
    used = sum(nblk)
    spare = max(2, used // 8)
    nb = used + spare
    perm = rng.permutation(nb).astype(np.int32)
    mb = max(nblk)
    bt = np.full((len(lens), mb), perm[used], np.int32)
    valid = np.zeros((nb, bs), bool)
    off = 0
    for i, L in enumerate(lens):
        pages = perm[off : off + nblk[i]]
        off += nblk[i]
        bt[i, : nblk[i]] = pages
        counts = np.clip(L - np.arange(nblk[i]) * bs, 0, bs)
        valid[pages] = np.arange(bs)[None, :] < counts[:, None]
    dt = jnp.dtype(dtype)
    kk, kv = jax.random.split(jax.random.key(seed))
    mask = jnp.asarray(valid)[:, None, :, None]
    k = jnp.where(mask, jax.random.normal(kk, (nb, hkv, bs, d), dt), jnp.nan).astype(dt)
    v = jnp.where(mask, jax.random.normal(kv, (nb, hkv, bs, d), dt), jnp.nan).astype(dt)
    return Paged(
        make_cache(k, v), jnp.asarray(bt), jnp.asarray(np.array(lens, np.int32)), bt, tuple(lens)
    )


def contiguous_kv(p: Paged, i: int):
    """K, V of sequence ``i`` as contiguous ``[L, Hkv, D]`` arrays gathered from the cache."""
    L = p.lens[i]
    nb = -(-L // p.cache.k.shape[2])
    idx = jnp.asarray(p.bt_np[i, :nb])

    def g(pages):
        _, hkv, _, d = pages.shape
        x = pages[idx].transpose(0, 2, 1, 3)  # [nb, BS, Hkv, D]
        return x.reshape(-1, hkv, d)[:L]

    return g(p.cache.k), g(p.cache.v)


# ---------------------------------------------------------------------------------------------
# Decode


def naive_paged_decode(q, k_pages, v_pages, block_tables, context_lens, *, scale):
    """What a JAX user writes by hand: gather every page, masked softmax (PERF.md's peer)."""
    s, h, d = q.shape
    _, hkv, bs, _ = k_pages.shape
    mb = block_tables.shape[1]
    k = k_pages[block_tables].transpose(0, 2, 1, 3, 4).reshape(s, hkv, mb * bs, d)
    v = v_pages[block_tables].transpose(0, 2, 1, 3, 4).reshape(s, hkv, mb * bs, d)
    mask = (jnp.arange(mb * bs)[None, :] < context_lens[:, None])[:, None, None, :]
    qg = q.reshape(s, hkv, h // hkv, d)
    logits = jnp.einsum("skgd,sktd->skgt", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    p = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    v = jnp.where(mask[:, :, 0, :, None], v, 0)
    out = jnp.einsum("skgt,sktd->skgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(s, h, d).astype(q.dtype)


def bench_decode(ctx: Ctx, shape: S.DecodeShape) -> None:
    jpa = _jpa()
    group, dt = "decode", shape.dtype
    H, Hkv, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    scale = 1.0 / math.sqrt(D)
    work = {"bytes": shape.kv_bytes, "flops": shape.flops}
    nsets = num_sets(ctx, shape.kv_bytes)
    ctx.log(
        f"decode {shape.name}: building {nsets} input set(s), "
        f"{shape.kv_bytes / 2**20:.1f} MiB of K+V each"
    )
    sets = []
    for i in range(nsets):
        p = paged_cache(100 + i, shape.context_lens, Hkv, D, shape.block_size, dt)
        q = jax.random.normal(jax.random.key(200 + i), (shape.num_seqs, H, D), jnp.dtype(dt))
        sets.append((q, p))
    api_sets = [(q, p.cache, p.block_tables, p.context_lens) for q, p in sets]

    fns = {
        b: jax.jit(functools.partial(jpa.paged_decode, **api_kw(ctx, b)))
        for b in set(ctx.args.backends) | {"xla"}
    }
    ref = {}
    try:
        ref["out"] = np.asarray(jax.block_until_ready(fns["xla"](*api_sets[0])), np.float32)
    except Exception as e:
        ref["error"] = err_line(e)
        ctx.log(f"decode {shape.name}: xla reference failed: {ref['error']}")

    def check(out, to_np=np.asarray):
        if "out" not in ref:
            return {"ok": None, "error": "no reference: " + ref["error"]}
        return dict(compare(to_np(out), ref["out"], dt), ref="xla backend")

    peer = NAMED_PEER["decode"]
    for b in ctx.args.backends:
        row = new_row(group, shape, b, "ours", "TB/s", peer=peer, work=work, config=api_kw(ctx, b))
        run_row(ctx, row, fns[b], api_sets, check=None if b == "xla" else check, work_key="bytes")
    if ctx.args.no_peers:
        return

    q0, p0 = sets[0]
    # Peer: the hand-written XLA gather + softmax over the same paged cache.
    row = new_row(group, shape, "xla_gather_softmax", "peer", "TB/s", peer=peer, work=work)
    naive = jax.jit(functools.partial(naive_paged_decode, scale=scale))
    run_row(
        ctx,
        row,
        naive,
        [(q, p.cache.k, p.cache.v, p.block_tables, p.context_lens) for q, p in sets],
        check=check,
        work_key="bytes",
    )

    # Peer: jax.experimental.pallas.ops.gpu.paged_attention ([Hkv, NB, BS, D] pages, no scale).
    row = new_row(group, shape, "pallas_paged_attention", "peer", "TB/s", peer=peer, work=work)
    if not (ctx.on_gpu or ctx.args.interpret_peers):
        skip(ctx, row, "needs a CUDA GPU (Triton)")
    else:
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as pa

            psets = [
                (
                    (q * scale).astype(q.dtype),
                    p.cache.k.transpose(1, 0, 2, 3),
                    p.cache.v.transpose(1, 0, 2, 3),
                    p.block_tables,
                    p.context_lens,
                )
                for q, p in sets
            ]
            pages = p0.bt_np.shape[1]
            ks_opts = (1, 2, 4) if ctx.args.quick else (4, 8, 16, 32)
            ppcb_opts = (1, 2) if ctx.args.quick else (4, 8, 16)
            cands = []
            for ks in ks_opts:
                for ppcb in ppcb_opts:
                    if pages % ks or (pages // ks) % min(ppcb, pages // ks):
                        continue
                    cands.append(
                        (
                            {"k_splits": ks, "pages_per_compute_block": ppcb},
                            functools.partial(
                                pa.paged_attention,
                                k_splits=ks,
                                pages_per_compute_block=ppcb,
                                interpret=ctx.args.interpret_peers,
                            ),
                        )
                    )
            tune_and_run(ctx, row, cands, psets, check=check, work_key="bytes")
            del psets
        except Exception as e:
            row.update(status="error", error=err_line(e))
            ctx.add(row)

    # Contiguous-KV peers: K, V as [S, L, Hkv, D].
    def contig(p):
        ks, vs = zip(*(contiguous_kv(p, i) for i in range(shape.num_seqs)))
        return jnp.stack(ks), jnp.stack(vs)

    csets = [(q[:, None],) + contig(p) for q, p in sets]

    def check4(out):
        return check(np.asarray(out, np.float32)[:, 0])

    for impl in ("cudnn", "xla_dpa"):
        row = new_row(
            group,
            shape,
            impl,
            "peer",
            "TB/s",
            peer=peer,
            work=work,
            config={"layout": "contiguous [S, L, Hkv, D]"},
        )
        if impl == "cudnn" and not ctx.on_gpu:
            skip(ctx, row, "needs a CUDA GPU (cuDNN)")
            continue
        f = jax.jit(
            functools.partial(jax.nn.dot_product_attention, implementation=impl.replace("_dpa", ""))
        )
        run_row(ctx, row, f, csets, check=check4, work_key="bytes")

    row = new_row(
        group,
        shape,
        "torch_sdpa",
        "peer",
        "TB/s",
        peer=peer,
        work=work,
        config={"layout": "contiguous [S, Hkv, L, D]"},
    )
    _torch_sdpa(
        ctx,
        row,
        csets,
        causal=False,
        check=lambda o: check(_torch_np(o)[:, :, 0]),
        work_key="bytes",
    )
    del csets, sets, api_sets


def _torch_sdpa(ctx, row, jsets, *, causal, check, work_key):
    """torch SDPA on ``[B, L, H, D]`` JAX inputs, converted to ``[B, H, L, D]`` torch tensors."""
    torch = ctx.torch
    if torch is None:
        return skip(
            ctx,
            row,
            "--no-torch"
            if ctx.args.no_torch
            else ("torch not importable / no CUDA" if ctx.on_gpu else "needs a CUDA GPU"),
        )
    try:
        import torch.nn.functional as F

        tsets = [tuple(_to_torch(ctx, x.transpose(0, 2, 1, 3)) for x in s) for s in jsets]
        group = tsets[0][0].shape[1] // tsets[0][1].shape[1]

        def f(q, k, v, gqa=group > 1):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        cands = [({"enable_gqa": group > 1}, f)]
        if group > 1:  # SDPA's GQA may not reach the flash kernel: also try KV repeated
            rsets = [
                (q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
                for q, k, v in tsets
            ]
            cands.append(
                (
                    {"enable_gqa": False, "kv": "repeated to H heads"},
                    functools.partial(f, gqa=False),
                    rsets,
                )
            )
        r = tune_and_run(
            ctx, row, cands, tsets, sync=_torch_sync(torch), check=check, work_key=work_key
        )
        del tsets, cands
        torch.cuda.empty_cache()
        return r
    except Exception as e:
        row.update(status="error", error=err_line(e))
        return ctx.add(row)


# ---------------------------------------------------------------------------------------------
# Prefill / mixed (paged_attention)


def check_windows(shape: S.AttentionShape, m: int):
    """Row windows checked per sequence: ``(seq, j0, j1)``, head and tail of each chunk."""
    out = []
    for i, (c, n) in enumerate(shape.seqs):
        if n <= 2 * m:
            out.append((i, 0, n))
        else:
            out += [(i, 0, m), (i, n - m, n)]
    return out


def bench_attention(ctx: Ctx, shape: S.AttentionShape, group: str) -> None:
    jpa = _jpa()
    dt = shape.dtype
    H, Hkv, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    scale = 1.0 / math.sqrt(D)
    work = {"flops": shape.flops, "bytes": shape.kv_bytes}
    T = shape.num_tokens
    nsets = num_sets(ctx, shape.kv_bytes + 2 * T * H * D * S.itemsize(dt))
    ctx.log(
        f"{group} {shape.name}: {len(shape.seqs)} seq(s), {T} query tokens, "
        f"{shape.flops / 1e12:.4g} TFLOP, {nsets} input set(s)"
    )
    cu = np.concatenate([[0], np.cumsum([n for _, n in shape.seqs])]).astype(np.int32)
    sets = []
    for i in range(nsets):
        p = paged_cache(300 + i, shape.context_lens, Hkv, D, shape.block_size, dt)
        q = jax.random.normal(jax.random.key(400 + i), (T, H, D), jnp.dtype(dt))
        meta = jpa.AttentionMetadata(p.block_tables, p.context_lens, jnp.asarray(cu))
        sets.append((q, p, meta))
    api_sets = [(q, p.cache, meta) for q, p, meta in sets]
    fns = {
        b: jax.jit(functools.partial(jpa.paged_attention, **api_kw(ctx, b)))
        for b in set(ctx.args.backends) | {"xla"}
    }

    # The reference rows: windows at the head and tail of each sequence, by the xla backend.
    q0, p0, meta0 = sets[0]
    wins = check_windows(shape, CHECK_WINDOW)
    idx = np.concatenate([cu[i] + np.arange(j0, j1) for i, j0, j1 in wins])
    ref = {}
    try:
        if len(idx) == T and np.array_equal(idx, np.arange(T)):
            r = fns["xla"](*api_sets[0])
        else:
            sub_cu = np.concatenate([[0], np.cumsum([j1 - j0 for _, j0, j1 in wins])])
            sub_meta = jpa.AttentionMetadata(
                jnp.asarray(p0.bt_np[[i for i, _, _ in wins]]),
                jnp.asarray(np.array([shape.seqs[i][0] + j1 for i, _, j1 in wins], np.int32)),
                jnp.asarray(sub_cu.astype(np.int32)),
            )
            r = jax.jit(functools.partial(jpa.paged_attention, backend="xla"))(
                q0[jnp.asarray(idx)], p0.cache, sub_meta
            )
        ref["out"] = np.asarray(jax.block_until_ready(r), np.float32)
    except Exception as e:
        ref["error"] = err_line(e)
        ctx.log(f"{group} {shape.name}: xla reference failed: {ref['error']}")

    def check(out_np_rows):
        if "out" not in ref:
            return {"ok": None, "error": "no reference: " + ref["error"]}
        return dict(
            compare(out_np_rows, ref["out"], dt), ref="xla backend", rows_checked=int(len(idx))
        )

    peer = NAMED_PEER["mixed"] if not shape.is_prefill else NAMED_PEER[group]
    for b in ctx.args.backends:
        row = new_row(
            group, shape, b, "ours", "TFLOP/s", peer=peer, work=work, config=api_kw(ctx, b)
        )
        run_row(
            ctx,
            row,
            fns[b],
            api_sets,
            work_key="flops",
            check=None if b == "xla" else (lambda o: check(np.asarray(o, np.float32)[idx])),
        )
    if ctx.args.no_peers:
        return
    if not shape.is_prefill:
        ctx.log(
            f"{group} {shape.name}: no contiguous peer computes this mask (bottom-right "
            f"causal, q shorter than kv); peers skipped"
        )
        return

    L = shape.seq_len
    csets = []
    for q, p, _ in sets:
        k, v = contiguous_kv(p, 0)
        csets.append((q[None], k[None], v[None]))  # [1, L, H|Hkv, D]

    def check4(out):
        return check(np.asarray(out, np.float32).reshape(L, H, D)[idx])

    for impl in ("cudnn", "xla_dpa"):
        row = new_row(
            group,
            shape,
            impl,
            "peer",
            "TFLOP/s",
            peer=peer,
            work=work,
            config={"layout": "contiguous [1, L, H, D]", "is_causal": True},
        )
        if impl == "cudnn" and not ctx.on_gpu:
            skip(ctx, row, "needs a CUDA GPU (cuDNN)")
            continue
        if impl == "xla_dpa" and group == "sweep" and L > 8192 and not ctx.args.quick:
            skip(
                ctx,
                row,
                f"O(L^2) logits ({H * L * L * 4 / 2**30:.0f} GiB f32) and ~44 "
                "TFLOP/s at 8k: seconds per call, not measured past 8k",
            )
            continue
        f = jax.jit(
            functools.partial(
                jax.nn.dot_product_attention,
                is_causal=True,
                implementation=impl.replace("_dpa", ""),
            )
        )
        run_row(ctx, row, f, csets, check=check4, work_key="flops")

    # Pallas Triton flash attention (no GQA: KV repeated to H heads outside the timing).
    row = new_row(
        group,
        shape,
        "pallas_triton_mha",
        "peer",
        "TFLOP/s",
        peer=peer,
        work=work,
        config={"layout": "contiguous, KV repeated to H heads"},
    )
    if not (ctx.on_gpu or ctx.args.interpret_peers):
        skip(ctx, row, "needs a CUDA GPU (Triton)")
    else:
        try:
            from jax.experimental.pallas.ops.gpu import attention as mha_mod

            rsets = [
                (q, jnp.repeat(k, H // Hkv, axis=2), jnp.repeat(v, H // Hkv, axis=2))
                for q, k, v in csets
            ]
            interp = ctx.args.interpret_peers

            def f(q, k, v):  # positional: mha is a custom_vjp with nondiff_argnums
                return mha_mod.mha(q, k, v, None, scale, True, interpret=interp)

            run_row(ctx, row, f, rsets, check=check4, work_key="flops")
            del rsets
        except Exception as e:
            row.update(status="error", error=err_line(e))
            ctx.add(row)

    # Pallas Mosaic GPU FA3 (attention_mgpu): no scale argument, so q is pre-scaled; its shared
    # memory buffers are float16 (hard-coded), so it runs on float16 copies (as in PERF.md).
    row = new_row(
        group,
        shape,
        "pallas_mosaic_fa3",
        "peer",
        "TFLOP/s",
        peer=peer,
        work=work,
        config={"layout": "contiguous [1, L, H, D]", "q": "pre-scaled", "dtype": "float16"},
    )
    if not ctx.on_gpu:
        skip(ctx, row, "needs a Hopper GPU (Mosaic GPU)")
    else:
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

            f16 = jnp.float16
            msets = [((q * scale).astype(f16), k.astype(f16), v.astype(f16)) for q, k, v in csets]
            cands = []
            for bq, bkv in ((64, 256), (64, 128), (64, 64), (128, 128)):
                if L % bkv or L % (2 * bq):  # two compute warpgroups of block_q rows each
                    continue
                cfg = fa3.TuningConfig(
                    block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=True
                )
                cands.append(
                    (
                        {"block_q": bq, "block_kv": bkv, "max_concurrent_steps": 2},
                        jax.jit(lambda q, k, v, cfg=cfg: fa3.attention(q, k, v, cfg)),
                    )
                )
            tune_and_run(ctx, row, cands, msets, check=check4, work_key="flops")
            del msets
        except Exception as e:
            row.update(status="error", error=err_line(e))
            ctx.add(row)

    row = new_row(
        group,
        shape,
        "torch_sdpa",
        "peer",
        "TFLOP/s",
        peer=peer,
        work=work,
        config={"layout": "contiguous [1, H, L, D]", "is_causal": True},
    )
    _torch_sdpa(
        ctx,
        row,
        csets,
        causal=True,
        check=lambda o: check(_torch_np(o)[0].transpose(1, 0, 2)[idx]),
        work_key="flops",
    )
    del csets, sets, api_sets


# ---------------------------------------------------------------------------------------------
# MoE


def bench_moe(ctx: Ctx, shape: S.MoEShape) -> None:
    jpa = _jpa()
    dt = jnp.dtype(shape.dtype)
    T, E, K, Hd, I = shape.num_tokens, shape.num_experts, shape.top_k, shape.hidden, shape.inter
    wbytes_all = E * shape.expert_bytes
    nsets = num_sets(ctx, wbytes_all + T * Hd * dt.itemsize)
    ctx.log(
        f"moe {shape.name}: {T} tokens, top-{K} of {E}, Hd {Hd}, I {I}, "
        f"{wbytes_all / 2**30:.3g} GiB of weights, {nsets} input set(s)"
    )
    sets = []
    for i in range(nsets):
        k1, k2, k3, k4 = jax.random.split(jax.random.key(500 + i), 4)
        x = jax.random.normal(k1, (T, Hd), dt)
        wgu = (jax.random.normal(k2, (E, Hd, 2 * I), dt) * (1 / math.sqrt(Hd))).astype(dt)
        wd = (jax.random.normal(k3, (E, I, Hd), dt) * (1 / math.sqrt(I))).astype(dt)
        logits = jax.random.normal(k4, (T, E), jnp.float32)
        w, ids = jpa.moe_topk(logits, K)
        sets.append((x, wgu, wd, w, ids))
    ids0 = np.asarray(sets[0][4])
    touched = int(np.unique(ids0[(ids0 >= 0) & (ids0 < E)]).size)
    work = {"flops": shape.flops, "bytes": shape.weight_bytes(touched), "experts_touched": touched}
    metric, key, sc = ("TB/s", "bytes", 1e12) if shape.decode else ("TFLOP/s", "flops", 1e12)

    fns = {
        b: jax.jit(functools.partial(jpa.fused_moe, activation=shape.activation, **api_kw(ctx, b)))
        for b in set(ctx.args.backends) | {"xla"}
    }
    ref = {}
    try:
        ref["out"] = np.asarray(jax.block_until_ready(fns["xla"](*sets[0])), np.float32)
    except Exception as e:
        ref["error"] = err_line(e)
        ctx.log(f"moe {shape.name}: xla reference failed: {ref['error']}")

    def check(out):
        if "out" not in ref:
            return {"ok": None, "error": "no reference: " + ref["error"]}
        return dict(compare(out, ref["out"], shape.dtype), ref="xla backend")

    for b in ctx.args.backends:
        row = new_row(
            "moe",
            shape,
            b,
            "ours",
            metric,
            peer=NAMED_PEER["moe"],
            work=work,
            config=dict(
                api_kw(ctx, b),
                activation=shape.activation,
                routing="moe_topk softmax, excluded from the timing",
            ),
        )
        run_row(ctx, row, fns[b], sets, check=None if b == "xla" else check, work_key=key, scale=sc)
    if ctx.args.no_peers:
        return

    # Peers: the two grouped GEMMs on expert-sorted rows (sorting/gather outside the timing).
    gsets = []
    for i, (x, wgu, wd, w, ids) in enumerate(sets):
        flat = np.asarray(ids).reshape(-1)
        order = np.argsort(flat, kind="stable")
        gs = jnp.asarray(np.bincount(flat, minlength=E).astype(np.int32))
        xs = x[jnp.asarray(order // K)]
        a = jax.random.normal(jax.random.key(600 + i), (T * K, I), dt)
        gsets.append({"gate_up": (xs, wgu, gs), "down": (a, wd, gs)})
    gemm_w = {"gate_up": touched * Hd * 2 * I * dt.itemsize, "down": touched * I * Hd * dt.itemsize}
    lax_fn = jax.jit(lambda lhs, rhs, g: lax.ragged_dot(lhs, rhs, g))
    for gemm in ("gate_up", "down"):
        gwork = {"flops": shape.gemm_flops[gemm], "bytes": gemm_w[gemm], "experts_touched": touched}
        args = [s[gemm] for s in gsets]
        gref = {}

        def keep(out, gref=gref):
            gref["out"] = np.asarray(out, np.float32)

        row = new_row(
            "moe",
            shape,
            f"lax_ragged_dot:{gemm}",
            "peer",
            metric,
            work=gwork,
            config={"gemm": gemm},
        )
        run_row(
            ctx, row, lax_fn, args, check=lambda o, keep=keep: keep(o) or {}, work_key=key, scale=sc
        )

        def gcheck(out, gref=gref):
            if "out" not in gref:
                return {"ok": None, "error": "no lax.ragged_dot output"}
            return dict(compare(out, gref["out"], shape.dtype), ref="lax.ragged_dot")

        row = new_row(
            "moe",
            shape,
            f"mgpu_ragged_dot:{gemm}",
            "peer",
            metric,
            work=gwork,
            peer=f"lax_ragged_dot:{gemm}",
            config={"gemm": gemm},
        )
        if not ctx.on_gpu:
            skip(ctx, row, "needs a Hopper GPU (Mosaic GPU)")
            continue
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rdm

            n_out = args[0][1].shape[2]
            k_in = args[0][1].shape[1]
            cands = []
            for bm, bn, bk, steps, gbn in (
                (128, 128, 64, 4, 1),
                (128, 256, 64, 3, 1),
                (64, 128, 64, 4, 1),
                (128, 128, 64, 4, 4),
            ):
                if n_out % (bn * gbn) or k_in % bk:
                    continue
                cfg = {
                    "block_m": bm,
                    "block_n": bn,
                    "block_k": bk,
                    "max_concurrent_steps": steps,
                    "grid_block_n": gbn,
                }
                cands.append(
                    (
                        cfg,
                        jax.jit(
                            lambda lhs, rhs, g, cfg=cfg: rdm.ragged_dot(
                                lhs, rhs, group_sizes=g, **cfg
                            )
                        ),
                    )
                )
            # If no bfloat16 configuration runs, the same configurations on float16 copies.
            f16 = [(x.astype(jnp.float16), w.astype(jnp.float16), g) for x, w, g in args[:1]]
            fb = [(dict(c, dtype="float16"), fn, f16) for c, fn in cands]
            tune_and_run(ctx, row, cands, args, check=gcheck, work_key=key, scale=sc, fallback=fb)
        except Exception as e:
            row.update(status="error", error=err_line(e))
            ctx.add(row)
    del sets, gsets


# ---------------------------------------------------------------------------------------------
# KV write


def bench_kv_write(ctx: Ctx, shape: S.KVWriteShape) -> None:
    jpa = _jpa()
    dt = jnp.dtype(shape.dtype)
    T, Hkv, D, BS, NB = (
        shape.num_tokens,
        shape.num_kv_heads,
        shape.head_dim,
        shape.block_size,
        shape.num_blocks,
    )
    work = {"bytes": shape.bytes}
    nsets = num_sets(ctx, shape.bytes)
    ctx.log(f"kv_write {shape.name}: {T} tokens into {NB} blocks, {nsets} input set(s)")
    kc1, kc2 = jax.random.split(jax.random.key(700))
    cache0 = make_cache(
        jax.random.normal(kc1, (NB, Hkv, BS, D), dt), jax.random.normal(kc2, (NB, Hkv, BS, D), dt)
    )
    sets = []
    for i in range(nsets):
        rng = np.random.default_rng(800 + i)
        blocks = rng.permutation(NB)[: -(-T // BS)]
        slots = (blocks[np.arange(T) // BS] * BS + np.arange(T) % BS).astype(np.int32)
        k1, k2 = jax.random.split(jax.random.key(900 + i))
        sets.append(
            (
                jax.random.normal(k1, (T, Hkv, D), dt),
                jax.random.normal(k2, (T, Hkv, D), dt),
                jnp.asarray(slots),
            )
        )
    ref = {}
    try:
        r = jax.jit(functools.partial(jpa.write_kv, backend="xla"))(cache0, *sets[0])
        ref["k"], ref["v"] = r.k, r.v
        del r
    except Exception as e:
        ref["error"] = err_line(e)

    def check(out):
        """Every element of the cache, written or not, equals the xla backend's (on device)."""
        if "k" not in ref:
            return {"ok": None, "error": "no reference: " + ref["error"]}
        bad = int(jnp.sum(out.k != ref["k"]) + jnp.sum(out.v != ref["v"]))
        return {
            "ok": bad == 0,
            "mismatched_elements": bad,
            "rel_err": bad / (2 * ref["k"].size),
            "ref": "xla backend, exact",
        }

    for b in ctx.args.backends:
        row = new_row(
            "kv_write",
            shape,
            b,
            "ours",
            "TB/s",
            peer=NAMED_PEER["kv_write"],
            work=work,
            config=dict(api_kw(ctx, b), donate_argnums=0),
        )
        f = jax.jit(functools.partial(jpa.write_kv, **api_kw(ctx, b)), donate_argnums=0)
        # In place? The donated input buffer must be consumed and reused for the output.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = jax.tree_util.tree_map(jnp.copy, cache0)
                ptr = c.k.unsafe_buffer_pointer()
                out = f(c, *sets[0])
                jax.block_until_ready(out)
                row["in_place"] = bool(c.k.is_deleted() and out.k.unsafe_buffer_pointer() == ptr)
                del c, out
        except Exception as e:
            row["in_place"] = None
            row["in_place_error"] = err_line(e)
        state = [jax.tree_util.tree_map(jnp.copy, cache0)]

        def step(k, v, s, f=f, state=state):
            state[0] = f(state[0], k, v, s)
            return state[0]

        run_row(ctx, row, step, sets, check=None if b == "xla" else check, work_key="bytes")
        del state
    del cache0, sets


# ---------------------------------------------------------------------------------------------
# Table and main


def table(ctx: Ctx) -> str:
    head = ["group", "shape", "impl", "status", "ms", "value", "%ceil", "x peer", "rel err"]
    lines = []
    for r in ctx.rows:
        if r["status"] in ("ok", "invalid"):
            val = f"{r['value']:.4g} {r['metric']}"
            ms = f"{r['time_s'] * 1e3:.4g}"
            fc = "" if r.get("frac_of_ceiling") is None else f"{100 * r['frac_of_ceiling']:.1f}"
            rp = "" if r.get("ratio_to_peer") is None else f"{r['ratio_to_peer']:.2f} ({r['peer']})"
            chk = r.get("check") or {}
            err = "" if chk.get("rel_err") is None else f"{chk['rel_err']:.1e}"
            st = r["status"] if r["status"] == "ok" else "INVALID"
        else:
            val = ms = fc = rp = err = ""
            st = r["status"] + (f": {r['error'][:60]}" if r.get("error") else "")
        lines.append([r["group"], r["shape"], r["impl"], st, ms, val, fc, rp, err])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*ln) for ln in lines]
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--only", default=",".join(S.GROUPS), help=f"comma-separated groups of {S.GROUPS}"
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


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = Ctx(args)
    ctx.log(
        f"device {ctx.device} ({ctx.platform}), jax {jax.__version__}, "
        f"torch {ctx.meta['torch_version']}; groups {args.only}; backends {args.backends}; "
        f"json {args.json}"
    )
    try:
        _jpa()
    except Exception as e:
        ctx.log(f"jax_paged_attn not importable: {err_line(e)}")
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
                if g == "decode":
                    bench_decode(ctx, shape)
                elif g in ("prefill", "sweep"):
                    bench_attention(ctx, shape, g)
                elif g == "moe":
                    bench_moe(ctx, shape)
                elif g == "kv_write":
                    bench_kv_write(ctx, shape)
            except Exception as e:  # a setup failure: record it, go on with the next shape
                row = new_row(g, shape, "setup", "ours", "", work={})
                row.update(status="error", error=err_line(e))
                ctx.add(row)
            gc.collect()
            if ctx.torch is not None:
                ctx.torch.cuda.empty_cache()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
