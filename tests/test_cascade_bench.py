"""Smoke test of ``python -m benchmarks.cascade --smoke`` on the CPU: the standalone run end to
end (the xla and interpreted Triton rows, each checked against the xla plain reference, the JSON
and its summary), and the byte counts of the benchmark's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cascade as bench  # noqa: E402


def test_shape_counts():
    s = bench.SHARED_4K
    assert len(s.suffix_lens) == 64 and min(s.suffix_lens) == 64 and max(s.suffix_lens) == 256
    per_token = 2 * 8 * 128 * 2  # K and V, 8 KV heads, head dim 128, bf16
    assert s.plain_bytes == per_token * (64 * 4096 + sum(s.suffix_lens))
    # G = 4 query heads per KV head: 16 rows per prefix pass, 4 passes for 64 requests.
    assert s.cascade_bytes(16) == per_token * (4 * 4096 + sum(s.suffix_lens))
    assert s.plain_bytes / s.cascade_bytes(16) > 10


def test_smoke_run(tmp_path):
    js = str(tmp_path / "cascade.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cascade", "--smoke", "--backends", "xla,triton",
         "--fold-rows", "3", "--json", js],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.load(open(js))
    rows = {r["impl"]: r for r in doc["rows"]}
    want = {
        f"{b}:{k}"
        for b in ("xla", "triton")
        for k in ("plain_decode", "plain_attention", "cascade", "cascade_f3")
    }
    assert set(rows) == want, rows.keys()
    for impl, r in rows.items():
        assert r["status"] == "ok", (impl, r.get("error"), r.get("check"))
        assert r["check"]["ok"] and r["check"]["nan_count"] == 0, (impl, r["check"])
        assert r["time_s"] > 0 and r["value"] > 0
    assert rows["triton:cascade"]["config"]["interpret"] is True
    assert rows["xla:cascade"]["config"]["fold_rows"] == 4  # 64 // G with G = 4, at most T = 4
    assert rows["xla:cascade_f3"]["config"]["fold_rows"] == 3
    assert rows["xla:cascade"]["ratio_to_peer"] is not None
    assert doc["summary"]["speedup"] > 0
    assert "best cascade" in proc.stdout
