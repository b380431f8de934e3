"""The model zoo: attention layers of real models through the public API, one run.

    python -m benchmarks.zoo [--models a,b] [--backends mosaic,triton,auto] [--budget-s S]
                             [--json PATH] [--plot PATH] [--smoke] [--all] [--resume]
                             [--entries decode,serving,chunked,prefill] [--plan]

Layers, batch points and the order of the cases: ``benchmarks/zoo_models.py``. Each case is
timed for every backend through ``paged_decode`` / ``paged_attention`` (decode rows through
both: ``decode`` and ``decode_pa``, a decode-only batch with ``cu_seqlens_q = arange``); a
serving step is timed as one ``paged_attention`` call (``serving``), as its chunk alone
(``serving_chunk``) and its decode rows alone through ``paged_decode`` (``serving_decode``),
and as the best two-call split (the fastest valid chunk call then the fastest valid decode
call, back to back: the ``split`` row of ``serving``). Prefill rows have peers on contiguous
KV: cuDNN (``jax.nn.dot_product_attention``, its sliding window where the layer has one) and
torch SDPA (no window); a peer that cannot express the layer's softcap or sinks runs without
them, says so in ``config.omits``, and is checked against a reference without them.

Correct first: before a row is timed, its output is compared with the xla backend run in
float32 on the same inputs (pages gathered and upcast), on a window of rows (up to 8 decode
rows; 128 rows at the head and tail of each prefill chunk); a wrong result marks the row
``invalid``. A row that raises is recorded with its error and the run goes on. Timing, the
JSON (rewritten after every row), the progress lines and the ceilings are those of
``benchmarks/run.py`` (``benchmarks/harness.py``, ``benchmarks/timing.py``, device time on a
GPU); the copy and matmul ceilings are measured first, in the same run.

Per case and entry the summary (``zoo_summary`` in the JSON, the table at the end) gives each
backend's figure (decode: TB/s of K and V of the visible keys, and the fraction of the copy
ceiling; prefill: TFLOP/s on visible pairs, and the ratio to cuDNN and torch SDPA; serving:
one-call time / split time), the best backend, and ``auto_vs_best`` (auto's time / the best
backend's; the goal is <= 1.03). ``--budget-s`` skips a case whose estimated cost no longer
fits (recorded as skipped, with the reason); ``--resume`` reads the JSON of an earlier run
at ``--json`` (on a machine whose output folder starts empty, copy it there first), keeps its
finished cases and runs the rest (those rows keep their own run's ceilings); a case that the
earlier process died in (crash, hang, time limit) is recorded as an error, not run again.
``--plan`` lists the selected cases with their estimated cost; ``--all`` selects every point,
serving mix, chunked prefill and block size of every layer (several calls with ``--resume``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import peers, timing  # noqa: E402
from benchmarks import zoo_models as Z  # noqa: E402
from benchmarks.attention import (  # noqa: E402
    CHECK_WINDOW,
    check_windows,
    contiguous_kv,
    paged_cache,
)
from benchmarks.ceilings import bench_ceilings  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Ctx,
    _json_default,
    api_kw,
    compare,
    err_line,
    jpa,
    new_row,
    run_row,
    skip,
)
from benchmarks.zoo_report import best_of, summarize, table  # noqa: E402

ENTRIES = ("decode", "serving", "chunked", "prefill")
CHECK_SEQS = 8  # decode rows (sequences) checked per case
# Estimated seconds per case on an H200 with three backends (compiles dominate); scaled by the
# backends asked for and, once cases finish, by how far off the estimates were.
EST_S = {"decode": 18.0, "serving": 35.0, "chunked": 14.0, "prefill": 20.0}
DTYPE = "bfloat16"
# --smoke without --models: GQA (every entry), head dim 64 with sinks and a window, head dim 96
# (which Mosaic lacks). --smoke --all adds the other points and the block sweep.
SMOKE_MODELS = "llama3_8b,gpt_oss_120b_local,phi3_mini"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.zoo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--models", default=None, help=f"comma-separated, of {sorted(Z.LAYERS)}")
    ap.add_argument("--backends", default=None, help="default mosaic,triton,auto")
    ap.add_argument("--entries", default=",".join(ENTRIES), help=f"of {ENTRIES}")
    ap.add_argument(
        "--peers", default=None, help="prefill peers: cudnn,torch_sdpa (smoke: +xla_dpa)"
    )
    ap.add_argument("--all", action="store_true", help="every point/mix of every layer")
    ap.add_argument("--budget-s", type=float, default=0, help="0: no limit")
    ap.add_argument("--json", default=None, help="default $OUT/zoo.json or results/zoo.json")
    ap.add_argument("--plot", default=None, help="PNG (default: JSON path .png); 'none' skips")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, kernels interpreted")
    ap.add_argument("--resume", action="store_true", help="keep the finished cases of --json")
    ap.add_argument("--plan", action="store_true", help="print the cases and exit")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--timing", choices=("device", "wall"), default="device")
    ap.add_argument("--device-calls", type=int, default=10)
    ap.add_argument("--skip-ceilings", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args(argv)
    a.quick = a.interpret = a.smoke
    a.interpret_peers = False
    a.no_peers = False
    a.only = ["zoo"]
    default_b = "xla,triton,mosaic" if a.smoke else "mosaic,triton,auto"
    a.backends = [b.strip() for b in (a.backends or default_b).split(",") if b.strip()]
    a.entries = [e.strip() for e in a.entries.split(",") if e.strip()]
    bad = [e for e in a.entries if e not in ENTRIES]
    if bad:
        ap.error(f"unknown entries {bad}; choose from {ENTRIES}")
    default_p = "cudnn,torch_sdpa,xla_dpa" if a.smoke else "cudnn,torch_sdpa"
    a.peers = [p.strip() for p in (a.peers or default_p).split(",") if p.strip()]
    # smoke: the fewest calls measure() makes (first, one warm-up, one sample): times mean
    # nothing under the interpreter, the plumbing is what is tested
    a.iters = a.iters or (1 if a.smoke else 20)
    a.warmup = a.warmup or (1 if a.smoke else 3)
    a.min_sample_s = 0.0 if a.smoke else 2e-3
    a.max_row_s = 1e9 if a.smoke else 10.0
    if a.json is None:
        base = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
        a.json = os.path.join(base, "zoo_smoke.json" if a.smoke else "zoo.json")
    try:
        a.layers = Z.select_layers(a.models or (SMOKE_MODELS if a.smoke else None), tiny=a.smoke)
    except ValueError as e:
        ap.error(str(e))
    return a


class ZooCtx(Ctx):
    """The harness's run context plus the zoo's summary and the rows of a resumed run."""

    def __init__(self, args):
        super().__init__(args)
        self.prior: list[dict] = []
        self.summary: list[dict] = []
        self.cases: dict[str, str] = {}  # case key -> status
        self.meta.update(zoo_backends=list(args.backends), smoke=args.smoke)

    def all_rows(self) -> list[dict]:
        return self.prior + self.rows

    def write_json(self) -> None:
        path = self.args.json
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.summary = summarize(self.all_rows(), self.args.backends)
        doc = dict(
            self.meta,
            elapsed_s=round(self.elapsed(), 2),
            ceilings=self.ceilings,
            cases=self.cases,
            zoo_summary=self.summary,
            rows=self.all_rows(),
        )
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1, default=_json_default)
        os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Inputs, calls and the float32 reference


def _opts(layer):
    return dict(softcap=layer.softcap, sliding_window=layer.window)


def decode_fn(ctx, backend, layer):
    api, kw = jpa(), dict(api_kw(ctx, backend), **_opts(layer))

    def f(q, cache, block_tables, context_lens, sinks):
        return api.paged_decode(q, cache, block_tables, context_lens, sinks=sinks, **kw)

    return jax.jit(f)


def attention_fn(ctx, backend, layer, **opts):
    api, kw = jpa(), dict(api_kw(ctx, backend), **dict(_opts(layer), **opts))

    def f(q, cache, meta, sinks):
        return api.paged_attention(q, cache, meta, sinks=sinks, **kw)

    return jax.jit(f)


def build_sets(ctx, case: Z.Case, seed: int):
    """Independent input sets ``(q, Paged)`` (enough to rotate out of L2) and the sinks."""
    L = case.layer
    read = case.kv_bytes() + 2 * case.q_bytes()
    n = timing.num_sets(read)
    ctx.log(
        f"{case.key} [{L.describe()}]: {len(case.seqs)} seq(s), {case.num_tokens} queries, "
        f"{case.kv_bytes() / 2**20:.1f} MiB of visible K+V, {case.flops() / 1e12:.3g} TFLOP, "
        f"{n} input set(s) of {case.cache_bytes() / 2**20:.0f} MiB"
    )
    sets = []
    for i in range(n):
        p = paged_cache(
            500 + i, case.context_lens, L.num_kv_heads, L.head_dim, case.block_size, DTYPE
        )
        q = jax.random.normal(
            jax.random.key(600 + i), (case.num_tokens, L.num_heads, L.head_dim), jnp.bfloat16
        )
        sets.append((q, p))
    sinks = None
    if L.sinks:
        sinks = jax.random.normal(jax.random.key(7), (L.num_heads,), jnp.float32)
    return sets, sinks


def spread(n: int, k: int) -> list[int]:
    """Up to ``k`` indices of ``range(n)``, evenly spaced, first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, k))})


def row_windows(case: Z.Case, seq_ids, m: int = CHECK_WINDOW):
    """Checked rows of the sequences ``seq_ids`` (in that order): ``(seq, j0, j1)``, the head
    and tail ``m`` rows of each (``benchmarks.attention.check_windows``)."""
    wins = check_windows(case, m)
    return [w for i in seq_ids for w in wins if w[0] == i]


def reference(case: Z.Case, q, p, windows, sinks, **opts):
    """The xla backend in float32 on the rows of ``windows`` (a sub-batch whose contexts end at
    each window, over the pages of those sequences gathered and upcast): ``(out, row idx)``."""
    api = jpa()
    bs = case.block_size
    cu = np.concatenate([[0], np.cumsum([n for _, n in case.seqs])])
    pages, tables, lens, sizes, off = [], [], [], [], 0
    for i, j0, j1 in windows:
        ctx_len = case.seqs[i][0] + j1
        nb = -(-ctx_len // bs)
        pages.append(p.bt_np[i, :nb])
        tables.append(np.arange(off, off + nb))
        off += nb
        lens.append(ctx_len)
        sizes.append(j1 - j0)
    bt = np.zeros((len(windows), max(len(t) for t in tables)), np.int32)
    for r, t in enumerate(tables):
        bt[r, : len(t)] = t
    pg = jnp.asarray(np.concatenate(pages))
    sub = api.KVCache(p.cache.k[pg].astype(jnp.float32), p.cache.v[pg].astype(jnp.float32))
    idx = np.concatenate([cu[i] + np.arange(j0, j1) for i, j0, j1 in windows])
    meta = api.AttentionMetadata(
        jnp.asarray(bt),
        jnp.asarray(np.array(lens, np.int32)),
        jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)),
    )
    kw = dict(_opts(case.layer), **opts)
    f = jax.jit(lambda q, c, m, s: api.paged_attention(q, c, m, sinks=s, backend="xla", **kw))
    out = f(q[jnp.asarray(idx)].astype(jnp.float32), sub, meta, sinks)
    return np.asarray(jax.block_until_ready(out), np.float32), idx


def checker(ref, rows_of):
    """A check of a call's output: ``rows_of(out)`` (numpy f32, the checked rows) against the
    reference ``ref`` (``(out, idx)`` or an exception)."""

    def check(out):
        if isinstance(ref, BaseException):
            return {"ok": None, "error": "no reference: " + err_line(ref)}
        got = rows_of(out)
        return dict(compare(got, ref[0], DTYPE), rows_checked=len(got), ref="xla float32")

    return check


def _rows(idx):
    return lambda out: np.asarray(out, np.float32)[idx]


def _safe_ref(ctx, case, *a, **kw):
    try:
        return reference(case, *a, **kw)
    except Exception as e:
        ctx.log(f"{case.key}: reference failed: {err_line(e)}")
        return e


def zoo_row(ctx, case, group, impl, kind, metric, work, config=None, peer=None):
    row = new_row(group, case.name, impl, kind, metric, peer=peer, work=work, config=config)
    L = case.layer
    row.update(
        case=case.key,
        model=L.model,
        layer=L.name,
        layer_config=L.describe(),
        entry=case.entry,
        point=case.point,
        block_size=case.block_size,
        seqs=len(case.seqs),
    )
    return row


def ours(ctx, case, group, metric, work, work_key, fns, sets, check):
    """Times every backend on ``sets``; returns ``{backend: row}``."""
    out = {}
    for b in ctx.args.backends:
        row = zoo_row(ctx, case, group, b, "ours", metric, work, config=api_kw(ctx, b))
        try:
            fn = fns(b)
        except Exception as e:
            row.update(status="error", error=err_line(e))
            out[b] = ctx.add(row)
            continue
        out[b] = run_row(ctx, row, fn, sets, check=check, work_key=work_key)
    return out


# ---------------------------------------------------------------------------------------------
# The entries


def bench_decode(ctx, case, sets, sinks):
    api, L = jpa(), case.layer
    S = len(case.seqs)
    work = {"bytes": case.kv_bytes(), "flops": case.flops()}
    ref = _safe_ref(
        ctx, case, sets[0][0], sets[0][1], row_windows(case, spread(S, CHECK_SEQS)), sinks
    )
    idx = None if isinstance(ref, BaseException) else ref[1]
    check = checker(ref, _rows(idx))
    dsets = [(q, p.cache, p.block_tables, p.context_lens, sinks) for q, p in sets]
    ours(ctx, case, "decode", "TB/s", work, "bytes", lambda b: decode_fn(ctx, b, L), dsets, check)
    cu = jnp.arange(S + 1, dtype=jnp.int32)
    psets = [
        (q, p.cache, api.AttentionMetadata(p.block_tables, p.context_lens, cu), sinks)
        for q, p in sets
    ]
    fns = functools.partial(attention_fn, ctx, layer=L)
    ours(ctx, case, "decode_pa", "TB/s", work, "bytes", lambda b: fns(b), psets, check)


def _meta(api, p, cu, rows=slice(None)):
    return api.AttentionMetadata(
        p.block_tables[rows], p.context_lens[rows], jnp.asarray(np.asarray(cu, np.int32))
    )


def bench_prefill(ctx, case, sets, sinks):
    """``chunked`` and ``prefill``: one paged_attention call; prefill also has the peers."""
    api, L = jpa(), case.layer
    work = {"flops": case.flops(), "bytes": case.kv_bytes()}
    seq_ids = spread(len(case.seqs), CHECK_SEQS)
    wins = row_windows(case, seq_ids)
    ref = _safe_ref(ctx, case, sets[0][0], sets[0][1], wins, sinks)
    idx = None if isinstance(ref, BaseException) else ref[1]
    cu = np.concatenate([[0], np.cumsum([n for _, n in case.seqs])])
    asets = [(q, p.cache, _meta(api, p, cu), sinks) for q, p in sets]
    fns = functools.partial(attention_fn, ctx, layer=L)
    peer = "cudnn" if case.entry == "prefill" else None
    ours_rows = ours(
        ctx,
        case,
        case.entry,
        "TFLOP/s",
        work,
        "flops",
        lambda b: fns(b),
        asets,
        checker(ref, _rows(idx)),
    )
    if case.entry == "prefill":
        for r in ours_rows.values():
            r["peer"] = peer
        prefill_peers(ctx, case, sets, sinks, wins, ref, work)


def prefill_peers(ctx, case, sets, sinks, wins, ref, work):
    """cuDNN / xla_dpa (jax.nn.dot_product_attention) and torch SDPA on contiguous
    ``[1, L, H|Hkv, D]`` copies of the same K and V."""
    L = case.layer
    want = [p for p in ctx.args.peers if p in ("cudnn", "xla_dpa", "torch_sdpa")]
    if not want:
        return
    omits = [x for x in ("softcap", "sinks") if getattr(L, x)]
    if omits:  # what the peers compute: the layer without its softcap / sinks
        ref = _safe_ref(ctx, case, sets[0][0], sets[0][1], wins, None, softcap=None)
    idx = None if isinstance(ref, BaseException) else ref[1]
    check = checker(ref, _rows(idx))
    csets = []
    for q, p in sets:
        k, v = contiguous_kv(p, 0)
        csets.append((q[None], k[None], v[None]))

    def cfg(layout, **kw):
        return dict({"layout": layout, "is_causal": True}, omits=omits, **kw)

    for impl in (p for p in want if p != "torch_sdpa"):
        kw = {"is_causal": True, "implementation": impl.replace("_dpa", "")}
        if L.window:
            kw["local_window_size"] = (L.window - 1, 0)
        row = zoo_row(
            ctx, case, "prefill", impl, "peer", "TFLOP/s", work,
            config=cfg("contiguous [1, L, H, D]", window=L.window),
        )  # fmt: skip
        if impl == "cudnn" and not ctx.on_gpu:
            skip(ctx, row, "needs a CUDA GPU (cuDNN)")
            continue
        f = jax.jit(functools.partial(jax.nn.dot_product_attention, **kw))
        run_row(
            ctx,
            row,
            f,
            csets,
            check=lambda o: check(np.asarray(o, np.float32)[0]),
            work_key="flops",
        )
    if "torch_sdpa" in want:
        row = zoo_row(
            ctx, case, "prefill", "torch_sdpa", "peer", "TFLOP/s", work,
            config=cfg("contiguous [1, H, L, D]"),
        )  # fmt: skip
        if L.window:
            skip(ctx, row, "SDPA has no sliding window but a dense mask (another kernel)")
        else:
            peers.torch_sdpa_row(
                ctx,
                row,
                csets,
                causal=True,
                check=lambda o: check(peers.torch_np(o)[0].transpose(1, 0, 2)),
                work_key="flops",
            )
    del csets


def bench_serving(ctx, case, sets, sinks):
    """One step: the chunk (sequence 0) and the decode rows, in one call and in two."""
    api, L = jpa(), case.layer
    nc = case.seqs[0][1]
    S = len(case.seqs)
    dec_seqs = case.seqs[1:]
    w_all = {"flops": case.flops(), "bytes": case.kv_bytes()}
    w_chunk = {"flops": case.flops(case.seqs[:1]), "bytes": case.kv_bytes(case.seqs[:1])}
    w_dec = {"bytes": case.kv_bytes(dec_seqs), "flops": case.flops(dec_seqs)}
    dec_ids = [1 + i for i in spread(S - 1, CHECK_SEQS)]
    ref = _safe_ref(ctx, case, sets[0][0], sets[0][1], row_windows(case, [0] + dec_ids), sinks)
    bad = isinstance(ref, BaseException)
    idx = None if bad else ref[1]
    ci = None if bad else idx < nc  # which checked rows are the chunk's

    def sub(rows):
        return ref if bad else (ref[0][rows], idx[rows])

    cu = np.concatenate([[0], np.cumsum([n for _, n in case.seqs])])
    one_sets = [(q, p.cache, _meta(api, p, cu), sinks) for q, p in sets]
    chunk_sets = [(q[:nc], p.cache, _meta(api, p, [0, nc], slice(0, 1)), sinks) for q, p in sets]
    dec_sets = [(q[nc:], p.cache, p.block_tables[1:], p.context_lens[1:], sinks) for q, p in sets]
    # one jitted function per backend and op: the split reuses the chunk's and the decode
    # rows' compiled calls
    fa = functools.cache(lambda b: attention_fn(ctx, b, L))
    fd = functools.cache(lambda b: decode_fn(ctx, b, L))
    chunk_check = checker(sub(ci), lambda o: np.asarray(o, np.float32)[idx[ci]])
    dec_check = checker(
        sub(~ci) if not bad else ref, lambda o: np.asarray(o, np.float32)[idx[~ci] - nc]
    )
    one = ours(
        ctx,
        case,
        "serving",
        "TFLOP/s",
        w_all,
        "flops",
        fa,
        one_sets,
        checker(ref, _rows(idx)),
    )
    chunk = ours(
        ctx,
        case,
        "serving_chunk",
        "TFLOP/s",
        w_chunk,
        "flops",
        fa,
        chunk_sets,
        chunk_check,
    )
    dec = ours(
        ctx,
        case,
        "serving_decode",
        "TB/s",
        w_dec,
        "bytes",
        fd,
        dec_sets,
        dec_check,
    )

    bc, _ = best_of(chunk)
    bd, _ = best_of(dec)
    row = zoo_row(ctx, case, "serving", "split", "split", "TFLOP/s", w_all)
    if bc is None or bd is None:
        return skip(ctx, row, "no valid chunk call or no valid decode call to split into")
    row["impl"] = f"split:{bc}+{bd}"
    row["config"] = {
        "chunk": bc,
        "decode": bd,
        "calls": "paged_attention(chunk), paged_decode(rows)",
    }
    f_chunk, f_dec = fa(bc), fd(bd)
    split_sets = [c + d for c, d in zip(chunk_sets, dec_sets, strict=True)]

    def split(qc, cache, meta, s1, qd, cache2, bt, lens, s2):
        return f_chunk(qc, cache, meta, s1), f_dec(qd, cache2, bt, lens, s2)

    def rows_of(o):
        return np.concatenate([np.asarray(o[0], np.float32), np.asarray(o[1], np.float32)])[idx]

    run_row(ctx, row, split, split_sets, check=checker(ref, rows_of), work_key="flops")
    for r in one.values():
        r["split_impl"] = row["impl"]
    del one, chunk, dec


BENCH = {
    "decode": bench_decode,
    "serving": bench_serving,
    "chunked": bench_prefill,
    "prefill": bench_prefill,
}


# ---------------------------------------------------------------------------------------------
# The run


def load_prior(ctx) -> set:
    """``--resume``: the finished cases of the JSON at ``--json`` (a case with any row skipped
    for the budget is run again, whole)."""
    try:
        with open(ctx.args.json) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        ctx.log(f"--resume: nothing to resume ({err_line(e)})")
        return set()
    rows = [r for r in doc.get("rows", []) if "case" in r]
    redo = {r["case"] for r in rows if r["status"] == "skipped" and "budget" in (r["error"] or "")}
    ctx.prior = [dict(r, resumed=True) for r in rows if r["case"] not in redo]
    done = {r["case"] for r in ctx.prior}
    ctx.cases.update({k: "resumed" for k in done})
    # A case the earlier process started and never finished killed it (a crash, a hang, the
    # call's time limit): not run again, recorded as an error.
    for key, status in doc.get("cases", {}).items():
        if status == "started" and key not in done:
            entry, name = key.split(":", 1)
            row = new_row(entry, name, "setup", "ours", "")
            row.update(case=key, entry=entry, layer=name.split("/")[0], point=name.split("/")[1])
            row.update(block_size=int(name.split("/b")[-1]), status="error")
            row["error"] = "the earlier run died in this case (crash, hang or time limit)"
            ctx.prior.append(row)
            ctx.cases[key] = "died"
            done.add(key)
    ctx.log(f"--resume: {len(done)} finished case(s), {len(ctx.prior)} rows kept")
    return done


def run_cases(ctx, cases) -> None:
    nb = max(1, len(ctx.args.backends)) / 3
    est_sum = spent_sum = 0.0
    for case in cases:
        est = EST_S[case.entry] * nb * (spent_sum / est_sum if est_sum else 1.0)
        left = ctx.args.budget_s - ctx.elapsed()
        if ctx.args.budget_s and est > left:
            why = f"budget: est. {est:.0f} s, {max(left, 0):.0f} s of --budget-s left"
            row = zoo_row(ctx, case, case.entry, "-", "case", "", {})
            skip(ctx, row, why)
            ctx.cases[case.key] = "skipped (budget)"
            continue
        t0 = time.perf_counter()
        sets = None
        ctx.cases[case.key] = "started"
        ctx.write_json()
        try:
            sets, sinks = build_sets(ctx, case, 0)
            BENCH[case.entry](ctx, case, sets, sinks)
            ctx.cases[case.key] = "done"
        except Exception as e:  # a setup failure: record it, go on with the next case
            row = zoo_row(ctx, case, case.entry, "setup", "ours", "", {})
            row.update(status="error", error=err_line(e))
            ctx.add(row)
            ctx.cases[case.key] = "error"
        del sets
        gc.collect()
        if ctx.torch is not None:
            ctx.torch.cuda.empty_cache()
        est_sum += EST_S[case.entry] * nb
        spent_sum += time.perf_counter() - t0
        ctx.write_json()


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = [
        c
        for c in Z.plan(args.layers, tiny=args.smoke, full=args.all, named=bool(args.models))
        if c.entry in args.entries
    ]
    if args.plan:
        total = 0.0
        for c in cases:
            total += EST_S[c.entry] * len(args.backends) / 3
            print(f"{c.key:<48} {c.layer.describe():<34} est. {total:5.0f} s (cumulative)")
        return 0
    ctx = ZooCtx(args)
    ctx.log(
        f"zoo: device {ctx.device} ({ctx.platform}), jax {jax.__version__}, torch "
        f"{ctx.meta['torch_version']}; {len(cases)} cases of {len(args.layers)} layers; backends "
        f"{args.backends}; budget {args.budget_s or 'none'} s; json {args.json}"
    )
    done = load_prior(ctx) if args.resume else set()
    same = [x for x in Z.LAYERS.values() if x.same_as and x not in args.layers]
    for x in same:
        ctx.log(f"{x.name}: the attention layer of {x.same_as} ({x.describe()}): not repeated")
    ctx.meta["same_as"] = {x.name: x.same_as for x in same}
    try:
        jpa()
    except Exception as e:
        ctx.log(f"jax_paged_attn not importable: {err_line(e)}")
    if not args.skip_ceilings:
        try:
            bench_ceilings(ctx)
        except Exception as e:
            ctx.log(f"ceilings failed: {err_line(e)}")
    run_cases(ctx, [c for c in cases if c.key not in done])
    ctx.write_json()
    print("\n" + table(ctx.summary, args.backends), flush=True)
    bad = [r for r in ctx.rows if r["status"] in ("invalid", "error")]
    for r in bad:
        print(
            f"  {r['status'].upper()}: {r['group']}/{r['shape']} {r['impl']}: {r.get('error') or r.get('check')}"
        )
    left = [k for k, v in ctx.cases.items() if v == "skipped (budget)"]
    if left:
        print(
            f"\n{len(left)} case(s) did not fit the budget: {', '.join(left)}\n"
            f"run them with the same command plus --resume (reading this run's JSON at --json)",
            flush=True,
        )
    ctx.log(f"wrote {args.json}")
    if args.plot != "none":
        png = args.plot or os.path.splitext(args.json)[0] + ".png"
        try:
            from benchmarks import plot

            plot.render_zoo(args.json, png)
            ctx.log(f"wrote {png}")
        except Exception as e:  # no matplotlib, or a plotting bug: the JSON is written
            ctx.log(f"plot skipped: {err_line(e)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
