"""benchmarks/serving.py: the smoke run end to end on the CPU (tokens/s and the time breakdown
in the JSON and the report), and the real-size configurations it names (parameter counts of
the released models, without allocating them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytest.importorskip("safetensors", reason="the models extra: pip install -e '.[models]'")
from benchmarks import serving as S  # noqa: E402
from jax_paged_attn import models  # noqa: E402


def test_smoke_run_reports_tokens_per_second_and_breakdown(tmp_path):
    path = tmp_path / "serving.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--smoke", "--json", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(path.read_text())
    assert data["smoke"] and data["platform"] == "cpu"
    assert [r["config"] for r in data["results"]] == list(S.DEFAULT_CONFIGS)
    for res in data["results"]:
        loop, b = res["loop"], res["breakdown"]
        w = res["workload"]
        assert loop["generated_tokens"] == w["requests"] * w["new_tokens"]
        assert loop["generated_tok_s"] > 0 and loop["total_tok_s"] > loop["generated_tok_s"]
        assert 0 < loop["row_utilization"] <= 1
        assert loop["steps"] == sum(b[k]["steps"] for k in ("mixed", "decode") if k in b)
        assert b["mixed"]["steps"] > 0 and b["decode"]["steps"] > 0  # both kinds of step
        for kind in ("mixed", "decode"):
            r = b[kind]
            assert r["step_ms"] > 0 and r["attention_ms"] > 0 and r["mlp_ms"] > 0
            assert r["rest_ms"] == pytest.approx(
                r["step_ms"] - r["attention_ms"] - r["mlp_ms"], abs=1e-3
            )
        assert b["timing"] == "wall"  # no GPU: replays are timed by the wall clock
        assert f"{res['config']} [smoke dims] ({res['architecture']}" in proc.stdout
    assert "generated tok/s" in proc.stdout and "MLP/MoE" in proc.stdout


@pytest.mark.parametrize(
    "name, layers, billions",
    [("llama3-8b", 32, 8.03), ("gpt-oss-20b", 24, 20.91), ("qwen3-30b-a3b", 48, 30.53)],
)
def test_configs_have_the_released_sizes(name, layers, billions):
    cfg = S.model_config(name, layers)
    shapes = jax.eval_shape(lambda: models.random_model(cfg).params)
    assert sum(x.size for x in jax.tree.leaves(shapes)) / 1e9 == pytest.approx(billions, abs=0.01)
    cut = S.model_config(name, 4)
    assert cut.num_layers == 4 and cut.hidden_size == cfg.hidden_size
    if name == "gpt-oss-20b":
        assert cut.windows == (128, None, 128, None) and cut.sinks and cut.num_experts == 32
        assert cut.ropes[0].scaling == pytest.approx(1.3466, abs=1e-4)


def test_unknown_config_is_refused(capsys):
    with pytest.raises(SystemExit):
        S.main(["--smoke", "--configs", "llama3-70b"])
    assert "unknown configs" in capsys.readouterr().err
