"""What the probe scripts share beyond ``benchmarks.timing``: the A/B rounds.

Imported by the scripts beside it (run as ``python3 scripts/NAME.py``: this folder is on
``sys.path``, and this module puts the repository root there for ``benchmarks`` and the
packages). Timing is ``benchmarks.timing`` (``time_fn``, ``time_torch``, ``kernel_breakdown``);
paged caches are ``jax_paged_attn.testing.random_paged_kv``.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing  # noqa: E402
from jax_paged_attn.testing import rel_error  # noqa: E402

CPU = not timing.on_gpu()


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
                f"err {rel_error(out, ref):.1e}",
                flush=True,
            )
    base = np.median(results.get(rows[0][0], [np.nan]))
    print(f"{name} summary (median of {rounds} rounds, ratio to '{rows[0][0]}'):", flush=True)
    for label, ts in results.items():
        print(
            f"  {label:{width}s} {figure(np.median(ts))}  x{base / np.median(ts):.3f}", flush=True
        )
