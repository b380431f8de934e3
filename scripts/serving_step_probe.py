"""Serving-step probe (GPU): one ``paged_attention`` call over a whole step against the split.

For each model head layout and step mix (``D`` decode rows at context ``Ld`` first, as vLLM
orders a step, then prefill chunks of ``n`` rows at context ``L``), in one process:

* ``one``: ``paged_attention`` over the whole step (now: one-row sequences on the decode kernel,
  decided on the device, ``jax_paged_attn/_serving_step.py``);
* ``kernel``: the backend's prefill kernel over every row (what ``one`` was before);
* ``split``: the prefill kernel on the chunks + ``paged_decode`` on the decode rows, one jit;
* ``decode``: ``paged_decode`` alone on the decode rows (decode-only steps).

Prints device time (GPU busy time per call, as the benchmarks) and wall time per call (the
difference shows host-side costs such as a conditional's predicate read), ``one / split``, and
the relative L2 error of ``one`` against ``split``.

    python3 scripts/serving_step_probe.py [--backends auto,mosaic,triton] [--budget-s 240]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

import jax_paged_attn as jpa
from benchmarks import timing
from jax_paged_attn import backends
from jax_paged_attn.testing import random_paged_kv

CPU = jax.default_backend() == "cpu"
ap = argparse.ArgumentParser()
ap.add_argument("--backends", default="xla" if CPU else "auto,mosaic,triton")
ap.add_argument("--budget-s", type=float, default=240.0)
ap.add_argument("--iters", type=int, default=2 if CPU else 20)
ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
args = ap.parse_args()
T0 = time.perf_counter()

# name: (H, Hkv, D)
MODELS = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "llama3-70b-tp8": (8, 1, 128)}
# name: (decode rows, decode context, [(chunk rows, chunk context), ...])
MIXES = {
    "dec 64x4096": (64, 4096, []),
    "dec 256x2048": (256, 2048, []),
    "dec 8x32768": (8, 32768, []),
    "2048@8k + 128x4096": (128, 4096, [(2048, 8192)]),
    "512@4k + 255x4096": (255, 4096, [(512, 4096)]),
    "256@16k + 60x16384": (60, 16384, [(256, 16384)]),
    "4x2048@8k": (0, 0, [(2048, 8192)] * 4),
}
if args.small:
    MODELS = {"tiny": (4, 2, 64)}
    MIXES = {"dec": (4, 40, []), "mixed": (3, 40, [(20, 50)])}


def build(model, mix, key):
    h, hkv, d = MODELS[model]
    nd, ld, chunks = MIXES[mix]
    lens = [ld] * nd + [c for _, c in chunks]
    rows = [1] * nd + [n for n, _ in chunks]
    cache, tables, lens = random_paged_kv(
        key, lens, num_kv_heads=hkv, head_dim=d, block_size=16, dtype=jnp.bfloat16
    )
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(rows)]), jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 1), (int(cu[-1]), h, d), jnp.bfloat16)
    return cache, tables, lens, cu, q, nd


def timed(fn, *a):
    res = timing.measure(fn, [a], iters=args.iters, device_calls=0 if CPU else args.iters)
    return res["time_s"], res["wall_time_s"]


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


print(f"{'model':16s} {'mix':22s} {'backend':8s} {'path':7s} {'dev us':>9s} {'wall us':>9s}")
for model in MODELS:
    for mix in MIXES:
        if time.perf_counter() - T0 > args.budget_s:
            print(f"budget spent: {model} {mix} and later skipped")
            continue
        cache, tables, lens, cu, q, nd = build(model, mix, jax.random.key(0))
        meta = jpa.AttentionMetadata(tables, lens, cu)
        for be in args.backends.split(","):
            kw = dict(backend=be, interpret=CPU and be != "xla")
            rows = {}
            try:
                one = jax.jit(lambda q, c, m, kw=kw: jpa.paged_attention(q, c, m, **kw))
                rows["one"] = (one, q, cache, meta)
                cfg = dict(
                    head_dim=cache.head_dim,
                    block_size=16,
                    q_dtype=q.dtype,
                    kv_dtype=cache.dtype,
                )
                impl = backends.implementation(
                    "attention", be, interpret=kw["interpret"], config=cfg
                )
                scale = 1.0 / np.sqrt(cache.head_dim)
                fixed = dict(
                    scale=scale,
                    softcap=None,
                    sliding_window=None,
                    alibi_slopes=None,
                    sinks=None,
                    k_scale=None,
                    v_scale=None,
                    interpret=kw["interpret"],
                )

                def kernel(q, k, v, t, ln, c, impl=impl, fixed=fixed):
                    return impl.paged_attention(q, k, v, t, ln, c, **fixed)

                rows["kernel"] = (jax.jit(kernel), q, cache.k, cache.v, tables, lens, cu)

                def split(q, c, t, ln, cu, kw=kw, kernel=kernel, nd=nd):
                    outs = []  # the decode rows through the API, the chunks on the bare kernel
                    if nd:
                        outs.append(jpa.paged_decode(q[:nd], c, t[:nd], ln[:nd], **kw))
                    if cu.shape[0] - 1 > nd:
                        outs.append(kernel(q[nd:], c.k, c.v, t[nd:], ln[nd:], cu[nd:] - nd))
                    return jnp.concatenate(outs)

                rows["split"] = (jax.jit(split), q, cache, tables, lens, cu)
            except Exception as e:  # noqa: BLE001 - a probe row records its error
                print(f"{model:16s} {mix:22s} {be:8s} error: {str(e).splitlines()[0][:100]}")
                continue
            times, outs = {}, {}
            for path, (fn, *a) in rows.items():
                try:
                    outs[path] = fn(*a)
                    times[path] = timed(fn, *a)
                except Exception as e:  # noqa: BLE001
                    print(f"{model:16s} {mix:22s} {be:8s} {path:7s} error: {str(e)[:100]}")
            for path, (dev, wall) in times.items():
                err = rel(outs[path], outs["split"]) if "split" in outs else float("nan")
                ratio = dev / times["split"][0] if "split" in times else float("nan")
                print(
                    f"{model:16s} {mix:22s} {be:8s} {path:7s} {dev * 1e6:9.1f} {wall * 1e6:9.1f}"
                    f"  /split {ratio:5.2f}  err {err:.1e}",
                    flush=True,
                )
        del cache
print(f"done in {time.perf_counter() - T0:.0f} s")
