"""The emulator under ThreadSanitizer and AddressSanitizer.

Each kernel is built with ``-fsanitize=...`` into a stand-alone driver and run in a
subprocess (the sanitizer runtime must load first). The clean kernels must run with no
report and the right answer; deliberately broken copies show that the sanitizers do see
the bugs they exist for (a missing barrier, a read past a page).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("metal_plugin")
from metal_plugin import emulator, specs  # noqa: E402
from tests.test_metal_kernels import build_case, check_close, features, oracle_for  # noqa: E402


def _has_runtime(sanitizer: str) -> bool:
    if shutil.which(emulator.CXX) is None:
        return False
    lib = subprocess.run(
        [emulator.CXX, f"-print-file-name=lib{sanitizer}.so"], capture_output=True, text=True
    ).stdout.strip()
    return lib.startswith("/")


def _decode_launch(rng):
    """A two-partition decode launch (threadgroup and simdgroup barriers, reduce inputs)."""
    seqs = [(1, 45), (1, 0), (1, 20)]
    c = build_case(rng, seqs, heads=2, kv_heads=1, head_dim=32, block_size=8, pad_rows=0)
    f = features(rng, 2, "all")
    spec = specs.attention(
        q_dtype="float32",
        kv_dtype="float32",
        head_dim=32,
        block_size=8,
        num_rows=3,
        num_heads=2,
        num_parts=1,
        partition=32,
        decode=True,
    )
    mb = c["bt"].shape[1]
    inputs = [
        c["q"],
        c["kp"],
        c["vp"],
        c["bt"],
        c["ctx"],
        np.arange(4, dtype=np.int32),
        f["alibi"],
        f["sinks"],
        np.ones(1, np.float32),
        np.ones(1, np.float32),
        np.array([3, 3, 2, 1, mb, f["window"], 1], np.int32),
        np.array([32**-0.5, f["softcap"]], np.float32),
    ]
    ref = oracle_for(c, f, cu=np.arange(4))
    return spec, inputs, ref


@pytest.mark.skipif(not _has_runtime("tsan"), reason="libtsan not found for the compiler")
def test_thread_sanitizer_clean_and_catches_missing_barrier():
    spec, inputs, ref = _decode_launch(np.random.default_rng(0))
    outs, rc, err = emulator.run_sanitized(spec, *inputs, sanitizer="thread")
    assert rc == 0, err[-3000:]
    assert "WARNING: ThreadSanitizer" not in err
    check_close(outs[0], ref, "float32")
    # Without the barrier after q is staged, lanes read q_sh while others still write it.
    marker = "}\nthreadgroup_barrier(mem_flags::mem_threadgroup);\n\nconst float slope"
    assert marker in spec.source
    broken = dataclasses.replace(
        spec,
        name=spec.name + "_nobarrier",
        source=spec.source.replace(marker, "}\n\nconst float slope"),
    )
    _, rc, err = emulator.run_sanitized(broken, *inputs, sanitizer="thread")
    assert rc != 0 and "data race" in err, err[-3000:]


@pytest.mark.skipif(not _has_runtime("asan"), reason="libasan not found for the compiler")
def test_address_sanitizer_clean_and_catches_out_of_range_read():
    spec, inputs, ref = _decode_launch(np.random.default_rng(1))
    outs, rc, err = emulator.run_sanitized(spec, *inputs, sanitizer="address")
    assert rc == 0, err[-3000:]
    check_close(outs[0], ref, "float32")
    # An indexing slip that reads the next head's query runs off the end of q at the
    # last (row, head).
    marker = "float(q[(r * uint(H) + h) * HEAD_DIM + d])"
    assert marker in spec.source
    broken = dataclasses.replace(
        spec,
        name=spec.name + "_oob",
        source=spec.source.replace(marker, "float(q[(r * uint(H) + h + 1) * HEAD_DIM + d])"),
    )
    _, rc, err = emulator.run_sanitized(broken, *inputs, sanitizer="address")
    assert rc != 0 and "heap-buffer-overflow" in err, err[-3000:]
