"""The benchmark harness: the run context, rows, the JSON file, output checks and the table.

A row is a dict (see :func:`new_row`) that ends with a status: ``ok``, ``invalid`` (timed, but
its output was wrong), ``error``, ``not_implemented`` or ``skipped`` (with the reason in
``error``). :func:`run_row` times one row (:func:`benchmarks.timing.measure`), checks the first
call's output, and records the row: the JSON is rewritten after every row, so a killed run keeps
what it measured. :func:`tune_and_run` picks a configurable peer's best configuration first.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import shapes as S
from benchmarks import timing

DEFAULT_BACKENDS = ("xla", "triton", "mosaic")

# The named peer of each group (the goals are ratios to these, measured in the same run).
NAMED_PEER = {
    "decode": "pallas_paged_attention",
    "prefill": "cudnn",
    "sweep": "cudnn",
    "mixed": None,
    "moe": "xla",
    "kv_write": "xla",
}

COUNTING = {
    "decode_TB/s": "2 * sum(context_lens) * Hkv * D * itemsize / time",
    "prefill_TFLOP/s": "4 * sum(visible q.k pairs) * D * H / time",
    "moe_TFLOP/s": "2 * T * k * (Hd * 2I + I * Hd) / time",
    "moe_TB/s": "distinct routed experts * 3 * Hd * I * itemsize / time",
    "kv_write_TB/s": "4 * T * Hkv * D * itemsize (read + write) / time",
    "copy_TB/s": "2 * nbytes (read + write) / time",
    "matmul_TFLOP/s": "2 * n^3 / time",
}


class Ctx:
    """One run: its arguments, rows, ceilings and metadata; writes the JSON after each row."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.ceilings: dict = {}
        self.platform = jax.default_backend()
        self.on_gpu = self.platform in ("gpu", "cuda")
        dev = jax.devices()[0]
        self.device = getattr(dev, "device_kind", str(dev))
        self.torch = import_torch() if (self.on_gpu and not args.no_torch) else None
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
            "counting": dict(COUNTING),
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

    def torch_missing(self) -> str:
        """Why there is no torch in this run (the reason of a skipped torch row)."""
        if self.args.no_torch:
            return "--no-torch"
        return "torch not importable / no CUDA" if self.on_gpu else "needs a CUDA GPU"


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


def import_torch():
    """torch when it is importable and sees a CUDA device, else None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch
    except Exception:
        return None


def jpa():
    """The public API (imported late: a broken import is reported by the run, not a crash)."""
    import jax_paged_attn

    return jax_paged_attn


def api_kw(ctx: Ctx, backend: str) -> dict:
    """Keyword arguments of a public API call for ``backend`` (``--interpret``: kernel backends
    run under the Pallas interpreter, a CPU test of the plumbing; times are meaningless)."""
    kw = {"backend": backend}
    if ctx.args.interpret and backend not in ("xla", "auto"):
        kw["interpret"] = True
    return kw


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
    """Fills each row's fraction of ceiling and ratio to its named peer."""
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


def compare(out, ref, dtype: str) -> dict:
    """Relative L2 error of ``out`` against ``ref``; any NaN in ``out`` (or ``ref``) fails."""
    o = np.asarray(out, np.float32)
    r = np.asarray(ref, np.float32)
    nan = int(np.isnan(o).sum())
    diff = np.where(np.isnan(o), np.inf, o - r)
    denom = float(np.linalg.norm(r)) or 1.0
    rel = float(np.linalg.norm(diff) / denom) if o.size else 0.0
    max_abs = float(np.max(np.abs(diff))) if o.size else 0.0
    tol = tolerance(dtype)
    ok = nan == 0 and bool(np.isfinite(rel)) and rel <= tol and not np.isnan(r).any()
    return {"rel_err": rel, "max_abs_err": max_abs, "nan_count": nan, "tol": tol, "ok": bool(ok)}


def tolerance(dtype) -> float:
    """Relative L2 error allowed for outputs of ``dtype``: the test kit's tolerance table
    (``jax_paged_attn.testing.TOLERANCE``; 2e-2 for a dtype it does not list)."""
    from jax_paged_attn.testing import TOLERANCE

    entry = TOLERANCE.get(jnp.dtype(dtype))
    return entry["rel"] if entry else 2e-2


def measure(
    ctx: Ctx, fn, arg_sets, sync=timing.jax_sync, *, on_first=None, iters=None, warmup=None
):
    """:func:`benchmarks.timing.measure` with the run's settings (device time on a GPU unless
    ``--timing wall``; torch calls are recognised by their sync)."""
    a = ctx.args
    torch_call = sync is not timing.jax_sync
    return timing.measure(
        fn,
        arg_sets,
        iters=a.iters if iters is None else iters,
        warmup=a.warmup if warmup is None else warmup,
        min_sample_s=a.min_sample_s,
        max_row_s=a.max_row_s,
        sync=sync,
        on_first=on_first,
        device_calls=a.device_calls if (a.timing == "device" and ctx.on_gpu) else 0,
        torch=ctx.torch if torch_call else None,
    )


def skip(ctx: Ctx, row: dict, why: str) -> dict:
    row.update(status="skipped", error=why)
    return ctx.add(row)


def fail(ctx: Ctx, row: dict, e: BaseException) -> dict:
    row.update(status="error", error=err_line(e))
    return ctx.add(row)


def run_row(
    ctx: Ctx,
    row: dict,
    fn,
    arg_sets,
    *,
    sync=timing.jax_sync,
    check=None,
    work_key=None,
    scale=1e12,
    iters=None,
) -> dict:
    """Measures one row and records it; never raises."""
    if ctx.over_budget():
        return skip(ctx, row, f"time budget of {ctx.args.budget_s}s spent")
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
            res = measure(ctx, fn, arg_sets, sync, on_first=on_first, iters=iters)
    except NotImplementedError as e:
        row.update(status="not_implemented", error=err_line(e))
        return ctx.add(row)
    except Exception as e:
        return fail(ctx, row, e)
    finally:
        gc.collect()
    row.update(res)
    row["check"] = checked or None
    work = row["work"][work_key]
    row["value"] = work / res["time_s"] / scale
    row["status"] = "invalid" if checked.get("ok") is False else "ok"
    return ctx.add(row)


def tune_and_run(
    ctx: Ctx,
    row: dict,
    candidates,
    arg_sets,
    *,
    sync=timing.jax_sync,
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
        return skip(ctx, row, f"time budget of {ctx.args.budget_s}s spent")
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


def reference_check(ref: dict, dtype: str, what: str = "xla backend"):
    """A check of an output against ``ref["out"]`` (or, when the reference failed, a check that
    says so: ``ref["error"]``). Returns ``check(out_np) -> dict``."""

    def check(out):
        if "out" not in ref:
            return {"ok": None, "error": "no reference: " + ref.get("error", "none")}
        return dict(compare(out, ref["out"], dtype), ref=what)

    return check


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
