"""jax_paged_attn.models: checkpoints load, the engine serves them, and the logits match.

Two kinds of checkpoints: ones written here from random weights in the Hugging Face layout
(every family; they prove the loader and check the paged engine against the model's dense
forward), and the fixtures in tests/fixtures/models made by transformers itself
(scripts/make_model_fixtures.py), whose stored logits and greedy tokens the engine must match.
Each engine run mixes chunked prefill across block boundaries (block size 4, 8 rows per step),
a request that joins while the others decode and reuses a cached prompt prefix, and 10 decode
steps. Everything runs on the CPU in float32 with the xla backend, except the tests marked
"needs a GPU": bfloat16 weights on the GPU's kernels (``backend="auto"``), held to 2e-2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the models extra: pip install -e '.[models]'")
from safetensors.numpy import save_file  # noqa: E402

from jax_paged_attn import models  # noqa: E402
from jax_paged_attn.models import (  # noqa: E402
    Engine,
    SamplingParams,
    dense_logits,
    load_model,
)
from jax_paged_attn.models import model as M  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "models"
TOLERANCE = 1e-4  # max |ours - reference| / max |reference| of the logits, float32
BF16_TOLERANCE = 2e-2  # the same, bfloat16 weights and activations on a GPU
MAX_NEW = 10
# Families whose transformers fixture may be absent for now (its test then skips, naming the
# directory; none today): made by `scripts/make_model_fixtures.py --families NAME` where torch
# is, e.g. gpt_oss's (transformers 5.17.0, torch 2.13.0 CPU, 2026-12-02).
AWAITING_FIXTURES: set[str] = set()
ON_GPU = jax.default_backend() in ("gpu", "cuda")

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    rope_theta=10000.0,
    torch_dtype="float32",
    eos_token_id=1,
)
CONFIGS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"],
        hidden_size=48,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64
        ),
        tie_word_embeddings=True,
    ),
    "mistral": dict(architectures=["MistralForCausalLM"], sliding_window=8),
    "gemma2": dict(
        architectures=["Gemma2ForCausalLM"],
        hidden_size=48,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=10.0,
        sliding_window=8,
        hidden_activation="gelu_pytorch_tanh",
    ),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=16,
        sliding_window=None,
    ),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        hidden_size=48,
        num_hidden_layers=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "gpt_oss": dict(
        architectures=["GptOssForCausalLM"],
        intermediate_size=32,  # 64 and 32: the MXFP4 blocks of 32 divide both GEMMs' inputs
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        attention_bias=True,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=4096,
        ),
    ),
}


def interleave(gate, up):
    """gpt-oss's gate/up layout: columns alternate, ``[..., ::2]`` gate, ``[..., 1::2]`` up."""
    return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def hf_tensors(hf: dict, rng, *, fused_experts=False) -> dict:
    """Random weights with transformers' names and shapes ([out, in]) for config ``hf``."""
    cfg = models.parse_config(hf)
    h, d, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    fam = cfg.family

    def mat(out, inp):
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def vec(n, center=0.0):
        return (center + 0.1 * rng.standard_normal(n)).astype(np.float32)

    norm_center = 0.0 if fam.gemma else 1.0
    t = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)}
    t["model.norm.weight"] = vec(h, norm_center)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = mat(v, h)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        outs = dict(q=cfg.num_heads * d, k=cfg.num_kv_heads * d, v=cfg.num_kv_heads * d)
        for name, out in outs.items():
            t[f"{pre}self_attn.{name}_proj.weight"] = mat(out, h)
            if fam.qkv_bias or cfg.attention_bias:
                t[f"{pre}self_attn.{name}_proj.bias"] = vec(out)
        t[f"{pre}self_attn.o_proj.weight"] = mat(h, cfg.num_heads * d)
        if cfg.attention_bias:
            t[f"{pre}self_attn.o_proj.bias"] = vec(h)
        if cfg.sinks:
            t[f"{pre}self_attn.sinks"] = rng.standard_normal(cfg.num_heads).astype(np.float32)
        if fam.qk_norm:
            t[f"{pre}self_attn.q_norm.weight"] = vec(d, 1.0)
            t[f"{pre}self_attn.k_norm.weight"] = vec(d, 1.0)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if fam.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for name in norms:
            t[f"{pre}{name}.weight"] = vec(h, norm_center)
        if not cfg.moe_layers[i]:
            n = cfg.intermediate_size
            t[f"{pre}mlp.gate_proj.weight"], t[f"{pre}mlp.up_proj.weight"] = mat(n, h), mat(n, h)
            t[f"{pre}mlp.down_proj.weight"] = mat(h, n)
            continue
        e, n = cfg.num_experts, cfg.moe_intermediate_size
        gate = [mat(n, h) for _ in range(e)]
        up = [mat(n, h) for _ in range(e)]
        down = [mat(h, n) for _ in range(e)]
        router = mat(e, h)
        if fam.moe == "gpt_oss":  # [E, in, out], gate/up interleaved, biases
            x = "mlp.experts."
            t[f"{pre}mlp.router.weight"], t[f"{pre}mlp.router.bias"] = router, vec(e)
            gate_t, up_t = (np.stack(w).swapaxes(1, 2) for w in (gate, up))  # [E, H, I]
            t[f"{pre}{x}gate_up_proj"] = interleave(gate_t, up_t)
            wide = (3 * rng.standard_normal((e, 2 * n))).astype(np.float32)  # some past the clamp
            t[f"{pre}{x}gate_up_proj_bias"] = wide
            t[f"{pre}{x}down_proj"] = np.ascontiguousarray(np.stack(down).swapaxes(1, 2))
            t[f"{pre}{x}down_proj_bias"] = vec((e, h))
            continue
        if fused_experts:  # transformers 5's in-memory layout
            t[f"{pre}mlp.gate.weight"] = router
            t[f"{pre}mlp.experts.gate_up_proj"] = np.stack(
                [np.concatenate([g, u]) for g, u in zip(gate, up)]
            )
            t[f"{pre}mlp.experts.down_proj"] = np.stack(down)
            continue
        names = models.loader.EXPERT_NAMES[fam.moe]
        t[pre + names[0]] = router
        for j in range(e):
            for name, w in zip(names[1:], (gate[j], up[j], down[j])):
                t[pre + name.format(e=j)] = w
    return t


def write_checkpoint(
    path: pathlib.Path, name: str, *, seed=0, sharded=False, fused=False, overrides=None, edit=None
):
    """A random checkpoint of ``CONFIGS[name]`` (| ``overrides``); ``edit(tensors, hf)`` may
    change the tensors and the config before they are written."""
    hf = BASE | CONFIGS[name] | (overrides or {})
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(hf, np.random.default_rng(seed), fused_experts=fused)
    if edit is not None:
        edit(tensors, hf)
    (path / "config.json").write_text(json.dumps(hf))
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(path / file))
        weight_map.update(dict.fromkeys(shard, file))
    index = dict(metadata={}, weight_map=weight_map)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def prompts_for(vocab: int, seed: int = 1, block_size: int = 4):
    rng = np.random.default_rng(seed)
    first = rng.integers(2, vocab, 3 * block_size - 1).tolist()
    # the late request shares 2 blocks with the first: a prefix-cache hit
    return [
        first,
        rng.integers(2, vocab, 6).tolist(),
        first[: 2 * block_size] + rng.integers(2, vocab, 5).tolist(),
    ]


def run_scenario(
    model, prompts, *, max_new=MAX_NEW, join_at=3, sampling=None, backend="xla", block_size=4
):
    """Two requests start; the third joins at step ``join_at`` (while they decode). Blocks of
    ``block_size`` (4) and ``2 * block_size`` rows per step: prompts are prefilled in chunks
    that cross block boundaries."""
    engine = Engine(
        model, block_size=block_size, max_seqs=3, token_budget=2 * block_size,
        max_model_len=max(48, 4 * block_size + max_new), backend=backend, keep_logits=True,
    )  # fmt: skip
    sp = sampling or SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    reqs = [engine.add_request(p, sp) for p in prompts[:2]]
    steps, kinds = 0, []
    while engine.has_work():
        if steps == join_at:
            assert all(r.computed >= len(r.prompt) for r in reqs), "joins while the others decode"
            reqs.append(engine.add_request(prompts[2], sp))
        plan_sizes = [len(r.logits) for r in reqs]
        engine.step()
        kinds.append([len(r.logits) - n for r, n in zip(reqs, plan_sizes)])
        steps += 1
    assert any(k[0] > block_size for k in kinds), "no prefill chunk crossed a block boundary"
    assert reqs[2].cached_tokens == 2 * block_size, "the late request missed the cached prefix"
    assert engine.stats["steps"] >= max_new + 1
    assert engine.allocator.refs.sum() == 0, "blocks leaked"
    return reqs


def check_logits(req, want: np.ndarray, *, tolerance=TOLERANCE, upto=None):
    """The request's logits against ``want`` (positions before ``upto``, default all)."""
    positions = sorted(req.logits)
    assert positions == list(range(req.cached_tokens, len(req.tokens) - 1))
    positions = [p for p in positions if upto is None or p < upto]
    got = np.stack([req.logits[p] for p in positions])
    ref = want[positions]
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert err <= tolerance, f"request {req.request_id}: relative logit error {err:.2e}"


def margin(logits) -> float:
    """Top-two logit gap relative to the largest |logit|: the argmax survives any error below
    half of it."""
    top2 = np.sort(logits)[-2:]
    return float((top2[1] - top2[0]) / np.max(np.abs(logits)))


def router_ties(model, tokens, *, gap=BF16_TOLERANCE) -> set[int]:
    """Positions where some MoE layer's router (the float32 ``model``, an eager dense forward)
    ranks its k-th and (k+1)-th experts within ``gap`` of the token's largest |router logit|:
    bfloat16 noise may pick the other expert there, which moves that token's logits by far more
    than the rounding does (a different expert, not a rounding error)."""
    cfg = model.config
    if not any(cfg.moe_layers):
        return set()
    logits, moe = [], M._moe

    def spy(cfg, p, h, valid, backend):
        logits.append(np.asarray(M._linear(h, p["router"], p.get("router_bias")), np.float32))
        return moe(cfg, p, h, valid, backend)

    with mock.patch.object(M, "_moe", spy), jax.disable_jit():
        positions = jnp.arange(len(tokens))
        M.forward(cfg, model.params, jnp.asarray(tokens), positions, M._dense_attend(cfg))
    ties = set()
    for r in logits:  # [L, E]
        top = np.sort(r, axis=-1)[:, ::-1]
        near = (top[:, cfg.top_k - 1] - top[:, cfg.top_k]) < gap * np.max(np.abs(r), axis=-1)
        ties |= set(np.nonzero(near)[0].tolist())
    return ties


def check_bf16_against(req, tokens, logits, *, ties=(), tolerance=BF16_TOLERANCE):
    """A bfloat16 run against float32 references ``tokens`` (greedy) and ``logits`` (over the
    prompt + those tokens). Tokens are equal up to the first step whose token may legitimately
    differ: its reference top-two margin is under ``2 * tolerance``, or its position is a
    router tie (``router_ties``). Logits are within ``tolerance`` while the sequence is the
    reference's, router-tie positions excepted."""
    n = len(req.prompt)
    agree = next((j for j, t in enumerate(tokens) if req.output[j] != t), len(tokens))
    close = next(
        (
            j
            for j in range(len(tokens))
            if margin(logits[n - 1 + j]) <= 2 * tolerance or n - 1 + j in ties
        ),
        None,
    )
    if close is None or agree < close:
        assert agree == len(tokens), (
            f"request {req.request_id}: token {agree} is {req.output[agree]}, reference "
            f"{tokens[agree]} (reference margin {margin(logits[n - 1 + agree]):.1e})"
        )
    positions = sorted(req.logits)
    assert positions == list(range(req.cached_tokens, len(req.tokens) - 1))
    kept = [p for p in positions if p < n + agree and p not in ties]
    got, ref = np.stack([req.logits[p] for p in kept]), logits[kept]
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert err <= tolerance, f"request {req.request_id}: relative logit error {err:.2e}"
    return agree


# -- self-built checkpoints: loader + paged engine vs the dense forward ------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_matches_dense_forward(tmp_path, name):
    sharded, fused = name == "llama", name == "mixtral"  # the index path; fused experts
    model = load_model(write_checkpoint(tmp_path / name, name, sharded=sharded, fused=fused))
    assert model.config.name == name
    reqs = run_scenario(model, prompts_for(model.config.vocab_size))
    for req in reqs:
        want = np.asarray(dense_logits(model, req.tokens))
        check_logits(req, want)
        n = len(req.prompt)
        assert req.output == [int(np.argmax(want[n - 1 + j])) for j in range(MAX_NEW)]


def test_random_model_has_the_loaded_tree(tmp_path):
    """models.random_model (the serving benchmark's weights) builds what load_model builds."""
    for name in sorted(CONFIGS):
        loaded = load_model(write_checkpoint(tmp_path / name, name), dtype="bfloat16")
        made = models.random_model(loaded.config, dtype="bfloat16", seed=3)

        def spec(tree):
            return jax.tree.map(lambda x: (x.shape, x.dtype), tree)

        assert spec(made.params) == spec(loaded.params), name
        assert made.config == dataclasses.replace(loaded.config, dtype="bfloat16")
    tokens = prompts_for(128)[0]
    assert np.isfinite(np.asarray(dense_logits(made, tokens))).all()


def test_config_semantics():
    ropes = {}
    for name in CONFIGS:
        cfg = models.parse_config(BASE | CONFIGS[name])
        ropes[name] = cfg.ropes[0]
        if name == "gemma2":
            assert cfg.windows == (8, None)  # even layers slide
            assert cfg.attn_scale == 24**-0.5 and cfg.embed_scale == math.sqrt(48)
            assert (cfg.attn_softcap, cfg.final_softcap) == (2.0, 10.0)
            assert cfg.tie_word_embeddings and cfg.activation == "gelu_tanh"
        if name == "qwen2":
            assert cfg.windows == (None, 8)  # layers >= max_window_layers slide
        if name == "mistral":
            assert cfg.windows == (8, 8)
        if name == "qwen3_moe":
            assert cfg.moe_layers == (True, False, True) and not cfg.moe_renormalize
    base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(ropes["mistral"].inv_freq, base, rtol=1e-6)
    llama3 = np.asarray(ropes["llama"].inv_freq)
    wavelen = 2 * np.pi / base
    np.testing.assert_allclose(llama3[wavelen < 4], base[wavelen < 4], rtol=1e-6)
    np.testing.assert_allclose(llama3[wavelen > 16], base[wavelen > 16] / 8, rtol=1e-6)
    medium = (wavelen >= 4) & (wavelen <= 16)  # smoothed between the two
    assert medium.any() and np.all(llama3[medium] < base[medium])
    assert np.all(llama3[medium] > base[medium] / 8)
    assert ropes["qwen3"].scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert ropes["qwen3"].inv_freq[0] == pytest.approx(1.0) and ropes["qwen3"].inv_freq[-1] == (
        pytest.approx(base[-1] / 4, rel=1e-6)
    )
    gpt_oss = models.parse_config(BASE | CONFIGS["gpt_oss"])
    assert gpt_oss.windows == (8, None) and gpt_oss.sinks and gpt_oss.attention_bias
    assert (gpt_oss.num_experts, gpt_oss.top_k, gpt_oss.moe_intermediate_size) == (4, 2, 32)
    assert gpt_oss.moe_layers == (True, True) and gpt_oss.moe_renormalize
    assert gpt_oss.expert_activation == "swigluoai" and gpt_oss.expert_bias
    assert (gpt_oss.swiglu_alpha, gpt_oss.swiglu_limit) == (1.702, 7.0)
    # YaRN as gpt-oss configures it: factor 32, no truncation of the correction range
    yarn = gpt_oss.ropes[0]
    assert yarn.scaling == pytest.approx(0.1 * math.log(32) + 1)
    theta = 150000.0 ** (np.arange(0, 16, 2) / 16)

    def corr(rot):
        return 16 * math.log(4096 / (rot * 2 * math.pi)) / (2 * math.log(150000.0))

    low, high = corr(32), corr(1)  # 2.02 and 4.35: not rounded to 2 and 5
    ramp = np.clip((np.arange(8) - low) / (high - low), 0, 1)
    want = (1 / theta) / 32 * ramp + (1 / theta) * (1 - ramp)
    np.testing.assert_allclose(yarn.inv_freq, want, rtol=1e-6)
    # transformers' GptOssConfig defaults: no layer_types -> even layers slide; rope_theta
    # 150000 and the YaRN above when config.json names none; attention biases on
    bare = {
        k: v
        for k, v in CONFIGS["gpt_oss"].items()
        if k not in ("layer_types", "rope_parameters", "attention_bias")
    }
    bare = models.parse_config(
        {k: v for k, v in BASE.items() if k != "rope_theta"} | bare | dict(num_hidden_layers=4)
    )
    assert bare.windows == (8, None, 8, None) and bare.attention_bias
    assert bare.ropes[0] == yarn
    qwen = BASE | CONFIGS["qwen2"] | dict(use_sliding_window=False)
    assert models.parse_config(qwen).windows == (None, None)
    typed = BASE | CONFIGS["mistral"] | dict(layer_types=["full_attention", "sliding_attention"])
    assert models.parse_config(typed).windows == (None, 8)


# -- transformers fixtures: logits and greedy tokens as transformers computes them ------------


def _fixture_dirs():
    """One parameter per supported family: its fixture directory, or a skip naming it when a
    family awaiting its fixture has none yet."""
    params = []
    for family in sorted(f.name for f in models.FAMILIES.values()):
        path = FIXTURES / family
        if path.is_dir() or (FIXTURES.is_dir() and family not in AWAITING_FIXTURES):
            params.append(pytest.param(path, id=family))
            continue
        reason = (
            f"{path} is absent: make it with `python scripts/make_model_fixtures.py --families "
            f"{family} --out OUT` (torch + transformers) and copy OUT/{family} there"
        )
        params.append(pytest.param(path, id=family, marks=pytest.mark.skip(reason=reason)))
    return params


def _fixture(path):
    expected = np.load(path / "expected.npz")
    prompts = [expected[f"prompt_{i}"].tolist() for i in range(3)]
    return expected, prompts, int(expected["max_new_tokens"])


@pytest.mark.parametrize("path", _fixture_dirs())
def test_transformers_parity(path):
    expected, prompts, max_new = _fixture(path)
    model = load_model(path)
    assert model.config.dtype == "float32"
    reqs = run_scenario(model, prompts, max_new=max_new)
    for i, req in enumerate(reqs):
        assert req.output == expected[f"greedy_{i}"].tolist(), f"{path.name} prompt {i}"
        check_logits(req, expected[f"logits_{i}"])


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("path", _fixture_dirs())
def test_transformers_parity_bf16_on_gpu(path):
    """bfloat16 weights on the GPU (backend auto: kernels where they take the shapes, here the
    MoE kernels; head_dim 16 is below the attention kernels' 64) against transformers' float32
    fixture: logits within 2e-2, greedy tokens equal wherever the fixture's margin allows (MoE:
    except where the router has a near-tie, found with our float32 model, which matches the
    fixture to 1e-4)."""
    expected, prompts, max_new = _fixture(path)
    model, f32 = load_model(path, dtype="bfloat16"), load_model(path)
    assert model.params["embed"].dtype == jnp.bfloat16
    reqs = run_scenario(model, prompts, max_new=max_new, backend="auto")
    for i, req in enumerate(reqs):
        tokens = expected[f"greedy_{i}"].tolist()
        ties = router_ties(f32, req.prompt + tokens)
        check_bf16_against(req, tokens, expected[f"logits_{i}"], ties=ties)


def test_fixture_families_cover_the_supported_architectures():
    if not FIXTURES.is_dir():
        pytest.skip(f"{FIXTURES} is absent")
    dirs = [p for p in FIXTURES.iterdir() if p.is_dir()]
    archs = {json.loads((p / "config.json").read_text())["architectures"][0] for p in dirs}
    awaiting = {a for a, f in models.FAMILIES.items() if f.name in AWAITING_FIXTURES}
    assert archs <= set(models.FAMILIES)
    assert set(models.FAMILIES) - archs <= awaiting, "a family lost its transformers fixture"
    assert any((p / "model.safetensors.index.json").exists() for p in dirs)
    names = set().union(*(models.Checkpoint(p).weight_map for p in dirs))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # fused experts (transformers 5)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names  # per expert
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert size < 2 * 2**20, f"fixtures take {size} bytes"


# -- gpt-oss: MXFP4 experts, bfloat16 on the GPU kernels -------------------------------------


def e2m1(code: int) -> float:
    """FP4 E2M1 from its bits (sign, 2 exponent bits, 1 mantissa bit), independent of the
    loader's table: subnormal m/2 at exponent 0, else (1 + m/2) * 2^(e - 1)."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    value = man / 2 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)
    return -value if sign else value


def test_mxfp4_dequantization_by_hand():
    # one row of two 32-value blocks: bytes hold (low nibble, high nibble) = values (2b, 2b+1)
    blocks = np.zeros((1, 2, 16), np.uint8)
    blocks[0, 0, :3] = [0x21, 0xF8, 0x7A]  # (0.5, 1.0), (-0.0, -6.0), (-1.0, 6.0)
    blocks[0, 1, 15] = 0x93  # values 62, 63 of the row: (1.5, -0.5)
    scales = np.array([[128, 125]], np.uint8)  # 2^1 and 2^-2
    out = models.loader.dequantize_mxfp4(blocks, scales)
    assert out.shape == (1, 64) and out.dtype == np.float32
    want = np.zeros(64, np.float32)
    want[:6] = [1.0, 2.0, -0.0, -12.0, -2.0, 12.0]
    want[62:] = [1.5 / 4, -0.5 / 4]
    np.testing.assert_array_equal(out[0], want)
    assert np.signbit(out[0, 2])  # -0.0 stays negative zero, as transformers' table has it
    codes = np.arange(16, dtype=np.uint8)
    table = models.loader.dequantize_mxfp4(
        np.pad(codes[:, None], ((0, 0), (0, 15)))[:, None], np.full((16, 1), 127, np.uint8)
    )[:, 0]
    assert table.tolist() == [e2m1(c) for c in range(16)]
    with pytest.raises(ValueError, match="MXFP4 blocks"):
        models.loader.dequantize_mxfp4(blocks, scales[:, :1])


def _to_mxfp4(tensors, hf, rng):
    """Replaces the experts of a gpt-oss checkpoint by random MXFP4 blocks and scales; returns
    the dequantized experts ([E, in, out] as save_pretrained writes them), decoded here by
    e2m1 and the E8M0 rule, for the unquantized twin."""
    hf["quantization_config"] = dict(quant_method="mxfp4")
    lut = np.array([e2m1(c) for c in range(16)], np.float32)
    plain = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, inp, out = tensors.pop(name).shape
        blocks = rng.integers(0, 256, (e, out, inp // 32, 16), dtype=np.uint8)
        scales = rng.integers(122, 129, (e, out, inp // 32), dtype=np.uint8)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        pairs = np.stack([lut[blocks % 16], lut[blocks // 16]], axis=-1)  # value 2b, 2b + 1
        values = pairs.reshape(e, out, inp // 32, 32) * 2.0 ** (scales[..., None] - 127.0)
        plain[name] = np.ascontiguousarray(values.reshape(e, out, inp).swapaxes(1, 2))
    return plain


def test_gpt_oss_mxfp4_checkpoint_loads_as_its_dequantized_twin(tmp_path):
    plain = {}

    def quantize(tensors, hf):
        plain.update(_to_mxfp4(tensors, hf, np.random.default_rng(7)))

    mx = load_model(write_checkpoint(tmp_path / "mx", "gpt_oss", edit=quantize))
    assert mx.config.quantization == "mxfp4" and mx.dtype == jnp.float32  # torch_dtype float32
    twin = load_model(
        write_checkpoint(tmp_path / "plain", "gpt_oss", edit=lambda t, hf: t.update(plain))
    )
    for a, b in zip(mx.params["layers"], twin.params["layers"]):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    # de-interleaved: gate (the even columns on disk) first, then up
    gate_up = plain["model.layers.0.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(
        np.asarray(mx.params["layers"][0]["w_gate_up"])[..., :32], gate_up[..., ::2]
    )
    np.testing.assert_array_equal(
        np.asarray(mx.params["layers"][0]["w_gate_up"])[..., 32:], gate_up[..., 1::2]
    )
    reqs = run_scenario(mx, prompts_for(128))
    for req in reqs:
        check_logits(req, np.asarray(dense_logits(twin, req.tokens)))
    # without torch_dtype an MXFP4 checkpoint loads in bfloat16, as transformers dequantizes it
    hf = json.loads((tmp_path / "mx" / "config.json").read_text())
    del hf["torch_dtype"]
    (tmp_path / "mx" / "config.json").write_text(json.dumps(hf))
    assert load_model(tmp_path / "mx").params["layers"][1]["w_down"].dtype == jnp.bfloat16


def test_gpt_oss_mxfp4_missing_scales_are_named(tmp_path):
    def drop(tensors, hf):
        _to_mxfp4(tensors, hf, np.random.default_rng(0))
        del tensors["model.layers.1.mlp.experts.down_proj_scales"]
        tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = np.zeros(
            (4, 64, 1, 16), np.uint8
        )

    with pytest.raises(models.MissingTensorError) as e:
        load_model(write_checkpoint(tmp_path / "mx", "gpt_oss", edit=drop))
    msg = str(e.value)
    assert "model.layers.1.mlp.experts.down_proj_scales" in msg
    assert "gate_up_proj_blocks: shape (4, 64, 1, 16), expected (4, 64, 2, 16)" in msg


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_gpt_oss_bf16_on_gpu_kernels(tmp_path):
    """gpt-oss at head_dim 64 and block size 16, which the GPU attention kernels take (sinks,
    the window on layer 0), bfloat16 through backend auto, against the float32 dense forward
    on xla: logits within 2e-2 and greedy tokens where the float32 margin allows."""
    path = write_checkpoint(
        tmp_path / "g", "gpt_oss", overrides=dict(head_dim=64, hidden_size=128, sliding_window=24)
    )
    f32, bf16 = load_model(path), load_model(path, dtype="bfloat16")
    prompts = prompts_for(128, block_size=16)
    reqs = run_scenario(bf16, prompts, backend="auto", block_size=16)
    for req in reqs:
        n, seq = len(req.prompt), list(req.prompt)
        for _ in range(MAX_NEW):  # the float32 greedy continuation, by dense forwards
            seq.append(int(np.argmax(np.asarray(dense_logits(f32, seq))[-1])))
        ties = router_ties(f32, seq)
        check_bf16_against(req, seq[n:], np.asarray(dense_logits(f32, seq)), ties=ties)


# -- errors -------------------------------------------------------------------------------


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    with pytest.raises(models.UnsupportedArchitectureError, match="LlamaForCausalLM") as e:
        models.parse_config(BASE | dict(architectures=["GPT2LMHeadModel"]))
    assert "GPT2LMHeadModel" in str(e.value) and "Qwen3MoeForCausalLM" in str(e.value)
    assert "GptOssForCausalLM" in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(models.UnsupportedArchitectureError, match="names no architecture"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope type 'dynamic'"),
        (dict(quantization_config=dict(quant_method="mxfp4")), "quantized.*mxfp4.*GptOss"),
        (dict(hidden_act="relu2"), "hidden_act 'relu2'"),
        (dict(layer_types=["chunked_attention"] * 2), "chunked_attention"),
    ],
)
def test_unsupported_config_feature_is_named(extra, match):
    with pytest.raises(models.UnsupportedConfigError, match=match):
        models.parse_config(BASE | CONFIGS["llama"] | extra)


def test_gpt_oss_takes_only_mxfp4_quantization():
    fp8 = dict(quantization_config=dict(quant_method="fp8"))
    with pytest.raises(models.UnsupportedConfigError, match="quantized.*fp8"):
        models.parse_config(BASE | CONFIGS["gpt_oss"] | fp8)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    path = write_checkpoint(tmp_path / "m", "qwen2")
    from safetensors.numpy import load_file

    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 31), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(models.MissingTensorError) as e:
        load_model(path)
    msg = str(e.value)
    assert "model.layers.1.self_attn.k_proj.bias" in msg and "model.norm.weight" in msg
    assert "model.layers.0.mlp.down_proj.weight: shape (64, 31), expected (64, 32)" in msg
    (path / "model.safetensors").unlink()
    with pytest.raises(models.ModelError, match="no \\*.safetensors"):
        load_model(path)


def test_engine_rejects_requests_it_cannot_hold(tmp_path):
    model = load_model(write_checkpoint(tmp_path / "l", "mistral"))
    with pytest.raises(ValueError, match="token_budget"):
        Engine(model, max_seqs=8, token_budget=4)
    engine = Engine(model, block_size=4, max_seqs=2, token_budget=8, max_model_len=16)
    with pytest.raises(ValueError, match="exceeds max_model_len 16"):
        engine.add_request(list(range(2, 12)), SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="outside"):
        engine.add_request([5, 500])
