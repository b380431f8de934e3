"""The custom-call contract: what a jax-mps plugin with PR #212 would receive.

A subprocess registers a stand-in ``mps`` backend factory (so the ``mps`` lowering can be
registered; the factory itself never succeeds) and lowers the Metal ops with
``lowering_platforms=("mps",)``. The test parses every emitted
``stablehlo.custom_call @mps.metal_kernel_jit``, checks its JSON ``backend_config``, and runs
the emitted source strings on the emulator to show they compute the right thing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("metal_plugin")
from metal_plugin import dispatch, emulator, specs  # noqa: E402
from tests.test_metal_kernels import build_case, check_close, features, oracle_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOWER_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax._src import xla_bridge as xb

    def _no_device():
        raise RuntimeError("stand-in mps platform: lowering only")
    xb.register_backend_factory("mps", _no_device, priority=-1000, fail_quietly=True)

    import metal_plugin
    f32, bf16, f8 = jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn
    S = jax.ShapeDtypeStruct
    q = S((12, 8, 128), bf16); pages = S((20, 2, 16, 128), f8)
    bt = S((4, 6), jnp.int32); cl = S((4,), jnp.int32); cu = S((5,), jnp.int32)
    h = S((8,), f32); hk = S((2,), f32)
    kw = dict(scale=0.088, softcap=30.0, sliding_window=64, interpret=False)
    out = {}
    def lower(name, fn, *args):
        out[name] = jax.jit(fn).trace(*args).lower(lowering_platforms=("mps",)).as_text()
    lower("prefill", lambda q, k, v, bt, cl, cu, a, s, ks, vs: metal_plugin.paged_attention(
        q, k, v, bt, cl, cu, alibi_slopes=a, sinks=s, k_scale=ks, v_scale=vs, **kw),
        q, pages, pages, bt, cl, cu, h, h, hk, hk)
    lower("decode", lambda q, k, v, bt, cl, s, ks, vs: metal_plugin.paged_decode(
        q, k, v, bt, cl, sinks=s, k_scale=ks, v_scale=vs, partition_size=32, **kw),
        S((4, 8, 128), bf16), pages, pages, bt, cl, h, hk, hk)
    lower("write", lambda kp, vp, k, v, sl, ks, vs: metal_plugin.write_kv(
        kp, vp, k, v, sl, k_scale=ks, v_scale=vs),
        pages, pages, S((12, 2, 128), bf16), S((12, 2, 128), bf16), S((12,), jnp.int32), hk, hk)
    lower("moe", lambda x, a, b, w, i: metal_plugin.fused_moe(x, a, b, w, i, activation="gelu"),
        S((3, 64), f32), S((4, 64, 96), f32), S((4, 48, 64), f32), S((3, 2), f32),
        S((3, 2), jnp.int32))
    # Off the mps platform the primitive refuses to lower, naming the way out.
    try:
        jax.jit(lambda q, k, v, bt, cl, cu: metal_plugin.paged_attention(
            q, k, v, bt, cl, cu, scale=1.0)).trace(
            q, pages, pages, bt, cl, cu).lower(lowering_platforms=("cpu",))
        out["cpu_error"] = None
    except NotImplementedError as e:
        out["cpu_error"] = str(e)
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    path = tmp_path_factory.mktemp("lower") / "out.json"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        JAX_PLATFORMS="cpu",
    )
    res = subprocess.run(
        [sys.executable, "-c", LOWER_SCRIPT, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(path.read_text())


def _mlir_string(text: str, start: int) -> tuple[str, int]:
    """Decodes an MLIR string literal whose opening quote is at ``start``."""
    raw, i = bytearray(), start + 1
    while text[i] != '"':
        if text[i] == "\\":
            nxt = text[i + 1 : i + 3]
            if nxt[0] in '\\"':
                raw += nxt[0].encode()
                i += 2
            else:
                raw.append(int(nxt, 16))
                i += 3
        else:
            raw += text[i].encode()
            i += 1
    return raw.decode(), i + 1


_TYPES = {
    "f32": "float32",
    "bf16": "bfloat16",
    "f16": "float16",
    "i32": "int32",
    "ui8": "uint8",
    "f8E4M3FN": "float8_e4m3fn",
}


def _tensor(t: str):
    dims, ty = re.fullmatch(r"tensor<((?:\d+x)*)(\w+)>", t.strip()).groups()
    return tuple(int(d) for d in dims.split("x") if d), _TYPES[ty]


def custom_calls(text: str) -> list[dict]:
    calls = []
    for m in re.finditer(r"stablehlo\.custom_call @([\w.]+)\(([^)]*)\)", text):
        line_end = text.index("\n", m.end())
        line = text[m.start() : line_end]
        cfg_at = line.index('backend_config = "') + len("backend_config = ")
        cfg, _ = _mlir_string(line, cfg_at)
        sig = line[line.rindex(": (") + 3 :]
        ins, outs = sig.split(") -> ")
        outs = outs.strip().strip("()")
        calls.append(
            dict(
                target=m.group(1),
                operands=[o for o in m.group(2).split(",") if o],
                config=json.loads(cfg),
                in_types=[_tensor(t) for t in re.findall(r"tensor<[^>]*>", ins)],
                out_types=[_tensor(t) for t in re.findall(r"tensor<[^>]*>", outs)],
            )
        )
    return calls


def test_contract_fields(lowered):
    names = {}
    for op in ("prefill", "decode", "write", "moe"):
        calls = custom_calls(lowered[op])
        assert calls, op
        for c in calls:
            cfg = c["config"]
            assert c["target"] == "mps.metal_kernel_jit"
            assert set(cfg) == {
                "name",
                "source",
                "header",
                "input_names",
                "output_names",
                "grid",
                "threadgroup",
            }
            assert len(cfg["input_names"]) == len(c["operands"]) == len(c["in_types"])
            assert len(cfg["output_names"]) == len(c["out_types"])
            assert len(c["operands"]) + len(c["out_types"]) <= 31
            assert len(cfg["grid"]) == len(cfg["threadgroup"]) == 3
            assert all(g % t == 0 for g, t in zip(cfg["grid"], cfg["threadgroup"]))
            assert np.prod(cfg["threadgroup"]) <= 1024
            # float8 never reaches the kernel as a float8 tensor (MLX has no such dtype).
            assert all(t != "float8_e4m3fn" for _, t in c["in_types"] + c["out_types"])
            # One name, one specialisation: MLX caches compiled kernels by name.
            assert names.setdefault(cfg["name"], (cfg["source"], cfg["header"])) == (
                cfg["source"],
                cfg["header"],
            )
    assert {
        "paged_prefill_bf16_kvf8e4m3_d128_b16",
        "paged_decode_bf16_kvf8e4m3_d128_b16_p32",
        "paged_decode_reduce_bf16_d128_p3",
        "kv_write_bf16_to_f8e4m3_d128",
        "moe_gemv_gate_up_gelu_f32_wf32_h64_i48",
        "moe_gemv_down_f32_wf32_h64_i48",
    } <= set(names)
    decode = [c["config"]["grid"] for c in custom_calls(lowered["decode"])]
    assert decode == [[32 * specs.DECODE_SIMDGROUPS * 3, 8, 4], [32, 8, 4]]


def test_off_mps_lowering_raises(lowered):
    assert "interpret=True" in lowered["cpu_error"] and "backend='xla'" in lowered["cpu_error"]


def test_emitted_prefill_source_runs_correctly(lowered):
    """The strings in the custom call, fed to the emulator, match the float64 oracle."""
    (call,) = custom_calls(lowered["prefill"])
    cfg = call["config"]
    rng = np.random.default_rng(11)
    seqs = [(3, 40), (1, 1), (5, 5), (2, 17)]  # 11 rows + 1 padding row = 12
    c = build_case(
        rng,
        seqs,
        heads=8,
        kv_heads=2,
        head_dim=128,
        block_size=16,
        q_dtype="bfloat16",
        kv_dtype="float8_e4m3fn",
        extra_blocks=20 - 7,
    )
    assert c["kp"].shape == (20, 2, 16, 128) and c["q"].shape[0] == 12
    c["bt"] = np.pad(c["bt"], ((0, 0), (0, 6 - c["bt"].shape[1])), constant_values=-7)
    f = features(rng, 8, "all") | {"softcap": 30.0, "window": 64}
    iparams = np.array([4, 12, 8, 2, 6, 64, 1], np.int32)
    fparams = np.array([0.088, 30.0], np.float32)
    inputs = [
        c["q"],
        c["kp"],
        c["vp"],
        c["bt"],
        c["ctx"],
        c["cu"],
        f["alibi"],
        f["sinks"],
        c["k_scale"],
        c["v_scale"],
        iparams,
        fparams,
    ]
    for a, (shape, dt) in zip(inputs, call["in_types"]):
        a = np.asarray(a)
        assert a.shape == shape
        assert a.dtype.name == dt or (dt == "uint8" and a.dtype.itemsize == 1)
    fields = dict(
        cfg,
        out_shapes=[s for s, _ in call["out_types"]],
        out_dtypes=[t for _, t in call["out_types"]],
    )
    (out,) = emulator.run(fields, *inputs)
    ref = oracle_for(c, f | {"scale": 0.088})
    check_close(out, ref, "bfloat16")


def test_dispatch_off_this_platform(monkeypatch):
    assert not dispatch.custom_call_available()  # no jax-mps here
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="running the xla backend instead"):
        assert dispatch.dispatch_available() is False
    monkeypatch.setenv(dispatch.ENV_SWITCH, "0")
    assert "JAX_PAGED_ATTN_METAL=0" in dispatch.unavailable_reason()


def test_dispatch_detects_the_plugin(monkeypatch):
    """With a plugin exposing metal_kernel_jit on the mps platform, dispatch is on unless
    the environment switch says 0."""
    import types

    fake = types.ModuleType("jax_plugins.mps.ops")
    fake.metal_kernel_jit = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "jax_plugins.mps.ops", fake)
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "mps")
    assert dispatch.custom_call_available()
    assert dispatch.dispatch_available() is True
    monkeypatch.setenv(dispatch.ENV_SWITCH, "0")
    assert dispatch.dispatch_available(warn=False) is False
    del fake.metal_kernel_jit
    monkeypatch.delenv(dispatch.ENV_SWITCH)
    assert "PR #212" in dispatch.unavailable_reason()
