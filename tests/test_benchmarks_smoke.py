"""Smoke test of the benchmarks on the CPU: the harness end to end (JSON fields, table, plot),
once plain and once with every kernel and Pallas peer under its interpreter; the timer
(benchmarks/timing.py); the kernel-level MoE sweep, the scale-out benchmark and the probe
scripts on their tiny CPU shapes; the counting formulas of benchmarks/shapes.py against
brute force; and the model zoo (benchmarks/zoo.py) in its --smoke mode on a subset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import shapes as S  # noqa: E402


def test_decode_bytes():
    # 64 seqs x 4096 tokens x 8 KV heads x 128 x 2 bytes, for K and for V: exactly 1 GiB.
    assert S.DECODE.kv_bytes == 2**30
    assert S.DECODE_LONG.kv_bytes == 2**30


@pytest.mark.parametrize(
    "shape",
    [
        S.TINY_MIXED,
        S.TINY_PREFILL,
        S.MIXED,
        S.AttentionShape("x", ((0, 1), (5, 3), (17, 17)), 4, 2, 64),
    ],
)
def test_visible_pairs_brute_force(shape):
    total = 0
    for c, n in shape.seqs:
        for j in range(n):
            p = c + j  # row j of n sits at p = L - n + j, sees t <= p
            total += p + 1
    assert shape.visible_pairs == total
    assert shape.flops == 4 * total * shape.head_dim * shape.num_heads


def test_prefill_flops_is_about_half_of_dense():
    L = 8192
    dense = 4 * L * L * 128 * 32
    assert abs(S.PREFILL_8K.flops / dense - 0.5) < 1e-3


def test_moe_counts():
    s = S.MOE_MIXTRAL
    assert s.flops == 2 * 4096 * 2 * (4096 * 2 * 14336 + 14336 * 4096)
    assert sum(s.gemm_flops.values()) == s.flops
    assert s.weight_bytes(8) == 8 * 3 * 4096 * 14336 * 2


def test_kv_write_bytes():
    assert S.KV_WRITE.bytes == 4 * 65536 * 8 * 128 * 2
    assert S.KV_WRITE.num_blocks >= 65536 // 16


def test_suites_have_the_same_groups():
    full, tiny = S.suite(False), S.suite(True)
    assert set(full) == set(tiny) == set(S.GROUPS)
    for g in S.GROUPS:
        assert len(full[g]) > 0 or g == "ceilings"
        assert {type(x) for x in full[g]} == {type(x) for x in tiny[g]}
    assert [s.seq_len for s in S.PREFILL_SWEEP] == [1024, 2048, 4096, 8192, 16384]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    js, png = str(d / "bench.json"), str(d / "bench.png")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("OUT", None)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--backends",
        "xla,triton",
        "--only",
        "decode,sweep,moe,kv_write",
        "--shapes",
        "tiny_decode,tiny_prefill_32,tiny_prefill_64,tiny_moe_decode,tiny_kv_write",
        "--json",
        js,
        "--plot",
        png,
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(js) as f:
        doc = json.load(f)
    return doc, png, p.stdout


def test_quick_run_json(quick_run):
    doc, _, _ = quick_run
    for key in ("device", "platform", "jax_version", "date", "ceilings", "rows", "counting"):
        assert key in doc, key
    assert doc["platform"] == "cpu"
    assert doc["ceilings"]["copy"]["best"] > 0 and doc["ceilings"]["matmul"]["best"] > 0
    rows = doc["rows"]
    for r in rows:
        for key in ("group", "shape", "impl", "kind", "status", "metric", "error"):
            assert key in r, (key, r)
        assert r["status"] in ("ok", "invalid", "error", "not_implemented", "skipped"), r
        if r["status"] in ("ok", "invalid"):
            assert r["time_s"] > 0 and r["value"] > 0 and r["iters"] >= 3, r
        else:
            assert r["error"], r  # a failure always says why
    by = {(r["group"], r["shape"], r["impl"]): r for r in rows}
    # our xla backend ran on every selected shape, and its numbers are related to the ceilings
    for g, shape in (
        ("decode", "tiny_decode"),
        ("sweep", "tiny_prefill_32"),
        ("sweep", "tiny_prefill_64"),
        ("moe", "tiny_moe_decode"),
        ("kv_write", "tiny_kv_write"),
    ):
        r = by[(g, shape, "xla")]
        assert r["status"] == "ok", r
        assert r["frac_of_ceiling"] is not None and r["frac_of_ceiling"] > 0
    assert by[("decode", "tiny_decode", "xla")]["metric"] == "TB/s"
    assert by[("sweep", "tiny_prefill_64", "xla")]["metric"] == "TFLOP/s"
    assert by[("moe", "tiny_moe_decode", "xla")]["metric"] == "TB/s"  # decode-shaped MoE
    # a backend with no kernels here is recorded with its error, not dropped
    t = by[("decode", "tiny_decode", "triton")]
    assert t["status"] == "not_implemented" and "NotImplementedError" in t["error"]
    # peers ran against the xla backend's output, or say why not
    naive = by[("decode", "tiny_decode", "xla_gather_softmax")]
    assert naive["status"] == "ok" and naive["check"]["ok"] and naive["check"]["rel_err"] < 2e-2
    dpa = by[("sweep", "tiny_prefill_64", "xla_dpa")]
    assert dpa["status"] == "ok" and dpa["check"]["ok"]
    assert by[("sweep", "tiny_prefill_64", "cudnn")]["status"] == "skipped"
    assert by[("moe", "tiny_moe_decode", "lax_ragged_dot:gate_up")]["status"] == "ok"
    kv = by[("kv_write", "tiny_kv_write", "xla")]
    assert "in_place" in kv and kv["config"]["donate_argnums"] == 0
    # prefill work counted by the formula of benchmarks/shapes.py
    assert by[("sweep", "tiny_prefill_64", "xla")]["work"]["flops"] == S.TINY_PREFILL.flops


def test_quick_run_table_and_plot(quick_run):
    _, png, stdout = quick_run
    assert "group" in stdout and "tiny_decode" in stdout and "wrote" in stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000


def test_plot_renders_from_json(quick_run, tmp_path):
    from benchmarks import plot

    doc, _, _ = quick_run
    js = tmp_path / "x.json"
    js.write_text(json.dumps(doc))
    out = plot.render(str(js), str(tmp_path / "x.png"))
    assert os.path.getsize(out) > 10_000
    both = plot.render([str(js), str(js)], str(tmp_path / "y.png"))  # several runs, one figure
    assert os.path.getsize(both) > 10_000


def _run(args, timeout=600):
    """Runs ``python args...`` from the repository root on the CPU; returns its stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("OUT", None)
    p = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def interpret_run(tmp_path_factory):
    js = str(tmp_path_factory.mktemp("bench_interp") / "bench.json")
    _run(
        [
            "-m",
            "benchmarks.run",
            "--quick",
            "--interpret",
            "--interpret-peers",
            "--skip-ceilings",
            "--iters",
            "3",
            "--backends",
            "xla,triton,mosaic",
            "--only",
            "decode,prefill,moe,kv_write",
            "--shapes",
            "tiny_decode,tiny_prefill_64,tiny_mixed,tiny_moe,tiny_kv_write",
            "--json",
            js,
            "--plot",
            "none",
        ]
    )
    with open(js) as f:
        return json.load(f)


def test_interpret_run_kernels_and_peers(interpret_run):
    """Every kernel backend runs under the interpreter and matches the xla backend; the Pallas
    Triton peers run through the same wiring as on the GPU."""
    rows = interpret_run["rows"]
    assert "ceilings" not in {r["group"] for r in rows}  # --skip-ceilings
    by = {(r["shape"], r["impl"]): r for r in rows}
    for shape in ("tiny_decode", "tiny_prefill_64", "tiny_mixed", "tiny_moe", "tiny_kv_write"):
        r = by[(shape, "triton")]
        assert r["status"] == "ok" and r["check"]["ok"], r
        assert r["config"]["interpret"] is True
    for shape in ("tiny_decode", "tiny_prefill_64", "tiny_mixed", "tiny_moe"):
        r = by[(shape, "mosaic")]
        assert r["status"] == "ok" and r["check"]["ok"], r
    assert by[("tiny_kv_write", "mosaic")]["status"] == "not_implemented"
    assert by[("tiny_kv_write", "triton")]["check"]["mismatched_elements"] == 0
    mha = by[("tiny_prefill_64", "pallas_triton_mha")]
    assert mha["status"] == "ok" and mha["check"]["ok"], mha
    # JAX's Pallas paged_attention peer ran (tuned over its configurations); it multiplies the
    # NaN slots past a context by zero weights, so on the tiny shape's partial last page it is
    # flagged invalid (the GPU shapes fill whole pages).
    pa = by[("tiny_decode", "pallas_paged_attention")]
    assert pa["status"] in ("ok", "invalid") and pa["tried"] and pa["check"], pa
    # the mixed batch has no peer; the checked rows cover each sequence's head and tail
    assert not [r for r in rows if r["shape"] == "tiny_mixed" and r["kind"] == "peer"]
    assert by[("tiny_mixed", "triton")]["check"]["rows_checked"] == S.TINY_MIXED.num_tokens


def test_timing_measure():
    import jax
    import jax.numpy as jnp

    from benchmarks import timing

    f = jax.jit(lambda x: x * 2.0)
    sets = [(jnp.full((8,), float(i)),) for i in range(3)]
    first = {}
    res = timing.measure(
        f, sets, iters=4, warmup=2, min_sample_s=0.0, on_first=lambda o: first.update(out=o)
    )
    assert float(first["out"][0]) == 0.0  # the first call runs on the first input set
    assert res["timing"] == "wall" and res["time_s"] == res["wall_time_s"] > 0
    assert res["iters"] == 4 and res["reps"] == 1 and res["input_sets"] == 3
    assert res["time_min_s"] <= res["time_s"] <= res["time_max_s"]
    # a row longer than max_row_s gets fewer samples, never fewer than 3
    capped = timing.measure(f, sets, iters=50, warmup=1, min_sample_s=0.0, max_row_s=1e-9)
    assert capped["iters"] == 3
    # samples of several back-to-back calls when one call is shorter than min_sample_s
    assert timing.reps_for(1e-4, 2e-3) == 20 and timing.reps_for(1.0, 2e-3) == 1
    assert timing.reps_for(1e-9, 1.0) == 64
    t, out = timing.time_fn(f, sets[1][0], iters=3)
    assert t > 0 and float(out[0]) == 2.0
    assert timing.jax_device_time(f, sets, 2) is None  # no GPU planes in a CPU trace


def test_timing_helpers():
    from benchmarks import timing

    assert timing.busy_ns([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25  # union of intervals
    assert timing.num_sets(timing.L2_BYTES) == 1
    assert timing.num_sets(1) == 8 and timing.num_sets(timing.L2_BYTES // 2) == 4
    calls = []
    samples, out = timing.sample_times(lambda: calls.append(1) or len(calls), 3, 2, lambda o: None)
    assert len(samples) == 3 and len(calls) == 6 and out == 6


def test_timing_torch_events():
    """Device time of torch calls (CUDA events), with a stand-in for torch.cuda."""
    import types

    from benchmarks import timing

    class Event:
        clock = [0.0]

        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = Event.clock[0]

        def elapsed_time(self, end):  # milliseconds
            return end.t - self.t

    def fn(x):
        Event.clock[0] += 2.0  # each call takes 2 ms of "device" time
        return x

    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(Event=Event, synchronize=lambda: None))
    assert timing.torch_device_time(torch, fn, [(1,), (2,)], 5) == pytest.approx(2e-3)
    res = timing.measure(
        fn,
        [(1,)],
        iters=3,
        warmup=1,
        min_sample_s=0.0,
        sync=timing.torch_sync(torch),
        device_calls=4,
        torch=torch,
    )
    assert res["timing"] == "device" and res["device_calls"] == 4
    assert res["time_s"] == res["device_time_s"] == pytest.approx(2e-3)
    assert timing.time_torch(torch, fn, 1, iters=3, events=True) == pytest.approx(2e-3)


def test_tolerance_from_the_kit():
    import jax.numpy as jnp

    from benchmarks.harness import tolerance
    from jax_paged_attn.testing import TOLERANCE

    for dtype in ("bfloat16", "float16", "float32"):
        assert tolerance(dtype) == TOLERANCE[jnp.dtype(dtype)]["rel"]
    assert tolerance("bfloat16") == 2e-2
    assert tolerance("int8") == 2e-2  # a dtype the table does not list


def test_moe_kernels_quick():
    out = _run(["-m", "benchmarks.moe_kernels", "--quick"])
    assert "FAILED" not in out, out
    for backend in ("xla", "triton", "mosaic"):
        assert f"tiny           {backend}" in out, out


@pytest.mark.slow
def test_moe_kernels_sweep_quick():
    out = _run(["-m", "benchmarks.moe_kernels", "--quick", "--sweep"])
    assert "FAILED" not in out, out
    assert "bm=16 gate_up" in out and "bm=16 down" in out and "whole table" in out, out


def test_sharded_quick(tmp_path):
    js = str(tmp_path / "sharded.json")
    _run(["-m", "benchmarks.sharded", "--quick", "--devices", "1,2", "--json", js])
    with open(js) as f:
        rows = json.load(f)["rows"]
    assert {(r["shape"], r["devices"]) for r in rows} == {
        (s, n) for s in ("tiny_decode_tp", "tiny_moe_ep") for n in (1, 2)
    }
    for r in rows:
        assert r["valid"] and r["time_s"] > 0 and r["iters"] >= 20, r


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        ["scripts/gpu_probe.py"],
        ["scripts/triton_attn_sweep.py"],
        ["scripts/decode_probe.py", "--rounds", "1"],
        ["scripts/prefill_probe.py", "--rounds", "1"],
        ["scripts/timing_probe.py"],
        ["scripts/ncu_probe.py", "--help"],  # needs ncu and torch: its command line only
    ],
    ids=lambda a: os.path.basename(a[0]),
)
def test_probe_scripts_on_cpu(script):
    """The probes' tiny CPU runs (kernels interpreted): every row runs, none fails."""
    out = _run(script)
    assert "FAILED" not in out, out
    assert out.strip(), "no output"


def test_compare_flags_wrong_and_nan():
    from benchmarks.harness import compare

    r = np.random.default_rng(0).normal(size=(8, 4, 16)).astype(np.float32)
    assert compare(r, r, "bfloat16")["ok"]
    bad = r.copy()
    bad[0, 0, 0] = np.nan
    c = compare(bad, r, "bfloat16")
    assert not c["ok"] and c["nan_count"] == 1
    assert not compare(r * 1.1, r, "bfloat16")["ok"]


# ---------------------------------------------------------------------------------------------
# The torch peers' wiring (layouts, GQA, checks) with a tiny numpy stand-in for torch: torch
# is not installed on the CPU machines, only on the GPU one.


class _FakeTensor:
    def __init__(self, a):
        self.a = np.asarray(a, np.float32)

    shape = property(lambda self: self.a.shape)

    def clone(self):
        return _FakeTensor(self.a.copy())

    def copy_(self, src):
        self.a[...] = src.a
        return self

    def repeat_interleave(self, n, dim):
        return _FakeTensor(np.repeat(self.a, n, axis=dim))

    def float(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


def _fake_sdpa(q, k, v, is_causal=False, enable_gqa=False):
    q, k, v = q.a, k.a, v.a
    if k.shape[1] != q.shape[1]:
        assert enable_gqa, "heads differ without enable_gqa"
        k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
        v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if is_causal:  # torch's causal mask is top-left aligned
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return _FakeTensor(np.einsum("bhqk,bhkd->bhqd", p, v))


def _fake_torch():
    import types

    torch = types.ModuleType("torch")
    torch.__version__ = "fake"
    torch.float32 = torch.bfloat16 = "dtype"
    torch.from_dlpack = lambda x: _FakeTensor(np.asarray(x, np.float32))
    torch.randn = lambda *shape, device=None, dtype=None: _FakeTensor(
        np.random.default_rng(0).normal(size=shape)
    )
    torch.empty_like = lambda t: _FakeTensor(np.empty_like(t.a))
    torch.matmul = lambda a, b: _FakeTensor(a.a @ b.a)
    torch.cuda = types.SimpleNamespace(
        synchronize=lambda: None, empty_cache=lambda: None, is_available=lambda: True
    )
    nn = types.ModuleType("torch.nn")
    functional = types.ModuleType("torch.nn.functional")
    functional.scaled_dot_product_attention = _fake_sdpa
    torch.nn, nn.functional = nn, functional
    return torch, {"torch": torch, "torch.nn": nn, "torch.nn.functional": functional}


def test_torch_peer_wiring(tmp_path, monkeypatch):
    from benchmarks import attention, ceilings, harness
    from benchmarks import run as R

    torch, modules = _fake_torch()
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    args = R.parse_args(
        [
            "--quick",
            "--backends",
            "xla",
            "--json",
            str(tmp_path / "t.json"),
            "--plot",
            "none",
            "--iters",
            "3",
        ]
    )
    ctx = harness.Ctx(args)
    ctx.torch = torch
    ceilings.bench_ceilings(ctx)
    attention.bench_decode(ctx, S.TINY_DECODE)
    attention.bench_attention(ctx, S.TINY_PREFILL, "prefill")
    by = {(r["shape"], r["impl"]): r for r in ctx.rows}
    assert by[("copy_16MiB", "copy_torch")]["status"] == "ok"
    assert by[("matmul_256", "matmul_torch")]["status"] == "ok"
    for shape in ("tiny_decode", "tiny_prefill_64"):
        r = by[(shape, "torch_sdpa")]
        assert r["status"] == "ok", r
        assert r["check"]["ok"] and r["check"]["rel_err"] < 2e-2, r["check"]
        assert {t["config"]["enable_gqa"] for t in r["tried"]} == {True, False}


# ---------------------------------------------------------------------------------------------
# The model zoo (benchmarks/zoo.py): counting, the plan, and a smoke run on a subset.


def test_zoo_counting_and_plan():
    import doctest

    from benchmarks import zoo_models as Z

    assert doctest.testmod(Z).failed == 0

    for seqs, w in ((((0, 48),), 8), (((5, 3), (0, 1), (30, 20)), 16), (((7, 9),), None)):
        brute = sum(min(c + j + 1, w or 10**9) for c, n in seqs for j in range(n))
        assert Z.visible_pairs(seqs, w) == brute
        for c, n in seqs:  # distinct keys the new queries see
            lo = max(0, c - (w or 10**9) + 1)
            assert Z.keys_touched(c, n, w) == c + n - lo
    layers = Z.select_layers(None, tiny=False)
    assert "qwen3_8b" not in {x.name for x in layers}  # same layer as llama3_8b
    assert {x.name for x in Z.select_layers("gemma2_9b", tiny=False)} == {
        "gemma2_9b_local",
        "gemma2_9b_global",
    }
    cases = Z.plan(layers)
    assert {c.layer.name for c in cases if c.entry == "decode"} == {x.name for x in layers}
    assert {c.entry for c in cases} == {"decode", "serving", "chunked", "prefill"}
    assert {c.block_size for c in cases} == {16, 32, 64, 128}
    assert len({c.key for c in cases}) == len(cases)
    full = Z.plan(layers, full=True)
    assert len({c.key for c in full}) == len(full) > len(cases)
    assert {c.point for c in full if c.entry == "decode"} >= {"1x131072", "256x2048"}
    gpt = Z.LAYERS["gpt_oss_120b_local"]
    case = Z.Case(gpt, "decode", ((4095, 1),) * 64, 16, "64x4096")
    assert case.kv_bytes() == 2 * 64 * 128 * 8 * 64 * 2  # window 128: 128 keys per row


def test_zoo_smoke(tmp_path):
    """``benchmarks.zoo --smoke`` on a subset: every entry point's rows are checked against the
    float32 reference and recorded; the summary has best / auto_vs_best / one-vs-split; the
    table and the plot are written; ``--resume`` keeps the finished cases and a budget skips
    (and says so) what does not fit."""
    from benchmarks import zoo_models as Z

    js, png = str(tmp_path / "zoo.json"), str(tmp_path / "zoo.png")
    base = ["-m", "benchmarks.zoo", "--smoke", "--entries", "decode,serving,prefill"]
    base += ["--backends", "triton,auto", "--json", js]
    out = _run(base + ["--models", "llama3_8b,gpt_oss_120b_local", "--plot", png], timeout=300)
    assert "auto/best" in out and "one/split" in out and "wrote" in out, out[-3000:]
    with open(js) as f:
        doc = json.load(f)
    rows = doc["rows"]
    assert doc["ceilings"]["copy"]["best"] > 0
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r  # no error, nothing invalid
        assert r["status"] == "ok" or r["error"], r
    by = {(r["group"], r["shape"], r["impl"]): r for r in rows}
    for group, shape in (
        ("decode", "llama3_8b/3x40/b16"),
        ("decode_pa", "llama3_8b/3x40/b16"),
        ("serving", "llama3_8b/c16@48+3d/b16"),
        ("serving_chunk", "llama3_8b/c16@48+3d/b16"),
        ("serving_decode", "llama3_8b/c16@48+3d/b16"),
        ("prefill", "llama3_8b/1x48/b16"),
        ("decode", "gpt_oss_120b_local/3x40/b16"),
        ("prefill", "gpt_oss_120b_local/1x48/b16"),
    ):
        r = by[(group, shape, "triton")]
        assert r["check"]["ok"] and r["check"]["rows_checked"] > 0, r
        assert r["config"]["interpret"] is True and r["check"]["ref"] == "xla float32"
        assert by[(group, shape, "auto")]["auto_vs_best"] > 0
    split = [r for r in rows if r["kind"] == "split"]
    assert len(split) == 1 and split[0]["impl"] == "split:triton+triton" and split[0]["check"]["ok"]
    # counting: gpt-oss's window of 8 keys (tiny twin), 8 query heads per KV head, d64
    dec = by[("decode", "gpt_oss_120b_local/3x40/b16", "triton")]
    assert dec["work"]["bytes"] == 2 * 3 * 8 * 1 * 64 * 2
    pre = by[("prefill", "gpt_oss_120b_local/1x48/b16", "triton")]
    assert pre["work"]["flops"] == 4 * Z.visible_pairs(((0, 48),), 8) * 64 * 8
    # the peer cannot express sinks: it runs without, says so, and is checked against that
    dpa = by[("prefill", "gpt_oss_120b_local/1x48/b16", "xla_dpa")]
    assert dpa["config"]["omits"] == ["sinks"] and dpa["check"]["ok"], dpa
    assert by[("prefill", "gpt_oss_120b_local/1x48/b16", "torch_sdpa")]["status"] == "skipped"
    summ = {(s["group"], s["layer"]): s for s in doc["zoo_summary"]}
    assert summ[("serving", "llama3_8b")]["one_vs_split"] > 0
    assert summ[("decode_pa", "llama3_8b")]["pa_speed_vs_decode"] > 0
    assert summ[("decode", "llama3_8b")]["best"] == "triton"
    assert 0 < summ[("decode", "llama3_8b")]["best_frac_of_ceiling"]
    assert summ[("prefill", "llama3_8b")]["x_xla_dpa"] > 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # --resume keeps the five finished cases; a spent budget skips phi3_mini's, and says so
    out = _run(
        base
        + ["--models", "llama3_8b,gpt_oss_120b_local,phi3_mini", "--resume"]
        + ["--budget-s", "0.01", "--plot", "none"]
    )
    assert "--resume: 5 finished case(s)" in out and "did not fit the budget" in out, out
    with open(js) as f:
        doc2 = json.load(f)
    assert len(doc2["rows"]) == len(rows) + 2
    assert doc2["cases"]["decode:phi3_mini/3x40/b16"] == "skipped (budget)"
