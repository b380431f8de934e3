"""What the probe scripts share: the timing loops, the A/B rounds and a paged bf16 KV cache.

Imported by the scripts beside it (run as ``python3 scripts/NAME.py``: this folder is on
``sys.path``). The sample loop and the profiler trace are benchmarks/run.py's.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import gpu_events, jax_device_time, sample_times  # noqa: E402

CPU = jax.default_backend() != "gpu"


def median_time(f, *a, iters, min_sample_s=3e-3):
    """(median seconds per call, last output): after 2 warm-up calls, ``iters`` samples of
    ``reps`` back-to-back calls (a sample lasts >= ``min_sample_s`` on a GPU), each followed by
    ``block_until_ready``."""
    jax.block_until_ready(f(*a))
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    jax.block_until_ready(f(*a))
    one = time.perf_counter() - t
    reps = 1 if CPU else max(1, int(min_sample_s / max(one, 1e-6)))
    ts, out = sample_times(lambda: f(*a), iters, reps)
    return float(np.median(ts)), out


def probe_time(f, *a, iters, device):
    """(seconds per call, last output): ``median_time``, or with ``device`` the GPU busy time per
    call of ``iters`` back-to-back calls (``benchmarks.run.jax_device_time``, as the benchmarks)."""
    t, out = median_time(f, *a, iters=iters)
    if device:
        t = jax_device_time(f, [a], iters) or t
    return t, out


def ab_rounds(name, rows, figure, *, deadline, width=42, rounds=2):
    """Times every row ``rounds`` times in A B ... A B order, so drift shows, and prints a
    summary: the median of the rounds (the mean of two).

    rows: [(label, ref_key, run)] with run() -> (seconds, output); each output is compared with
    the first output of its ref_key (relative L2). figure(seconds) -> str. A failing row is
    reported and the rest go on; rows past ``deadline`` (time.perf_counter()) are skipped.
    """
    refs, results = {}, {}
    for rnd in range(rounds):
        for label, key, run in rows:
            if time.perf_counter() > deadline:
                print(f"{name} {label}: skipped (budget)", flush=True)
                continue
            try:
                t, out = run()
            except Exception as e:  # noqa: BLE001 - a failing row is reported, the probe goes on
                print(f"{name} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            ref = refs.setdefault(key, out)
            results.setdefault(label, []).append(t)
            print(
                f"{name} [{rnd}] {label:{width}s} {t * 1e6:9.1f} us {figure(t)} "
                f"err {rel_err(out, ref):.1e}",
                flush=True,
            )
    base = np.median(results.get(rows[0][0], [np.nan]))
    print(f"{name} summary (median of {rounds} rounds, ratio to '{rows[0][0]}'):", flush=True)
    for label, ts in results.items():
        print(
            f"  {label:{width}s} {figure(np.median(ts))}  x{base / np.median(ts):.3f}", flush=True
        )


def paged_cache(num_seqs, ctx, num_kv_heads, head_dim, block_size, *, identity=False, seed=0):
    """Random bf16 K/V pages [NB, Hkv, BS, D] holding ``num_seqs`` contexts of ``ctx`` tokens
    and their block table: a random permutation of the pages, or in order (``identity``)."""
    nb = num_seqs * ctx // block_size
    ks = jax.random.split(jax.random.key(seed), 3)
    k, v = (
        jax.random.normal(x, (nb, num_kv_heads, block_size, head_dim), jnp.bfloat16) for x in ks[:2]
    )
    order = jnp.arange(nb) if identity else jax.random.permutation(ks[2], nb)
    return k, v, order.reshape(num_seqs, ctx // block_size).astype(jnp.int32)


def rel_err(a, b):
    """Relative L2 error of ``a`` against ``b`` (f32)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def kernel_breakdown(f, *a, calls=10):
    """[(microseconds per call, launches per call, kernel name)] of ``calls`` back-to-back calls
    of ``f`` on the GPU (a ``jax.profiler`` trace), longest first: where a call's time goes."""
    jax.block_until_ready(f(*a))
    total, count = {}, {}
    for name, start, end in gpu_events(f, [a], calls):
        total[name] = total.get(name, 0) + end - start
        count[name] = count.get(name, 0) + 1
    return sorted(((t / calls / 1e3, count[n] / calls, n) for n, t in total.items()), reverse=True)
