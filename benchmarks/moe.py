"""The ``moe`` and ``moe_zoo`` groups: ``fused_moe`` per backend through the public API, and its
two grouped GEMMs as peers (``lax.ragged_dot`` and Pallas Mosaic GPU ``ragged_dot_mgpu`` on
expert-sorted rows, the sort and gather outside the timing).

Weights are scaled by ``1/sqrt(fan_in)`` (gpt-oss shapes add expert biases); routing is
``moe_topk`` (softmax top-k) on random logits, outside the timing. Prefill-shaped rows report
TFLOP/s, decode-shaped rows TB/s of the expert weights touched (distinct routed experts).

Checks, on the first call of every row: each backend's output rows of a window of tokens (the
first and last few) against a float32 oracle computed pair by pair on the device (HIGHEST
precision, the intermediate rounded to ``x.dtype`` as every path does), and the kernel
backends' whole outputs against the ``xla`` backend's. Each GEMM peer has a row per GEMM and a
``both`` row whose time is the sum of the two (no sort, activation or combine).

``moe_zoo`` (``benchmarks/shapes.py``, ``MOE_MODELS``): the routed experts of seven models at
4096, 512 and 64 tokens, one input set each (a model's weights made once for its three token
counts). There the ``ragged_dot_mgpu`` peer runs one block configuration
(:func:`zoo_mgpu_configs`) instead of tuning over
:data:`benchmarks.peers.MGPU_RAGGED_DOT_CONFIGS`, and the
``lax.ragged_dot`` peer runs at decode sizes only (XLA's GPU lowering expands it over every
expert: E times the FLOPs, and 112 GiB of temporaries for DeepSeek-V3 at 4096 tokens;
``scripts/moe_xla_probe.py`` times it at every size).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import peers, timing
from benchmarks import shapes as S
from benchmarks.harness import (
    NAMED_PEER,
    Ctx,
    api_kw,
    compare,
    err_line,
    fail,
    jpa,
    new_row,
    run_row,
    skip,
    tune_and_run,
)

WINDOW = 8  # oracle rows: the first and the last WINDOW tokens


def moe_inputs(key, num_tokens, num_experts, top_k, hidden, inter, dtype=jnp.bfloat16, **topk):
    """``(x, w_gate_up, w_down, topk_weights, topk_ids)``: random normal activations, weights
    scaled by ``1/sqrt(fan_in)``, routing by ``moe_topk`` (keyword arguments ``topk``) of random
    logits. Made on the device."""
    dt = jnp.dtype(dtype)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (num_tokens, hidden), jnp.float32).astype(dt)
    wgu = _normal(k2, (num_experts, hidden, 2 * inter), dt, 1 / math.sqrt(hidden))
    wd = _normal(k3, (num_experts, inter, hidden), dt, 1 / math.sqrt(inter))
    logits = jax.random.normal(k4, (num_tokens, num_experts), jnp.float32)
    w, ids = jpa().moe_topk(logits, top_k, **topk)
    return x, wgu, wd, w, ids


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, dtype, scale):
    """Normal samples times ``scale`` in ``dtype``, made in slices along the first axis (the
    weights of large models: no float32 copy of the whole tensor)."""
    keys = jax.random.split(key, shape[0])
    one = lambda k: (jax.random.normal(k, shape[1:], jnp.float32) * scale).astype(dtype)  # noqa: E731
    return lax.map(one, keys)


def shape_inputs(shape: S.MoEShape, key, **topk):
    """:func:`moe_inputs` of a named shape."""
    return moe_inputs(
        key,
        shape.num_tokens,
        shape.num_experts,
        shape.top_k,
        shape.hidden,
        shape.inter,
        shape.dtype,
        **topk,
    )


def shape_biases(shape: S.MoEShape, key):
    """``(b_gate_up, b_down)`` of a shape with expert biases (normal, scale 0.5, the weights'
    dtype), else ``(None, None)``."""
    if not shape.bias:
        return None, None
    dt = jnp.dtype(shape.dtype)
    k1, k2 = jax.random.split(key)
    b_gu = (0.5 * jax.random.normal(k1, (shape.num_experts, 2 * shape.inter))).astype(dt)
    b_d = (0.5 * jax.random.normal(k2, (shape.num_experts, shape.hidden))).astype(dt)
    return b_gu, b_d


_ZOO_WEIGHTS: dict = {}


def zoo_inputs(shape: S.MoEShape):
    """One input set ``(x, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down)`` of a
    zoo shape; the weights (and biases) are kept for the next shape of the same model, so the
    three token counts of a model make them once."""
    wkey = (shape.num_experts, shape.hidden, shape.inter, shape.dtype, shape.bias)
    if wkey not in _ZOO_WEIGHTS:
        _ZOO_WEIGHTS.clear()
        dt, E, Hd, I = jnp.dtype(shape.dtype), shape.num_experts, shape.hidden, shape.inter
        k2, k3 = jax.random.split(jax.random.key(900))
        wgu = _normal(k2, (E, Hd, 2 * I), dt, 1 / math.sqrt(Hd))
        wd = _normal(k3, (E, I, Hd), dt, 1 / math.sqrt(I))
        _ZOO_WEIGHTS[wkey] = (wgu, wd, *shape_biases(shape, jax.random.key(700)))
    wgu, wd, b_gu, b_d = _ZOO_WEIGHTS[wkey]
    k1, k4 = jax.random.split(jax.random.key(500 + shape.num_tokens))
    x = jax.random.normal(k1, (shape.num_tokens, shape.hidden), jnp.float32).astype(shape.dtype)
    logits = jax.random.normal(k4, (shape.num_tokens, shape.num_experts), jnp.float32)
    w, ids = jpa().moe_topk(logits, shape.top_k)
    return x, wgu, wd, w, ids, b_gu, b_d


def window_rows(num_tokens: int) -> np.ndarray:
    """The tokens the oracle computes: the first and the last :data:`WINDOW`."""
    if num_tokens <= 2 * WINDOW:
        return np.arange(num_tokens)
    return np.concatenate([np.arange(WINDOW), np.arange(num_tokens - WINDOW, num_tokens)])


@functools.partial(jax.jit, static_argnames=("activation", "alpha", "limit"))
def oracle_rows(x, wgu, wd, w, ids, b_gu, b_d, rows, *, activation, alpha=1.702, limit=7.0):
    """float32 ``fused_moe`` outputs of the tokens ``rows``, one (token, expert) pair at a time
    (matmuls at HIGHEST precision); the intermediate is rounded to ``x.dtype`` as every path
    does. Written apart from the library: its own activations, no sorting, no batching."""
    f32, hi = jnp.float32, lax.Precision.HIGHEST
    num_experts, inter = wd.shape[0], wd.shape[1]

    def glu(h):
        g, u = h[:inter], h[inter:]
        if activation == "swigluoai":
            g = jnp.minimum(g, limit)
            return (jnp.clip(u, -limit, limit) + 1) * g / (1 + jnp.exp(-alpha * g))
        if activation == "silu":
            return g / (1 + jnp.exp(-g)) * u
        if activation == "gelu":
            return 0.5 * g * (1 + lax.erf(g / math.sqrt(2))) * u
        c = math.sqrt(2 / math.pi)
        return 0.5 * g * (1 + jnp.tanh(c * (g + 0.044715 * g**3))) * u

    def token(t):
        def pair(j):
            e = ids[t, j]
            ec = jnp.clip(e, 0, num_experts - 1)
            h = jnp.dot(x[t].astype(f32), wgu[ec].astype(f32), precision=hi)
            if b_gu is not None:
                h = h + b_gu[ec].astype(f32)
            a = glu(h).astype(x.dtype).astype(f32)
            y = jnp.dot(a, wd[ec].astype(f32), precision=hi)
            if b_d is not None:
                y = y + b_d[ec].astype(f32)
            return jnp.where((e >= 0) & (e < num_experts), w[t, j] * y, 0.0)

        return jnp.sum(lax.map(pair, jnp.arange(ids.shape[1])), axis=0)

    return lax.map(token, rows)


def mgpu_import_error() -> str | None:
    """Why ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` does not import (None: it does)."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # noqa: F401
    except Exception as e:  # ImportError, or a dialect missing from this jaxlib
        return err_line(e)
    return None


def zoo_mgpu_configs(shape: S.MoEShape, n_out: int, k_in: int) -> list[dict]:
    """The ``ragged_dot_mgpu`` configuration the zoo runs (one: each costs a Mosaic compile):
    block_m 64 up to 1024 routed rows, else 128 (on an H200 the better one of the two on
    Mixtral, Qwen3-30B-A3B and Qwen3-235B-A22B at 512 and 4096 tokens); block_n 128, or 64
    where 128 does not divide the output width (gpt-oss's 2880)."""
    bm = 64 if shape.num_tokens * shape.top_k <= 1024 else 128
    bn = 128 if n_out % 128 == 0 else 64
    if n_out % bn or k_in % 64:
        return []
    return [dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=4, grid_block_n=1)]


def zoo_mgpu_row(ctx: Ctx, row, shape: S.MoEShape, args, *, check, work_key, scale) -> dict:
    """``ragged_dot_mgpu`` on ``args`` of ``(lhs, rhs, group_sizes)`` with
    :func:`zoo_mgpu_configs` (skipped, with the reason, where it does not import or run)."""
    if not ctx.on_gpu:
        return skip(ctx, row, "needs a Hopper GPU (Mosaic GPU)")
    why = mgpu_import_error()
    if why is not None:
        return skip(ctx, row, f"ragged_dot_mgpu does not import: {why}")
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rdm

        cfgs = zoo_mgpu_configs(shape, args[0][1].shape[2], args[0][1].shape[1])
        if not cfgs:
            return skip(ctx, row, "no block configuration divides this GEMM's shape")
        cands = [
            (
                cfg,
                jax.jit(
                    lambda lhs, rhs, g, cfg=cfg: rdm.ragged_dot(lhs, rhs, group_sizes=g, **cfg)
                ),
            )
            for cfg in cfgs
        ]
        return tune_and_run(ctx, row, cands, args, check=check, work_key=work_key, scale=scale)
    except Exception as e:
        return fail(ctx, row, e)


def _both_row(ctx: Ctx, group, shape, impl: str, parts: list[dict], work, metric, key, sc):
    """A peer's two GEMM rows as one: time = the sum of their times (no sort, activation or
    combine), ok only when both are."""
    row = new_row(group, shape, impl, "peer", metric, work=work, config={"gemm": "both"})
    bad = [p for p in parts if p["status"] != "ok"]
    if bad:
        why = "; ".join(f"{p['impl']}: {p['status']} {p.get('error') or ''}".strip() for p in bad)
        row.update(status="skipped", error=f"a GEMM row did not run: {why}"[:400])
        return ctx.add(row)
    t = sum(p["time_s"] for p in parts)
    row.update(
        status="ok",
        time_s=t,
        value=work[key] / t / sc,
        timing=parts[0].get("timing"),
        iters=min(p["iters"] for p in parts),
        config={"gemm": "both", "parts": [p["impl"] for p in parts]},
    )
    return ctx.add(row)


def bench_moe(ctx: Ctx, shape: S.MoEShape, zoo: bool = False) -> None:
    api = jpa()
    dt = jnp.dtype(shape.dtype)
    T, E, K, Hd, I = shape.num_tokens, shape.num_experts, shape.top_k, shape.hidden, shape.inter
    group = "moe_zoo" if zoo else "moe"
    wbytes_all = E * shape.expert_bytes
    nsets = 1 if zoo else timing.num_sets(wbytes_all + T * Hd * dt.itemsize)
    if ctx.over_budget():  # record the rows, make no inputs
        metric = "TB/s" if shape.decode else "TFLOP/s"
        for b in ctx.args.backends:
            skip(ctx, new_row(group, shape, b, "ours", metric), "time budget spent")
        return
    ctx.log(
        f"{group} {shape.name}: {T} tokens, top-{K} of {E}, Hd {Hd}, I {I}, "
        f"{shape.activation}{' + biases' if shape.bias else ''}, "
        f"{wbytes_all / 2**30:.3g} GiB of weights, {nsets} input set(s)"
    )
    if zoo:
        sets = [zoo_inputs(shape)]
    else:
        sets = [
            shape_inputs(shape, jax.random.key(500 + i))
            + shape_biases(shape, jax.random.key(700 + i))
            for i in range(nsets)
        ]
    ids0 = np.asarray(sets[0][4])
    touched = int(np.unique(ids0[(ids0 >= 0) & (ids0 < E)]).size)
    work = {"flops": shape.flops, "bytes": shape.weight_bytes(touched), "experts_touched": touched}
    metric, key, sc = ("TB/s", "bytes", 1e12) if shape.decode else ("TFLOP/s", "flops", 1e12)

    def fused(backend):
        kw = dict(api_kw(ctx, backend), activation=shape.activation)

        def f(x, wgu, wd, w, ids, b_gu, b_d):
            return api.fused_moe(x, wgu, wd, w, ids, b_gate_up=b_gu, b_down=b_d, **kw)

        return jax.jit(f)

    fns = {b: fused(b) for b in set(ctx.args.backends) | {"xla"}}
    rows = window_rows(T)
    oracle, ref = {}, {}
    try:
        x, wgu, wd, w, ids, b_gu, b_d = sets[0]
        got = oracle_rows(
            x, wgu, wd, w, ids, b_gu, b_d, jnp.asarray(rows), activation=shape.activation
        )
        oracle["out"] = np.asarray(got, np.float32)
    except Exception as e:
        oracle["error"] = err_line(e)
        ctx.log(f"{group} {shape.name}: float32 oracle failed: {oracle['error']}")
    try:
        ref["out"] = np.asarray(jax.block_until_ready(fns["xla"](*sets[0])), np.float32)
    except Exception as e:
        ref["error"] = err_line(e)
        ctx.log(f"{group} {shape.name}: xla reference failed: {ref['error']}")

    def check_of(backend):
        def check(out):
            out = np.asarray(out, np.float32)
            if "out" not in oracle:
                res = {"ok": None, "error": "no float32 oracle: " + oracle.get("error", "")}
            else:
                res = dict(compare(out[rows], oracle["out"], shape.dtype), ref="float32 oracle")
                res["oracle_rows"] = len(rows)
            if backend != "xla" and res.get("ok") is not False:
                if "out" not in ref:
                    res["xla_check"] = "no xla output: " + ref.get("error", "")
                else:
                    full = compare(out, ref["out"], shape.dtype)
                    res.update(xla_rel_err=full["rel_err"], ok=res.get("ok") and full["ok"])
            return res

        return check

    for b in ctx.args.backends:
        config = dict(
            api_kw(ctx, b),
            activation=shape.activation,
            bias=shape.bias,
            routing="moe_topk softmax, excluded from the timing",
        )
        if b == "xla":
            from jax_paged_attn import reference

            config["plan"] = reference.moe_plan(T, K, E)._asdict()
        row = new_row(
            group, shape, b, "ours", metric, peer=NAMED_PEER["moe"], work=work, config=config
        )
        run_row(ctx, row, fns[b], sets, check=check_of(b), work_key=key, scale=sc)
    if ctx.args.no_peers:
        return

    # Peers: the two grouped GEMMs on expert-sorted rows (sorting/gather outside the timing).
    gsets = []
    for i, (x, *_, ids, _, _) in enumerate(sets):
        flat = np.asarray(ids).reshape(-1)
        order = np.argsort(flat, kind="stable")
        gs = jnp.asarray(np.bincount(flat, minlength=E).astype(np.int32))
        xs = x[jnp.asarray(order // K)]
        a = jax.random.normal(jax.random.key(600 + i), (T * K, I), dt)
        gsets.append({"gate_up": (xs, sets[i][1], gs), "down": (a, sets[i][2], gs)})
    gemm_w = {"gate_up": touched * Hd * 2 * I * dt.itemsize, "down": touched * I * Hd * dt.itemsize}
    lax_fn = jax.jit(lambda lhs, rhs, g: lax.ragged_dot(lhs, rhs, g))
    run_lax = not zoo or shape.decode
    parts = {"lax_ragged_dot": [], "mgpu_ragged_dot": []}
    for gemm in ("gate_up", "down"):
        gwork = {"flops": shape.gemm_flops[gemm], "bytes": gemm_w[gemm], "experts_touched": touched}
        args = [s[gemm] for s in gsets]
        gref = {}

        def keep(out, gref=gref):
            gref["out"] = np.asarray(out, np.float32)
            return {}

        impl = f"lax_ragged_dot:{gemm}"
        row = new_row(group, shape, impl, "peer", metric, work=gwork, config={"gemm": gemm})
        if run_lax:
            parts["lax_ragged_dot"].append(
                run_row(ctx, row, lax_fn, args, check=keep, work_key=key, scale=sc)
            )
        else:
            skip(
                ctx,
                row,
                "zoo: lax.ragged_dot runs at decode sizes only (XLA's GPU lowering is dense over "
                "experts); scripts/moe_xla_probe.py times it",
            )

        def gcheck(out, gref=gref):
            if "out" not in gref:
                return {"ok": None, "error": "no lax.ragged_dot output"}
            return dict(compare(out, gref["out"], shape.dtype), ref="lax.ragged_dot")

        def gcheck_zoo(out, args=args):
            # the float32 product of the same rows, group by group (no lax.ragged_dot needed)
            lhs, rhs, gs = args[0]
            want = _grouped_f32(lhs, rhs, gs, rows_of_group=_probe_rows(np.asarray(gs)))
            got = np.asarray(out, np.float32)[want[0]]
            return dict(compare(got, want[1], shape.dtype), ref="float32 per-group product")

        row = new_row(
            group,
            shape,
            f"mgpu_ragged_dot:{gemm}",
            "peer",
            metric,
            work=gwork,
            peer=impl,
            config={"gemm": gemm},
        )
        if zoo:
            r = zoo_mgpu_row(ctx, row, shape, args, check=gcheck_zoo, work_key=key, scale=sc)
        else:
            r = peers.mgpu_ragged_dot_row(ctx, row, args, check=gcheck, work_key=key, scale=sc)
        parts["mgpu_ragged_dot"].append(r)
    bwork = {"flops": shape.flops, "bytes": shape.weight_bytes(touched), "experts_touched": touched}
    for impl, ps in parts.items():
        if len(ps) == 2:
            _both_row(ctx, group, shape, impl, ps, bwork, metric, key, sc)
    del sets, gsets


def _probe_rows(group_sizes: np.ndarray, per_group: int = 2) -> np.ndarray:
    """Row indices of the expert-sorted rows to check: the first and last ``per_group`` rows of
    up to 8 non-empty groups spread over the experts."""
    ends = np.cumsum(group_sizes)
    starts = ends - group_sizes
    nonempty = np.nonzero(group_sizes)[0]
    picks = nonempty[np.linspace(0, len(nonempty) - 1, min(8, len(nonempty))).astype(int)]
    rows = set()
    for g in picks:
        lo, hi = int(starts[g]), int(ends[g])
        rows.update(range(lo, min(hi, lo + per_group)))
        rows.update(range(max(lo, hi - per_group), hi))
    return np.array(sorted(rows), np.int64)


def _grouped_f32(lhs, rhs, group_sizes, rows_of_group):
    """(rows, float32 product of those rows of ``lhs`` with their group's ``rhs``)."""
    ends = np.cumsum(np.asarray(group_sizes))
    group = np.searchsorted(ends, rows_of_group, side="right")
    prod = _row_products(lhs, rhs, jnp.asarray(rows_of_group), jnp.asarray(group))
    return rows_of_group, np.asarray(prod)


@jax.jit
def _row_products(lhs, rhs, rows, groups):
    def one(rg):
        r, g = rg
        return jnp.dot(
            lhs[r].astype(jnp.float32),
            rhs[g].astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
        )

    return lax.map(one, (rows, groups))
