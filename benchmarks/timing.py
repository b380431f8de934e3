"""The one timer of the benchmarks and the probes.

- :func:`measure`: one compile-and-run call, warm-up calls, then ``iters`` samples; a sample is
  ``reps`` back-to-back calls (``reps`` chosen so a sample lasts >= ``min_sample_s``: host
  dispatch then overlaps the device) closed by a sync of the last output, divided by ``reps``;
  the median sample is the wall time. With ``device_calls`` the figure is device time instead:
  the GPU's busy time per call of that many back-to-back calls (JAX: :func:`jax_device_time`
  from a ``jax.profiler`` trace; torch: :func:`torch_device_time`, CUDA events).
- :func:`time_fn`: ``measure`` for one argument tuple, returning ``(seconds, output)`` (the
  probes' form); :func:`time_torch`: the same for a torch call.
- :func:`sample_times`: the sample loop itself.
- :func:`gpu_events`, :func:`jax_device_time`, :func:`kernel_breakdown`: what a profiler trace
  of a few calls says (busy time, where a call's time goes).
- :func:`num_sets`: how many independent input copies to rotate among so inputs smaller than
  the L2 cache are not served from it.

Why device time: between two jitted calls JAX leaves the GPU idle for its dispatch (5-6% of a
0.4 ms decode call, against 0.2-0.4% for torch: ``scripts/timing_probe.py``,
benchmarks/NOTES.md), which a wall-clock loop would charge to JAX calls only.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time

import jax

L2_BYTES = 50 * 2**20  # H100 L2 is 50 MB: smaller inputs are rotated among several copies
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "TraceMe", "Source")


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def jax_sync(out):
    jax.block_until_ready(out)


def torch_sync(torch):
    """A sync for torch calls: ``torch.cuda.synchronize`` (the output is not needed)."""

    def sync(_):
        torch.cuda.synchronize()

    return sync


def num_sets(nbytes: int, l2_bytes: int = L2_BYTES) -> int:
    """Independent input copies: 1 when the inputs exceed L2, else enough for ~2x L2 (2 to 8)."""
    if nbytes >= l2_bytes:
        return 1
    return int(min(8, max(2, math.ceil(2 * l2_bytes / max(nbytes, 1)))))


def sample_times(call, iters, reps, sync=jax_sync):
    """``iters`` samples of ``reps`` back-to-back ``call()``s, each closed by ``sync`` of the
    last output: (seconds per call of each sample, the last output)."""
    samples = []
    out = None
    for _ in range(iters):
        t = time.perf_counter()
        for _ in range(reps):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - t) / reps)
    return samples, out


def reps_for(single: float, min_sample_s: float, cap: int = 64) -> int:
    """Back-to-back calls per sample so that a sample lasts >= ``min_sample_s``."""
    if single >= min_sample_s:
        return 1
    return min(cap, math.ceil(min_sample_s / max(single, 1e-7)))


def measure(
    fn,
    arg_sets,
    *,
    iters: int = 20,
    warmup: int = 3,
    min_sample_s: float = 2e-3,
    max_row_s: float = math.inf,
    sync=jax_sync,
    on_first=None,
    device_calls: int = 0,
    torch=None,
) -> dict:
    """Times ``fn(*arg_sets[i % n])``; returns a dict of timing fields.

    ``on_first(out)`` sees the output of the first call (compile + run) on ``arg_sets[0]``.
    Warm-up stops early after ``max_row_s / 4`` seconds; the samples are cut to fit
    ``max_row_s`` (at least 3). ``device_calls > 0``: the figure (``time_s``) is device time of
    ``max(device_calls, reps)`` calls: CUDA events when ``torch`` is given (torch calls), else
    a ``jax.profiler`` trace; it stays the wall time when the trace holds no GPU events.
    """
    n = len(arg_sets)
    t = time.perf_counter()
    out = fn(*arg_sets[0])
    sync(out)
    first = time.perf_counter() - t
    if on_first is not None:
        on_first(out)
    del out
    tw = time.perf_counter()
    single = first
    for i in range(max(1, warmup)):  # the last warm-up call estimates one call's time
        t = time.perf_counter()
        out = fn(*arg_sets[(i + 1) % n])
        sync(out)
        single = time.perf_counter() - t
        del out
        if time.perf_counter() - tw > max_row_s / 4:
            break
    reps = reps_for(single, min_sample_s)
    if single * reps * iters > max_row_s:
        iters = max(3, int(max_row_s / (single * reps)))
    k = itertools.count(1)  # input set of each call (0 was the first call's)
    samples, _ = sample_times(lambda: fn(*arg_sets[next(k) % n]), iters, reps, sync)
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
    if device_calls > 0:
        calls = max(device_calls, reps)
        dev = (
            torch_device_time(torch, fn, arg_sets, calls)
            if torch is not None
            else jax_device_time(fn, arg_sets, calls)
        )
        if dev is not None:
            res.update(time_s=dev, device_time_s=dev, device_calls=calls, timing="device")
    return res


def time_fn(fn, *args, iters=20, warmup=2, min_sample_s=3e-3, device=False):
    """(seconds per call, output of the first call) of ``fn(*args)`` by :func:`measure`: the
    median wall-clock sample, or with ``device`` the GPU busy time per call of ``iters``
    back-to-back calls (the wall time where there is no GPU)."""
    first = {}
    res = measure(
        fn,
        [args],
        iters=iters,
        warmup=warmup,
        min_sample_s=min_sample_s if on_gpu() else 0.0,
        on_first=lambda out: first.setdefault("out", out),
        device_calls=iters if device and on_gpu() else 0,
    )
    return res["time_s"], first["out"]


def time_torch(torch, fn, *args, iters=20, warmup=3, min_sample_s=3e-3, events=False):
    """Seconds per call of the torch call ``fn(*args)`` by :func:`measure` (closed by
    ``torch.cuda.synchronize``): the median wall-clock sample, or with ``events`` CUDA events
    around ``iters`` back-to-back calls."""
    res = measure(
        fn,
        [args],
        iters=iters,
        warmup=warmup,
        min_sample_s=min_sample_s,
        sync=torch_sync(torch),
        device_calls=iters if events else 0,
        torch=torch,
    )
    return res["time_s"]


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
            out = None
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


def busy_ns(spans) -> float:
    """Length of the union of the intervals ``[(start, end)]``."""
    busy, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def jax_device_time(fn, arg_sets, calls):
    """GPU busy time per call of ``calls`` back-to-back calls, from a ``jax.profiler`` trace.

    Busy time is the union of the intervals of every event on the GPU planes' stream lines
    (kernels, copies), so gaps between kernels and between calls are not counted. None when
    the trace holds no GPU events (``fn`` must be warm: compiled and run once).
    """
    spans = [(a, b) for _, a, b in gpu_events(fn, arg_sets, calls)]
    if not spans:
        return None
    return busy_ns(spans) * 1e-9 / calls


def torch_device_time(torch, fn, arg_sets, calls):
    """Per-call time of ``calls`` back-to-back torch calls between two CUDA events (median of
    3 rounds)."""
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


def kernel_breakdown(fn, *args, calls=10):
    """[(microseconds per call, launches per call, kernel name)] of ``calls`` back-to-back calls
    of ``fn`` on the GPU (a ``jax.profiler`` trace), longest first: where a call's time goes."""
    jax.block_until_ready(fn(*args))
    total, count = {}, {}
    for name, start, end in gpu_events(fn, [args], calls):
        total[name] = total.get(name, 0) + end - start
        count[name] = count.get(name, 0) + 1
    return sorted(((t / calls / 1e3, count[n] / calls, n) for n, t in total.items()), reverse=True)
