"""Kernel-level fused-MoE benchmark and block sweep (GPU; ``--quick`` is a CPU smoke run).

    python -m benchmarks.moe_kernels [--shapes mixtral,decode,small_experts] [--iters 20]
    python -m benchmarks.moe_kernels --sweep [--budget-s 150] [--whole-only]  # decode blocks
    python -m benchmarks.moe_kernels --quick [--sweep]   # tiny shape, kernels interpreted

For each named shape: checks the triton and mosaic kernels against the ``xla`` backend of the
public API (relative L2 error), then times all three and reports TFLOP/s
(``2*T*k*(Hd*2I + I*Hd)``) and TB/s of expert weights touched (distinct routed experts), plus a
bf16 matmul and a device-copy ceiling measured in the same run. ``--sweep``: the decode shape's
steps timed alone (alignment, gate/up GEMM, down GEMM, combine) per block configuration, then
whole calls for the best pairs. Timing: :func:`benchmarks.timing.time_fn` (median of ``--iters``
samples of >= 2 ms of back-to-back calls; with ``--timing device``, the default, the GPU busy
time per call from a profiler trace).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.moe import moe_inputs

SHAPES = {  # name: (T, Hd, I, E, k)
    "mixtral": (4096, 4096, 14336, 8, 2),
    "decode": (64, 4096, 14336, 8, 2),
    "small_experts": (4096, 2048, 1408, 64, 6),
    "tiny": (16, 64, 128, 4, 2),  # --quick: the CPU smoke run
}
CPU = not timing.on_gpu()
OPTS = {"iters": 20, "device": True}  # set by main()

# Gate/up GEMM configurations: block_n, block_k, warps, stages, evict_first.
GATE_UP_CONFIGS = (
    (64, 128, 4, 4, False),
    (64, 128, 4, 3, False),
    (64, 128, 4, 5, False),
    (64, 128, 4, 4, True),
    (128, 128, 4, 3, False),
    (128, 128, 8, 3, False),
    (128, 64, 4, 4, False),
    (128, 64, 4, 5, True),
    (32, 128, 4, 4, False),
    (32, 256, 4, 4, False),
    (64, 64, 4, 6, False),
    (64, 256, 4, 2, False),
    (256, 64, 8, 3, False),
    (32, 128, 2, 6, False),
    (64, 128, 8, 4, False),
)
# Down GEMM configurations: block_n, block_k, warps, stages, split_k, evict_first.
DOWN_CONFIGS = (
    (64, 128, 4, 4, 1, False),
    (64, 128, 4, 4, 2, False),
    (64, 128, 4, 4, 4, False),
    (128, 128, 4, 4, 2, False),
    (128, 128, 4, 4, 4, False),
    (128, 128, 4, 3, 8, False),
    (64, 256, 4, 3, 2, False),
    (64, 256, 4, 4, 4, False),
    (32, 256, 4, 4, 4, False),
    (256, 64, 8, 4, 4, False),
    (128, 64, 4, 5, 4, False),
    (64, 128, 4, 4, 8, False),
    (128, 128, 8, 4, 4, False),
    (128, 128, 4, 4, 4, True),
    (64, 128, 4, 4, 4, True),
    (128, 256, 4, 2, 4, False),
    (32, 128, 4, 6, 4, False),
)


def _time(fn, *args):
    return timing.time_fn(
        fn, *args, iters=OPTS["iters"], warmup=1, min_sample_s=2e-3, device=OPTS["device"]
    )[0]


def case(shape, dtype=jnp.bfloat16, seed=0):
    """``(x, w_gate_up, w_down, topk_weights, topk_ids)`` of a ``(T, Hd, I, E, k)`` shape."""
    T, Hd, I, E, k = shape
    return moe_inputs(jax.random.key(seed), T, E, k, Hd, I, dtype)


def _xla_moe():
    import jax_paged_attn as jpa

    return jax.jit(functools.partial(jpa.fused_moe, activation="silu", backend="xla"))


def _rel(y, ref):
    y = y.astype(jnp.float32)
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def _line(*a):
    print(*a, flush=True)


def _sweep_steps(bm, x, wgu, wd, w, ids, shape, t_end, quick):
    """Gate/up and down GEMMs of one block_m, each timed alone per configuration:
    (best gate/up, best down, [(s, gate/up)], [(s, down)]) or None."""
    from pallas_kernels.moe import align, common, triton
    from pallas_kernels.moe.tuning import GemmBlocks as G

    T, Hd, I, E, k = shape
    gu_bytes, dn_bytes = E * Hd * 2 * I * 2, E * I * Hd * 2
    tw = w.reshape(-1).astype(jnp.float32)
    big = 1 << 20
    aligned = jax.jit(align.align_tokens, static_argnums=(1, 2))
    _line(f"bm={bm} align_tokens {_time(aligned, ids, E, bm) * 1e6:.1f} us")
    a = aligned(ids, E, bm)
    rows = int(a.num_rows)
    gu_cfgs = GATE_UP_CONFIGS[:2] if quick else GATE_UP_CONFIGS[: 15 if bm == 32 else 8]
    dn_cfgs = DOWN_CONFIGS[:2] if quick else DOWN_CONFIGS[: 17 if bm == 32 else 10]
    h_ref, res_gu = None, []
    for bn, bk, nw, ns, ev in gu_cfgs:
        if time.perf_counter() > t_end:
            break
        g = G(bn, bk, group_m=big, num_warps=nw, num_stages=ns, evict_first=ev)
        fn = jax.jit(
            functools.partial(
                triton.moe_gate_up,
                top_k=k,
                activation="silu",
                block_m=bm,
                blocks=g,
                interpret=CPU,
            )
        )
        try:
            h = fn(a.sorted_slots, a.tile_experts, x, wgu)[:rows].astype(jnp.float32)
            h_ref = h if h_ref is None else h_ref
            err = _rel(h, h_ref)
            t = _time(fn, a.sorted_slots, a.tile_experts, x, wgu)
        except Exception as e:  # noqa: BLE001 - a failing config is reported, the sweep goes on
            _line(f"bm={bm} gate_up {g} FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        res_gu.append((t, g))
        _line(
            f"bm={bm} gate_up bn={bn} bk={bk} w={nw} s={ns} ev={int(ev)}: {t * 1e6:7.1f} us "
            f"{gu_bytes / t / 1e12:5.2f} TB/s err {err:.1e}"
        )
    if not res_gu:
        return None
    g_best = min(res_gu, key=lambda r: r[0])[1]
    h = jax.jit(
        functools.partial(
            triton.moe_gate_up,
            top_k=k,
            activation="silu",
            block_m=bm,
            blocks=g_best,
            interpret=CPU,
        )
    )(a.sorted_slots, a.tile_experts, x, wgu)
    comb = jax.jit(functools.partial(common.combine, num_tokens=T, top_k=k, out_dtype=x.dtype))
    y_ref, res_dn = None, []
    for bn, bk, nw, ns, sk, ev in dn_cfgs:
        if time.perf_counter() > t_end:
            break
        d = G(bn, bk, group_m=big, num_warps=nw, num_stages=ns, split_k=sk, evict_first=ev)
        fn = jax.jit(functools.partial(triton.moe_down, block_m=bm, blocks=d, interpret=CPU))
        try:
            o = fn(a.sorted_slots, a.tile_experts, h, wd, tw)
            y = comb(o, a.positions).astype(jnp.float32)
            y_ref = y if y_ref is None else y_ref
            err = _rel(y, y_ref)
            t = _time(fn, a.sorted_slots, a.tile_experts, h, wd, tw)
            tc = _time(comb, o, a.positions)
        except Exception as e:  # noqa: BLE001 - a failing config is reported, the sweep goes on
            _line(f"bm={bm} down {d} FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        res_dn.append((t, d))
        _line(
            f"bm={bm} down bn={bn} bk={bk} w={nw} s={ns} sk={sk} ev={int(ev)}: {t * 1e6:7.1f} us "
            f"{dn_bytes / t / 1e12:5.2f} TB/s err {err:.1e}; combine {tc * 1e6:5.1f} us"
        )
    if not res_dn:
        return None
    return g_best, min(res_dn, key=lambda r: r[0])[1], res_gu, res_dn


def _neighbours(tb):
    """The table's decode entry with one change each."""
    from pallas_kernels.moe.tuning import GemmBlocks as G

    big = 1 << 20
    rep = dataclasses.replace
    return [
        ("down sk1", rep(tb, down=rep(tb.down, split_k=1))),
        (
            "down sk4 bk256 s2",
            rep(tb, down=G(128, 256, group_m=big, num_warps=4, num_stages=2, split_k=4)),
        ),
        (
            "gate_up bk64 w4 s4",
            rep(tb, gate_up=G(128, 64, group_m=big, num_warps=4, num_stages=4)),
        ),
        ("down evict", rep(tb, down=rep(tb.down, evict_first=True))),
        ("gate_up evict", rep(tb, gate_up=rep(tb.gate_up, evict_first=True))),
        ("table again", tb),
    ]


def sweep(budget_s=150.0, whole_only=False, quick=False):
    """Decode shape: each step timed alone (alignment, gate/up, down, combine) per block
    config, then whole calls for the best pairs. One line per config."""
    from pallas_kernels.moe import triton, tuning
    from pallas_kernels.moe.tuning import GemmBlocks as G
    from pallas_kernels.moe.tuning import MoeBlocks

    t_end = time.perf_counter() + budget_s
    shape = SHAPES["tiny" if quick else "decode"]
    T, Hd, I, E, k = shape
    x, wgu, wd, w, ids = case(shape)
    ref = _xla_moe()(x, wgu, wd, w, ids).astype(jnp.float32)

    v = jnp.ones((1 << (20 if CPU else 28),), jnp.bfloat16)
    t = _time(jax.jit(lambda v: v * 1.5), v)
    _line(f"XLA copy x*1.5: {2 * v.nbytes / t / 1e12:.2f} TB/s")
    del v
    best = {}
    for bm in () if whole_only else ((16,) if quick else (32, 16)):
        found = _sweep_steps(bm, x, wgu, wd, w, ids, shape, t_end, quick)
        if found is not None:
            best[bm] = found

    # Whole calls: the best pair per block_m, the old table's decode entry, the runners-up.
    big = 1 << 20
    old_g = G(64, 128, group_m=big, num_warps=4, num_stages=4)
    table = tuning.get_blocks(
        num_tokens=T, top_k=k, num_experts=E, hidden=Hd, inter=I, dtype=x.dtype
    )
    whole = [("old-table", MoeBlocks(32, old_g, old_g)), ("table", table)]
    if whole_only:
        whole += _neighbours(table)
    for bm, (g, d, res_gu, res_dn) in best.items():
        whole.append((f"best bm={bm}", MoeBlocks(bm, g, d)))
        gs = [r[1] for r in sorted(res_gu, key=lambda r: r[0])[:2]]
        ds = [r[1] for r in sorted(res_dn, key=lambda r: r[0])[:2]]
        whole += [
            (f"alt bm={bm}", MoeBlocks(bm, gg, dd)) for gg in gs for dd in ds if (gg, dd) != (g, d)
        ]
    touched = int(jnp.unique(ids).size) * (Hd * 2 * I + I * Hd) * 2
    t = _time(_xla_moe(), x, wgu, wd, w, ids)
    _line(f"whole xla: {t * 1e3:.3f} ms {touched / t / 1e12:.2f} TB/s")
    for name, blocks in whole:
        if time.perf_counter() > t_end + 60:
            break
        fn = jax.jit(
            functools.partial(triton.fused_moe, activation="silu", blocks=blocks, interpret=CPU)
        )
        try:
            err = _rel(fn(x, wgu, wd, w, ids), ref)
            t = _time(fn, x, wgu, wd, w, ids)
        except Exception as e:  # noqa: BLE001 - a failing config is reported, the sweep goes on
            _line(f"whole {name} FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        _line(
            f"whole {name} {blocks}: {t * 1e3:.3f} ms {touched / t / 1e12:.2f} TB/s "
            f"err_vs_xla {err:.1e}"
        )


def _impls():
    import jax_paged_attn as jpa
    from pallas_kernels.moe import mosaic, triton

    return {
        "xla": functools.partial(jpa.fused_moe, backend="xla"),
        "triton": functools.partial(triton.fused_moe, interpret=CPU),
        "mosaic": functools.partial(mosaic.fused_moe, interpret=CPU),
    }


def bench(names, backends, json_path=None):
    """Every backend on every named shape, checked against the first that runs; a table."""
    impls = _impls()
    rows = []
    m = 256 if CPU else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    mm_t = _time(jax.jit(lambda a: a @ a), a)
    big = jnp.ones((1 << (20 if CPU else 28),), jnp.bfloat16)
    cp_t = _time(jax.jit(lambda v: v * 1.5), big)
    ceil = dict(matmul_tflops=2 * m**3 / mm_t / 1e12, copy_tbs=2 * big.nbytes / cp_t / 1e12)
    del a, big
    _line(
        f"device {jax.devices()[0].device_kind}: XLA bf16 matmul {m}^3 "
        f"{ceil['matmul_tflops']:.0f} TFLOP/s, XLA x*1.5 copy {ceil['copy_tbs']:.2f} TB/s"
    )
    for name in names:
        T, Hd, I, E, k = shape = SHAPES[name]
        x, wgu, wd, w, ids = case(shape)
        flops = 2 * T * k * (Hd * 2 * I + I * Hd)
        touched = int(jnp.unique(ids).size) * (Hd * 2 * I + I * Hd) * 2
        ref = None
        for b in backends:
            fn = jax.jit(functools.partial(impls[b], activation="silu"))
            try:
                y = fn(x, wgu, wd, w, ids)
                ref = y.astype(jnp.float32) if ref is None else ref
                err = _rel(y, ref)
                t = _time(fn, x, wgu, wd, w, ids)
            except Exception as e:  # report and go on: one failing backend must not hide others
                _line(f"{name:14s} {b:7s} FAILED: {type(e).__name__}: {str(e)[:300]}")
                continue
            row = dict(
                shape=name,
                backend=b,
                ms=t * 1e3,
                tflops=flops / t / 1e12,
                weights_tbs=touched / t / 1e12,
                rel_err_vs_first=err,
            )
            rows.append(row)
            _line(
                f"{name:14s} {b:7s} {t * 1e3:8.3f} ms {row['tflops']:7.1f} TFLOP/s "
                f"{row['weights_tbs']:5.2f} TB/s(weights) rel_err {err:.2e}"
            )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(ceilings=ceil, rows=rows), f, indent=1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_kernels", description=__doc__)
    p.add_argument("--shapes", default="mixtral,decode,small_experts")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backends", default="xla,triton,mosaic")
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true", help="decode stage/block sweep only")
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--whole-only", action="store_true", help="--sweep: whole calls only")
    p.add_argument("--timing", choices=("device", "wall"), default="device")
    p.add_argument(
        "--quick", action="store_true", help="tiny shape, few samples (CPU: kernels interpreted)"
    )
    args = p.parse_args(argv)
    OPTS.update(iters=3 if args.quick else args.iters, device=args.timing == "device")
    if args.sweep:
        sweep(budget_s=args.budget_s, whole_only=args.whole_only, quick=args.quick)
        return
    names = ["tiny"] if args.quick else args.shapes.split(",")
    bench(names, args.backends.split(","), args.json)


if __name__ == "__main__":
    main()
