"""Makes the transformers-parity fixtures of tests/test_models.py (run once, where torch and
transformers are installed; the CPU is enough, no network is used).

For each supported family it builds a tiny float32 model from a config with transformers
(random weights, fixed seed, eager attention), saves it with ``save_pretrained`` (Llama sharded,
so the ``model.safetensors.index.json`` path is covered; Qwen3-MoE with fused expert tensors,
Mixtral per expert; gpt-oss with its own interleaved, biased experts, attention sinks, YaRN
without truncation and a window of 8 on its first layer), and stores in ``expected.npz``, for
three fixed prompts: the greedy continuation (a full forward per step, argmax of the last row)
and the logits of a forward over prompt + continuation. The third prompt shares its first 8
tokens with the first (the engine test serves it from the prefix cache).

    python scripts/make_model_fixtures.py --out OUT/models
    python scripts/make_model_fixtures.py --out OUT/models --families gpt_oss   # just one
    # then copy OUT/models/* to tests/fixtures/models/

The whole output stays under 2 MB. Weights are drawn so that every part matters (norm weights
around 1, or around 0 for Gemma's 1 + weight; non-zero biases), and a seed is kept only when
every greedy step's top-two logits differ by more than 1e-3 of the largest logit, so the
argmax is stable under the test's 1e-4 logit tolerance.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pathlib
import shutil
import sys

import numpy as np

MAX_NEW = 10
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
    bos_token_id=0,
    eos_token_id=1,
)
ROPE = dict(rope_type="default", rope_theta=10000.0)
# family -> (transformers config class, config kwargs)
FAMILIES = {
    "llama": (
        "LlamaConfig",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=True
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=48,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_size=48,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=10.0,
            sliding_window=8,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=16,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=48,
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            hidden_size=48,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,  # the prompts + continuations reach 23 tokens: the window matters
            attention_bias=True,
            max_position_embeddings=131072,
            # gpt-oss-20b/120b's YaRN as released (head_dim 16 here: ramp over dims 2 to 4.35)
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=32.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=4096,
            ),
            tie_word_embeddings=False,
        ),
    ),
}
GATE_UP_BIAS = 3.0  # gpt-oss: std of the experts' gate/up biases (past the clamp at times)
SHARDED = "llama"
FUSED = "qwen3_moe"  # saved with transformers 5's fused expert tensors (the others: per expert)
REPO_FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models"
KEEP = ("config.json", "expected.npz")  # plus model*.safetensors and the index


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1234)
    first = rng.integers(2, vocab, 11).tolist()
    second = rng.integers(2, vocab, 6).tolist()
    return [first, second, first[:8] + rng.integers(2, vocab, 5).tolist()]


def make_config(transformers, class_name: str, kwargs: dict):
    cls = getattr(transformers, class_name)
    params = inspect.signature(cls).parameters
    kwargs = dict(kwargs)
    rope = kwargs.pop("rope_parameters", ROPE)
    if "rope_parameters" in params:
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x: rope_theta + rope_scaling
        kwargs["rope_theta"] = rope["rope_theta"]
        if rope["rope_type"] != "default":
            kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    try:
        return cls(**kwargs)
    except TypeError:  # a config without **kwargs: keep the parameters it names
        return cls(**{k: v for k, v in kwargs.items() if k in params})


def init_weights(torch, model, seed: int, gemma: bool, gpt_oss: bool = False):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                value = 0.1 * noise + (0.0 if gemma else 1.0)
            elif name.endswith("sinks"):  # gpt-oss: sink logits on the scale of q.k logits
                value = noise
            elif gpt_oss and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                value = noise / math.sqrt(p.shape[-2])  # [E, in, out]: the input is dim -2
            elif gpt_oss and name.endswith("experts.gate_up_proj_bias"):
                # wide: some gate/up columns sit past swigluoai's clamp at 7 (and -7 for up)
                value = GATE_UP_BIAS * noise
            elif name.endswith("bias") or p.ndim == 1:
                value = 0.1 * noise
            elif "embed_tokens" in name:
                value = noise
            else:  # [out, in] linears and [E, out, in] fused experts: the input is the last dim
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value.to(p.dtype))


def greedy(torch, model, prompt: list[int]):
    """Greedy continuation by full forwards (no cache); returns tokens and the final logits."""
    seq, margins = list(prompt), []
    for _ in range(MAX_NEW):
        with torch.no_grad():
            last = model(input_ids=torch.tensor([seq])).logits[0, -1].float().numpy()
        top2 = np.sort(last)[-2:]
        margins.append(float((top2[1] - top2[0]) / np.max(np.abs(last))))
        seq.append(int(np.argmax(last)))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float().numpy()
    return seq[len(prompt) :], logits.astype(np.float32), min(margins)


def cross_check_generate(torch, model, prompt, want) -> str:
    """transformers' own generate() (with its KV cache) should agree; reported, not required."""
    try:
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            do_sample=False,
        )
        got = out[0, len(prompt) :].tolist()
        return "generate() agrees" if got == want else f"generate() differs: {got} vs {want}"
    except Exception as e:  # noqa: BLE001 - informational only
        return f"generate() failed: {type(e).__name__}: {e}"


def save(model, path: pathlib.Path, sharded: bool, fused: bool):
    params = inspect.signature(model.save_pretrained).parameters
    kw = {"safe_serialization": True} if "safe_serialization" in params else {}
    if sharded and "max_shard_size" in params:
        kw["max_shard_size"] = "100KB"
    if fused and "save_original_format" in params:
        kw["save_original_format"] = False
    model.save_pretrained(str(path), **kw)
    if sharded and not (path / "model.safetensors.index.json").exists():
        split(path)
    for f in path.iterdir():
        if f.name not in KEEP and not (f.name.startswith("model") and "safetensors" in f.name):
            f.unlink()


def split(path: pathlib.Path):
    """Shards model.safetensors into two files + an index (when save_pretrained did not)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in half}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, file))
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build(torch, transformers, family: str, out: pathlib.Path, tries: int = 20) -> str:
    class_name, kwargs = FAMILIES[family]
    config = make_config(transformers, class_name, BASE | kwargs)
    head_dim, heads = (BASE | kwargs)["head_dim"], BASE["num_attention_heads"]
    for attempt in range(tries):
        seed = 1000 * (list(FAMILIES).index(family) + 1) + attempt
        torch.manual_seed(seed)
        # gpt-oss: the eager experts loop (the readable reference) rather than grouped_mm
        extra = {"experts_implementation": "eager"} if family == "gpt_oss" else {}
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="eager", **extra
            )
        except TypeError:
            config._attn_implementation = "eager"
            model = transformers.AutoModelForCausalLM.from_config(config)
        model = model.to(torch.float32).eval()
        q = model.model.layers[0].self_attn.q_proj.weight
        if tuple(q.shape) != (heads * head_dim, config.hidden_size):
            raise SystemExit(f"{family}: q_proj is {tuple(q.shape)}; the config lost head_dim")
        init_weights(torch, model, seed, gemma=family == "gemma2", gpt_oss=family == "gpt_oss")
        ps = prompts(config.vocab_size)
        results = [greedy(torch, model, p) for p in ps]
        margin = min(r[2] for r in results)
        if margin > 1e-3:
            break
        print(f"  {family}: seed {seed} has a near-tie (margin {margin:.1e}); trying another")
    else:
        raise SystemExit(f"{family}: no seed in {tries} tries gives stable greedy tokens")
    path = out / family
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    save(model, path, sharded=family == SHARDED, fused=family == FUSED)
    arrays = {"max_new_tokens": np.int32(MAX_NEW)}
    notes = []
    for i, (p, (tokens, logits, _)) in enumerate(zip(ps, results)):
        arrays[f"prompt_{i}"] = np.asarray(p, np.int32)
        arrays[f"greedy_{i}"] = np.asarray(tokens, np.int32)
        arrays[f"logits_{i}"] = logits
        notes.append(cross_check_generate(torch, model, p, tokens))
    arrays["versions"] = np.asarray(
        [f"transformers {transformers.__version__}", f"torch {torch.__version__}"]
    )
    np.savez_compressed(path / "expected.npz", **arrays)
    size = sum(f.stat().st_size for f in path.iterdir())
    files = sorted(f.name for f in path.iterdir())
    return f"{family}: seed {seed}, margin {margin:.1e}, {size / 1024:.0f} KiB {files}; " + (
        "; ".join(sorted(set(notes)))
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (one subfolder per family)")
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help="comma-separated subset (e.g. gpt_oss)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    import torch
    import transformers

    torch.set_default_dtype(torch.float32)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for family in args.families.split(","):
        print(build(torch, transformers, family, out), flush=True)
    # the committed fixtures of the families not made now count towards the 2 MiB as well
    made = {p.name for p in out.iterdir() if p.is_dir()}
    kept = [p for p in REPO_FIXTURES.glob("*") if p.is_dir() and p.name not in made]
    total = sum(f.stat().st_size for d in [out, *kept] for f in d.rglob("*") if f.is_file())
    print(f"total {total / 2**20:.2f} MiB in {out}" + (f" and {REPO_FIXTURES}" if kept else ""))
    if total >= 2 * 2**20:
        print("warning: the fixtures should stay under 2 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
