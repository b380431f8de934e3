"""GPU check + benchmark of the fused-MoE kernels (run on the lent GPU, prints a table).

    python -m pallas_kernels.moe.bench [--shapes mixtral,decode,small_experts] [--iters 20]
    python -m pallas_kernels.moe.bench --sweep [--budget-s 150]   # decode stages + blocks

For each named shape: checks triton and mosaic against the ``xla`` path (sorted
``lax.ragged_dot``, jax_paged_attn.reference) by relative L2 error, then times all three
(median of ``--iters`` samples after warm-up; a sample is enough back-to-back calls to
last >= 2 ms, then block_until_ready, as benchmarks/run.py does) and reports TFLOP/s
(2*T*k*(Hd*2I + I*Hd)) and TB/s of expert weights touched (distinct experts routed to),
plus a bf16 8192^3 XLA matmul and a device-copy ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _time(fn, *args, iters=20, min_sample_s=2e-3):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    reps = max(1, min(50, int(min_sample_s / max(time.perf_counter() - t0, 1e-6)) + 1))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / reps)
    return float(np.median(ts))


def sweep(iters=10, budget_s=150.0, whole_only=False):
    """Decode shape: each step timed alone (alignment, gate/up, down, combine) per block
    config, then whole calls for the best pairs. One line per config."""
    from jax_paged_attn import reference
    from pallas_kernels.moe import align, common, triton, tuning
    from pallas_kernels.moe.tuning import GemmBlocks as G
    from pallas_kernels.moe.tuning import MoeBlocks

    t_end = time.perf_counter() + budget_s
    T, Hd, I, E, k = SHAPES["decode"]
    x, wgu, wd, w, ids = _case(SHAPES["decode"])
    gu_bytes, dn_bytes = E * Hd * 2 * I * 2, E * I * Hd * 2
    tw = w.reshape(-1).astype(jnp.float32)
    ref = jax.jit(functools.partial(reference.fused_moe, activation="silu"))(x, wgu, wd, w, ids)
    ref = ref.astype(jnp.float32)
    big = 1 << 20
    gu_cfgs = [  # bn, bk, warps, stages, evict
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
    ]
    dn_cfgs = [  # bn, bk, warps, stages, split, evict
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
    ]

    def line(*a):
        print(*a, flush=True)

    v = jnp.ones((1 << 28,), jnp.bfloat16)
    t = _time(jax.jit(lambda v: v * 1.5), v, iters=iters)
    line(f"XLA copy x*1.5: {2 * v.nbytes / t / 1e12:.2f} TB/s")
    del v
    best = {}
    for bm in () if whole_only else (32, 16):
        aligned = jax.jit(align.align_tokens, static_argnums=(1, 2))
        line(f"bm={bm} align_tokens {_time(aligned, ids, E, bm, iters=iters) * 1e6:.1f} us")
        a = aligned(ids, E, bm)
        rows = int(a.num_rows)
        h_ref, res_gu = None, []
        for bn, bk, nw, ns, ev in gu_cfgs if bm == 32 else gu_cfgs[:8]:
            if time.perf_counter() > t_end:
                break
            g = G(bn, bk, group_m=big, num_warps=nw, num_stages=ns, evict_first=ev)
            fn = jax.jit(
                functools.partial(
                    triton.moe_gate_up, top_k=k, activation="silu", block_m=bm, blocks=g
                )
            )
            try:
                h = fn(a.sorted_slots, a.tile_experts, x, wgu)[:rows].astype(jnp.float32)
                if h_ref is None:
                    h_ref = h
                err = float(jnp.linalg.norm(h - h_ref) / jnp.linalg.norm(h_ref))
                t = _time(fn, a.sorted_slots, a.tile_experts, x, wgu, iters=iters)
            except Exception as e:  # noqa: BLE001
                line(f"bm={bm} gate_up {g} FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            res_gu.append((t, g))
            line(
                f"bm={bm} gate_up bn={bn} bk={bk} w={nw} s={ns} ev={int(ev)}: {t * 1e6:7.1f} us "
                f"{gu_bytes / t / 1e12:5.2f} TB/s err {err:.1e}"
            )
        if not res_gu:
            continue
        g_best = min(res_gu, key=lambda r: r[0])[1]
        h = jax.jit(
            functools.partial(
                triton.moe_gate_up, top_k=k, activation="silu", block_m=bm, blocks=g_best
            )
        )(a.sorted_slots, a.tile_experts, x, wgu)
        y_ref, res_dn = None, []
        for bn, bk, nw, ns, sk, ev in dn_cfgs if bm == 32 else dn_cfgs[:10]:
            if time.perf_counter() > t_end:
                break
            d = G(bn, bk, group_m=big, num_warps=nw, num_stages=ns, split_k=sk, evict_first=ev)
            fn = jax.jit(functools.partial(triton.moe_down, block_m=bm, blocks=d))
            comb = jax.jit(
                functools.partial(common.combine, num_tokens=T, top_k=k, out_dtype=jnp.bfloat16)
            )
            try:
                o = fn(a.sorted_slots, a.tile_experts, h, wd, tw)
                y = comb(o, a.positions).astype(jnp.float32)
                if y_ref is None:
                    y_ref = y
                err = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
                t = _time(fn, a.sorted_slots, a.tile_experts, h, wd, tw, iters=iters)
                tc = _time(comb, o, a.positions, iters=iters)
            except Exception as e:  # noqa: BLE001
                line(f"bm={bm} down {d} FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            res_dn.append((t, d))
            line(
                f"bm={bm} down bn={bn} bk={bk} w={nw} s={ns} sk={sk} ev={int(ev)}: {t * 1e6:7.1f} us "
                f"{dn_bytes / t / 1e12:5.2f} TB/s err {err:.1e}; combine {tc * 1e6:5.1f} us"
            )
        if res_dn:
            best[bm] = (g_best, min(res_dn, key=lambda r: r[0])[1], res_gu, res_dn)

    # Whole calls: the best pair per block_m, the old table's decode entry, the runners-up.
    old_g = G(64, 128, group_m=big, num_warps=4, num_stages=4)
    whole = [
        ("old-table", MoeBlocks(32, old_g, old_g)),
        (
            "table",
            tuning.get_blocks(
                num_tokens=T, top_k=k, num_experts=E, hidden=Hd, inter=I, dtype=x.dtype
            ),
        ),
    ]
    if whole_only:  # neighbours of the table's decode entry, one change each
        tb = whole[1][1]
        whole += [
            ("down sk1", dataclasses.replace(tb, down=dataclasses.replace(tb.down, split_k=1))),
            (
                "down sk4 bk256 s2",
                dataclasses.replace(
                    tb, down=G(128, 256, group_m=big, num_warps=4, num_stages=2, split_k=4)
                ),
            ),
            (
                "gate_up bk64 w4 s4",
                dataclasses.replace(tb, gate_up=G(128, 64, group_m=big, num_warps=4, num_stages=4)),
            ),
            (
                "down evict",
                dataclasses.replace(tb, down=dataclasses.replace(tb.down, evict_first=True)),
            ),
            (
                "gate_up evict",
                dataclasses.replace(tb, gate_up=dataclasses.replace(tb.gate_up, evict_first=True)),
            ),
            ("table again", tb),
        ]
    for bm, (g, d, res_gu, res_dn) in best.items():
        whole.append((f"best bm={bm}", MoeBlocks(bm, g, d)))
        gs = [r[1] for r in sorted(res_gu, key=lambda r: r[0])[:2]]
        ds = [r[1] for r in sorted(res_dn, key=lambda r: r[0])[:2]]
        whole += [
            (f"alt bm={bm}", MoeBlocks(bm, gg, dd)) for gg in gs for dd in ds if (gg, dd) != (g, d)
        ]
    xla_fn = jax.jit(functools.partial(reference.fused_moe, activation="silu"))
    touched = int(jnp.unique(ids).size) * (gu_bytes + dn_bytes) // E
    t = _time(xla_fn, x, wgu, wd, w, ids, iters=iters)
    line(f"whole xla: {t * 1e3:.3f} ms {touched / t / 1e12:.2f} TB/s")
    for name, blocks in whole:
        if time.perf_counter() > t_end + 60:
            break
        fn = jax.jit(functools.partial(triton.fused_moe, activation="silu", blocks=blocks))
        try:
            y = fn(x, wgu, wd, w, ids).astype(jnp.float32)
            err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            t = _time(fn, x, wgu, wd, w, ids, iters=iters)
        except Exception as e:  # noqa: BLE001
            line(f"whole {name} FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        line(
            f"whole {name} {blocks}: {t * 1e3:.3f} ms {touched / t / 1e12:.2f} TB/s err_vs_xla {err:.1e}"
        )


def _case(shape, dtype=jnp.bfloat16, seed=0):
    T, Hd, I, E, k = shape
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (T, Hd), dtype)
    wgu = (jax.random.normal(ks[1], (E, Hd, 2 * I), jnp.float32) / Hd**0.5).astype(dtype)
    wd = (jax.random.normal(ks[2], (E, I, Hd), jnp.float32) / I**0.5).astype(dtype)
    logits = jax.random.normal(ks[3], (T, E), jnp.float32)
    w, ids = jax.lax.top_k(jax.nn.softmax(logits, -1), k)
    return x, wgu, wd, w, ids.astype(jnp.int32)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backends", default="xla,triton,mosaic")
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true", help="decode stage/block sweep only")
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--whole-only", action="store_true", help="--sweep: whole calls only")
    args = p.parse_args(argv)
    if args.sweep:
        sweep(iters=args.iters, budget_s=args.budget_s, whole_only=args.whole_only)
        return
    from jax_paged_attn import reference
    from pallas_kernels.moe import mosaic, triton

    impls = {"xla": reference.fused_moe, "triton": triton.fused_moe, "mosaic": mosaic.fused_moe}
    rows = []
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    mm_t = _time(jax.jit(lambda a: a @ a), a, iters=args.iters)
    big = jnp.ones((1 << 28,), jnp.bfloat16)
    cp_t = _time(jax.jit(lambda v: v * 1.5), big, iters=args.iters)
    ceil = dict(matmul_tflops=2 * 8192**3 / mm_t / 1e12, copy_tbs=2 * big.nbytes / cp_t / 1e12)
    print(
        f"device {jax.devices()[0].device_kind}: XLA bf16 matmul 8192^3 "
        f"{ceil['matmul_tflops']:.0f} TFLOP/s, XLA x*1.5 copy {ceil['copy_tbs']:.2f} TB/s"
    )
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
            row = dict(
                shape=name,
                backend=b,
                ms=t * 1e3,
                tflops=flops / t / 1e12,
                weights_tbs=touched / t / 1e12,
                rel_err_vs_first=err,
            )
            rows.append(row)
            print(
                f"{name:14s} {b:7s} {t * 1e3:8.3f} ms {row['tflops']:7.1f} TFLOP/s "
                f"{row['weights_tbs']:5.2f} TB/s(weights) rel_err {err:.2e}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceilings=ceil, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
