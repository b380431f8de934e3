"""Scale-out benchmark: tensor-parallel paged decode and expert-parallel fused MoE, N devices vs 1.

    python -m benchmarks.sharded [--devices 1,2] [--backend auto] [--quick] [--iters 20]
                                 [--warmup 3] [--json PATH]

For each shape and each device count ``n`` (default: 1 and every power of two up to the devices
JAX sees), it times
- decode: ``paged_decode`` on one device (n = 1), ``shard_paged_decode`` over a 1-D mesh of n
  devices (query and KV heads split; KV heads replicated when fewer than n);
- moe: ``fused_moe`` on one device (n = 1), ``shard_fused_moe`` with ``E / n`` experts per
  device and a psum;
through the public API, each output checked against the single-device one first (relative L2
error; a mismatch marks the row ``invalid``). Timing: one compile-and-run call, ``--warmup``
calls, then ``--iters`` (>= 20) samples; a sample is ``reps`` back-to-back calls (enough for
>= 2 ms) then ``block_until_ready``, divided by ``reps``; the row reports the median sample,
the speed-up over n = 1 and the parallel efficiency (speed-up / n).

On a CPU it makes 8 host devices itself and ``--quick`` uses tiny shapes (a smoke test of the
harness; host "devices" share the cores, so CPU speed-ups mean nothing). On GPUs it uses the
named shapes of ``benchmarks/shapes.py`` (Llama-3-8B decode, Mixtral-8x7B MoE).
Prints a table and writes JSON (default ``benchmarks/results/sharded.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402

# 8 host devices when JAX runs on the CPU (before the CPU backend starts; GPUs stay default).
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_paged_attn as jpa  # noqa: E402
from benchmarks import shapes as S  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.harness import tolerance  # noqa: E402
from benchmarks.moe import shape_inputs  # noqa: E402
from jax_paged_attn import sharding as sh  # noqa: E402
from jax_paged_attn.testing import random_paged_kv, rel_error  # noqa: E402

MIN_SAMPLE_S = 2e-3

# CPU twins: 8 query heads over 2 KV heads (replicated 4x on 8 devices), 8 experts.
TINY_DECODE_TP = S.DecodeShape(
    "tiny_decode_tp",
    num_seqs=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    context_len=40,
    dtype="float32",
)
TINY_MOE_EP = S.MoEShape(
    "tiny_moe_ep", num_tokens=16, num_experts=8, top_k=2, hidden=64, inter=128, dtype="float32"
)


def suite(quick: bool):
    if quick:
        return [("decode", TINY_DECODE_TP), ("moe", TINY_MOE_EP)]
    return [("decode", S.DECODE), ("moe", S.MOE_MIXTRAL_DECODE), ("moe", S.MOE_MIXTRAL)]


# ---------------------------------------------------------------------------------------------
# Inputs (made on the default device, placed per device count)


def decode_inputs(shape: S.DecodeShape, seed=0):
    """q and a cache of random K/V in permuted blocks (``testing.random_paged_kv``)."""
    kc, kq = jax.random.split(jax.random.key(seed))
    cache, tables, lens = random_paged_kv(
        kc,
        shape.context_lens,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        block_size=shape.block_size,
        dtype=jnp.dtype(shape.dtype),
    )
    q = jax.random.normal(kq, (shape.num_seqs, shape.num_heads, shape.head_dim), jnp.float32)
    return q.astype(shape.dtype), cache, tables, lens


def moe_inputs(shape: S.MoEShape, seed=0):
    return shape_inputs(shape, jax.random.key(seed), renormalize=True)


# ---------------------------------------------------------------------------------------------
# The functions under test, for n devices


def decode_fn(shape, n, devices, kw):
    q, cache, tables, lens = decode_inputs(shape)
    if n == 1:
        put = lambda a: jax.device_put(a, devices[0])  # noqa: E731
        args = jax.tree.map(put, (q, cache, tables, lens))
        return jax.jit(lambda q, c, t, l: jpa.paged_decode(q, c, t, l, **kw)), args
    mesh = Mesh(np.array(devices[:n]), ("tp",))
    specs = sh.attention_specs(mesh, "tp", shape.num_heads, shape.num_kv_heads)
    named = specs.shardings(mesh)
    args = (
        jax.device_put(q, named.q),
        sh.shard_cache(cache, mesh, "tp", shape.num_heads),
        jax.device_put(tables, named.meta),
        jax.device_put(lens, named.meta),
    )
    return jax.jit(sh.shard_paged_decode(mesh, "tp", **kw)), args


def moe_fn(shape, n, devices, kw):
    x, wgu, wd, weights, ids = moe_inputs(shape)
    kw = dict(kw, activation=shape.activation)
    if n == 1:
        args = jax.tree.map(lambda a: jax.device_put(a, devices[0]), (x, wgu, wd, weights, ids))
        return jax.jit(lambda *a: jpa.fused_moe(*a, **kw)), args
    mesh = Mesh(np.array(devices[:n]), ("ep",))
    rep, experts = NamedSharding(mesh, P()), NamedSharding(mesh, P("ep"))
    args = (
        jax.device_put(x, rep),
        jax.device_put(wgu, experts),
        jax.device_put(wd, experts),
        jax.device_put(weights, rep),
        jax.device_put(ids, rep),
    )
    return jax.jit(sh.shard_fused_moe(mesh, "ep", **kw)), args


# ---------------------------------------------------------------------------------------------
# Timing and checks


def time_fn(fn, args, iters: int, warmup: int) -> dict:
    """benchmarks.timing.measure (wall clock: a sample is >= 2 ms of back-to-back calls)."""
    res = timing.measure(fn, [args], iters=iters, warmup=warmup, min_sample_s=MIN_SAMPLE_S)
    keep = ("time_s", "time_min_s", "time_max_s", "iters", "reps", "first_call_s")
    return {k: res[k] for k in keep}


def splits(group, shape, n) -> bool:
    if group == "decode":
        try:
            sh.kv_head_layout(shape.num_heads, shape.num_kv_heads, n)
        except ValueError:
            return False
        return True
    return shape.num_experts % n == 0


def run(args) -> list[dict]:
    devices = jax.devices()
    platform = jax.default_backend()
    interpret = args.backend not in ("xla", "auto") and platform == "cpu"
    kw = dict(backend=args.backend, interpret=interpret)
    rows = []
    for group, shape in suite(args.quick):
        base, ref = None, None
        for n in args.devices:
            if n > len(devices) or not splits(group, shape, n):
                print(f"skip {shape.name} n={n}: {len(devices)} devices / does not split")
                continue
            fn, fargs = (decode_fn if group == "decode" else moe_fn)(shape, n, devices, kw)
            row = {
                "group": group,
                "shape": shape.name,
                "devices": n,
                "backend": args.backend,
                "dtype": shape.dtype,
                "shape_fields": dataclasses.asdict(shape),
            }
            try:
                out = jax.block_until_ready(fn(*fargs))
                if n == 1:
                    ref = out
                err = rel_error(out, ref) if ref is not None else None
                row["rel_err_vs_1"] = err
                row["valid"] = err is None or err <= tolerance(shape.dtype)
                row.update(time_fn(fn, fargs, args.iters, args.warmup))
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                rows.append(row)
                print(f"{shape.name:22s} n={n}: ERROR {row['error']}", flush=True)
                continue
            if n == 1:
                base = row["time_s"]
            if base is not None:
                row["speedup_vs_1"] = base / row["time_s"]
                row["efficiency"] = row["speedup_vs_1"] / n
            if group == "decode":
                row["kv_TB/s"] = shape.kv_bytes / row["time_s"] / 1e12
            else:
                row["TFLOP/s"] = shape.flops / row["time_s"] / 1e12
            rows.append(row)
            print(line(row), flush=True)
            del fn, fargs, out
    return rows


def line(r: dict) -> str:
    if "error" in r:
        return f"| {r['shape']} | {r['devices']} | error: {r['error']} | | | |"
    rate = f"{r['kv_TB/s']:.3f} TB/s" if "kv_TB/s" in r else f"{r['TFLOP/s']:.2f} TFLOP/s"
    sp = r.get("speedup_vs_1")
    err = r.get("rel_err_vs_1")
    return (
        f"| {r['shape']} | {r['devices']} | {r['time_s'] * 1e3:.3f} ms | "
        f"{'-' if sp is None else f'{sp:.2f}x ({r["efficiency"]:.0%})'} | {rate} | "
        f"{'ok' if r['valid'] else 'INVALID'} ({0 if err is None else err:.1e}) |"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--devices",
        default=None,
        help="comma-separated device counts (default: 1 and powers of two)",
    )
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (default on a CPU)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--json", default=os.path.join(os.path.dirname(__file__), "results", "sharded.json")
    )
    args = ap.parse_args(argv)
    if args.iters < 20:
        ap.error("--iters must be >= 20 (the median of at least 20 timed runs)")
    count = jax.device_count()
    if args.devices is None:
        args.devices = [1] + [2**i for i in range(1, count.bit_length()) if 2**i <= count]
    else:
        args.devices = [int(d) for d in args.devices.split(",")]
    if jax.default_backend() == "cpu":
        args.quick = True
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__}, {count} x {getattr(dev, 'device_kind', dev.platform)}; "
        f"backend={args.backend}; devices {args.devices}",
        flush=True,
    )
    print(
        "| shape | devices | median | speed-up vs 1 (efficiency) | rate | check |\n"
        "| --- | --- | --- | --- | --- | --- |",
        flush=True,
    )
    rows = run(args)
    doc = {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": jax.default_backend(),
        "num_devices": count,
        "jax_version": jax.__version__,
        "argv": sys.argv,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "iters": args.iters,
        "warmup": args.warmup,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"wrote {args.json}")
    bad = [r for r in rows if "error" in r or not r.get("valid", False)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
