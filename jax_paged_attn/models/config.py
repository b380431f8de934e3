"""Model configurations read from a Hugging Face ``config.json``.

One :class:`Family` per supported architecture says what differs from a Llama-style decoder
(norms, biases, q/k norms, window pattern, MoE routing); :class:`ModelConfig` is the resolved,
hashable configuration the jitted model step is specialised on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np


class ModelError(ValueError):
    """A checkpoint this runner cannot serve (the message says why)."""


class UnsupportedArchitectureError(ModelError):
    pass


class UnsupportedConfigError(ModelError):
    pass


class MissingTensorError(ModelError):
    pass


@dataclasses.dataclass(frozen=True)
class Family:
    """What an architecture changes relative to a Llama decoder layer."""

    name: str
    rope_theta: float = 10000.0  # default when config.json has none
    tie_word_embeddings: bool = False  # default when config.json omits the key
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    sandwich_norms: bool = False  # Gemma 2: norms after attention and after the MLP too
    qkv_bias: bool = False  # Qwen2: q/k/v projections always carry a bias
    windows: str = "none"  # none | all | even | qwen: which layers slide without layer_types
    moe: str | None = None  # mixtral | qwen3_moe | gpt_oss: the MoE block's routing and weights
    gemma: bool = False  # scaled embeddings, query_pre_attn_scalar, logit softcaps
    attention_bias: bool = False  # default when config.json omits attention_bias
    sinks: bool = False  # gpt-oss: one learned attention-sink logit per query head and layer
    rope_default: tuple = ()  # RoPE parameters when config.json has none, as (key, value) pairs


FAMILIES = {
    "LlamaForCausalLM": Family("llama"),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True, windows="qwen"),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True, windows="qwen"),
    "MistralForCausalLM": Family("mistral", windows="all"),
    "Gemma2ForCausalLM": Family(
        "gemma2",
        tie_word_embeddings=True,
        norm_offset=1.0,
        sandwich_norms=True,
        windows="even",
        gemma=True,
    ),
    "MixtralForCausalLM": Family("mixtral", rope_theta=1e6, windows="all", moe="mixtral"),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", qk_norm=True, windows="qwen", moe="qwen3_moe"),
    "GptOssForCausalLM": Family(
        "gpt_oss",
        rope_theta=150000.0,
        windows="even",  # transformers' default layer_types: even layers slide
        moe="gpt_oss",
        attention_bias=True,
        sinks=True,
        rope_default=(  # GptOssConfig's default rope_parameters
            ("rope_type", "yarn"),
            ("factor", 32.0),
            ("beta_fast", 32.0),
            ("beta_slow", 1.0),
            ("truncate", False),
            ("original_max_position_embeddings", 4096),
        ),
    ),
}

# Architectures with a plan but not yet served, and what each one still needs (none today).
NOT_YET: dict[str, str] = {}
# Quantized checkpoints the loader dequantizes at load: architecture -> quant_method.
DEQUANTIZED = {"GptOssForCausalLM": "mxfp4"}

ACTIVATIONS = {  # Hugging Face hidden_act -> fused_moe / model activation name
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


def supported_architectures() -> str:
    return ", ".join(sorted(FAMILIES))


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer: ``angle = position * inv_freq``; cos and sin are
    multiplied by ``scaling`` (YaRN's attention factor, else 1)."""

    inv_freq: tuple[float, ...]
    scaling: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    activation: str
    tie_word_embeddings: bool
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float | None
    windows: tuple[int | None, ...]  # per layer
    ropes: tuple[Rope, ...]  # per layer
    attention_bias: bool  # q/k/v/o biases (Llama attention_bias, Qwen3, Gemma 2)
    mlp_bias: bool
    moe_layers: tuple[bool, ...]  # per layer: the MLP is a mixture of experts
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    moe_renormalize: bool = True
    expert_activation: str | None = None  # the experts' fused_moe activation (None: activation)
    expert_bias: bool = False  # experts carry b_gate_up and b_down (gpt-oss)
    router_bias: bool = False  # the router linear has a bias (gpt-oss)
    swiglu_alpha: float = 1.702  # swigluoai only
    swiglu_limit: float = 7.0  # swigluoai only
    sinks: bool = False  # one attention-sink logit per query head, per layer
    quantization: str | None = None  # "mxfp4": expert weights dequantized at load
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    max_position_embeddings: int = 4096

    @property
    def name(self) -> str:
        return self.family.name

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        return parse_config(hf)


def load_config(path) -> ModelConfig:
    """Reads ``config.json`` from a checkpoint directory (or the file itself)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ModelError(f"no config.json at {path}")
    cfg = parse_config(json.loads(path.read_text()))
    generation = path.parent / "generation_config.json"
    if generation.exists():  # instruct checkpoints list more end-of-turn tokens here
        eos = json.loads(generation.read_text()).get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *(int(t) for t in eos)]))
        cfg = dataclasses.replace(cfg, eos_token_ids=merged)
    return cfg


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(
            "config.json names no architecture ('architectures' is missing); supported: "
            + supported_architectures()
        )
    arch = archs[0]
    if arch in NOT_YET:
        raise UnsupportedArchitectureError(
            f"{arch} is not supported yet: {NOT_YET[arch]}. Supported: {supported_architectures()}"
        )
    if arch not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {arch} is not supported; supported: {supported_architectures()}"
        )
    return arch


def _rope_dicts(hf: dict, family: Family, layer_types) -> list[dict]:
    """The RoPE parameters of every layer, from ``rope_parameters`` (one dict, or one per
    layer type) or the older ``rope_theta`` + ``rope_scaling`` keys."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or dict(family.rope_default)
    theta = hf.get("rope_theta", family.rope_theta)
    if layer_types and params and set(params) <= set(layer_types):
        per_type = {t: dict(p) for t, p in params.items()}
        return [
            per_type[t] | {"rope_theta": per_type[t].get("rope_theta", theta)} for t in layer_types
        ]
    one = dict(params)
    one.setdefault("rope_theta", theta)
    return [one] * int(hf["num_hidden_layers"])


def _inv_freq(rope: dict, head_dim: int, hf: dict) -> Rope:
    """Inverse frequencies as transformers computes them (float32), per RoPE type."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope type {kind!r} is not supported; supported rope types: {', '.join(ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedConfigError("partial_rotary_factor != 1 is not supported")
    base = float(rope["rope_theta"])
    dim = head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
    scaling = 1.0
    original = rope.get(
        "original_max_position_embeddings",
        hf.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096)),
    )
    if kind == "linear":
        inv = inv / np.float32(rope["factor"])
    elif kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv, scaling = _yarn(rope, base, dim, original, hf)
    return Rope(tuple(float(x) for x in inv), float(scaling))


def _yarn(rope: dict, base: float, dim: int, original: int, hf: dict):
    factor = rope.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = np.float32(1) - ramp.astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_extra = np.float32(1) / pos_freqs
    inv_inter = np.float32(1) / (np.float32(factor) * pos_freqs)
    inv = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv.astype(np.float32), attention


def _windows(hf: dict, family: Family, num_layers: int, layer_types) -> tuple:
    window = hf.get("sliding_window")
    if family.windows == "qwen" and not hf.get("use_sliding_window", False):
        return (None,) * num_layers
    if window is None:
        return (None,) * num_layers
    window = int(window)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if family.windows == "all":
        return (window,) * num_layers
    if family.windows == "even":  # Gemma 2: layers 0, 2, 4, ... slide
        return tuple(window if i % 2 == 0 else None for i in range(num_layers))
    if family.windows == "qwen":
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def parse_config(hf: dict) -> ModelConfig:
    """Resolves a Hugging Face config dict; raises :class:`ModelError` subclasses naming the
    architecture or the config feature that is not supported."""
    arch = _architecture(hf)
    family = FAMILIES[arch]
    quantization = None
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        if DEQUANTIZED.get(arch) != method:
            allowed = ", ".join(f"{m} ({a})" for a, m in DEQUANTIZED.items())
            raise UnsupportedConfigError(
                f"quantized checkpoints are not supported ({method}); the loader dequantizes "
                f"only: {allowed}"
            )
        quantization = method
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedConfigError("use_bidirectional_attention is not supported")
    num_layers = int(hf["num_hidden_layers"])
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or hidden // num_heads)
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        layer_types = list(layer_types)[:num_layers]
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedConfigError(
                f"layer_types {unknown} are not supported; supported: {', '.join(LAYER_TYPES)}"
            )
    act_key = "hidden_activation" if family.gemma and hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_key, "gelu_pytorch_tanh" if family.gemma else "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedConfigError(
            f"{act_key} {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    ropes = tuple(_inv_freq(r, head_dim, hf) for r in _rope_dicts(hf, family, layer_types))

    moe = dict(num_experts=0, top_k=0, moe_intermediate_size=0, moe_renormalize=True)
    moe_layers = (False,) * num_layers
    if family.moe == "mixtral":
        moe = dict(
            num_experts=int(hf.get("num_local_experts", hf.get("num_experts", 0))),
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["intermediate_size"]),
            moe_renormalize=True,
        )
        moe_layers = (True,) * num_layers
    elif family.moe == "qwen3_moe":
        # transformers 5 writes num_local_experts; released Qwen3-MoE configs say num_experts
        experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)))
        step = int(hf.get("decoder_sparse_step", 1))
        dense = set(hf.get("mlp_only_layers") or [])
        moe_layers = tuple(
            i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
        )
        moe = dict(
            num_experts=experts,
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            moe_renormalize=bool(hf.get("norm_topk_prob", False)),
        )
    elif family.moe == "gpt_oss":
        # top-k of the router logits, softmax over the k: moe_topk's renormalized softmax
        moe_layers = (True,) * num_layers
        moe = dict(
            num_experts=int(hf.get("num_local_experts", hf.get("num_experts", 0))),
            top_k=int(hf.get("num_experts_per_tok", hf.get("experts_per_token", 4))),
            moe_intermediate_size=int(hf["intermediate_size"]),
            moe_renormalize=True,
            expert_activation="swigluoai",
            expert_bias=True,
            router_bias=True,
            # transformers hard-codes alpha 1.702 and limit 7.0 (released configs: swiglu_limit 7.0)
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        )
    eos = hf.get("eos_token_id")
    eos = (
        () if eos is None else tuple(int(t) for t in eos) if isinstance(eos, list) else (int(eos),)
    )
    # MXFP4 checkpoints: the dequantized experts are bfloat16, as transformers makes them
    dtype = hf.get("torch_dtype") or hf.get("dtype") or ("bfloat16" if quantization else "float32")
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        intermediate_size=int(hf.get("intermediate_size", 0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=ACTIVATIONS[act],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family.tie_word_embeddings)),
        attn_scale=float(hf.get("query_pre_attn_scalar", 256) if family.gemma else head_dim)
        ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping", 50.0) if family.gemma else None,
        final_softcap=hf.get("final_logit_softcapping", 30.0) if family.gemma else None,
        embed_scale=math.sqrt(hidden) if family.gemma else None,
        windows=_windows(hf, family, num_layers, layer_types),
        ropes=ropes,
        attention_bias=bool(hf.get("attention_bias", family.attention_bias)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        moe_layers=moe_layers,
        eos_token_ids=eos,
        dtype=str(dtype),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        sinks=family.sinks,
        quantization=quantization,
        **moe,
    )
