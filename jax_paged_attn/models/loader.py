"""Loads a Hugging Face checkpoint directory: ``config.json`` and ``*.safetensors`` (one file,
or shards listed in ``model.safetensors.index.json``), read with ``safetensors``' NumPy loader.

Weights are stored the way the model multiplies them, ``x @ W`` (Hugging Face keeps
``[out, in]``): attention ``wq [H, heads*D]``, ``wo [heads*D, H]``; the MLP's gate and up
projections side by side, ``w_gate_up [H, 2I]`` (gate first), ``w_down [I, H]``; experts
stacked for :func:`jax_paged_attn.fused_moe`, ``[E, H, 2I]`` and ``[E, I, H]``.

gpt-oss stores its experts already as ``x @ W`` (``gate_up_proj [E, H, 2I]``, ``down_proj
[E, I, H]``) with gate and up columns interleaved (``[..., ::2]`` gate, ``[..., 1::2]`` up);
they are de-interleaved to gate first. Its released checkpoints hold the experts in MXFP4
(``*_blocks`` + ``*_scales``), dequantized here to the model dtype as transformers does
(:func:`dequantize_mxfp4`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_attn.models.config import MissingTensorError, ModelConfig, ModelError, load_config

# Per-expert tensor names: (router, gate, up, down) under "model.layers.{i}.", "{e}" the expert.
EXPERT_NAMES = {
    "mixtral": (
        "block_sparse_moe.gate.weight",
        "block_sparse_moe.experts.{e}.w1.weight",
        "block_sparse_moe.experts.{e}.w3.weight",
        "block_sparse_moe.experts.{e}.w2.weight",
    ),
    "qwen3_moe": (
        "mlp.gate.weight",
        "mlp.experts.{e}.gate_proj.weight",
        "mlp.experts.{e}.up_proj.weight",
        "mlp.experts.{e}.down_proj.weight",
    ),
}
# Experts fused into two tensors (transformers >= 5 with save_original_format=False).
FUSED_EXPERTS = ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# gpt-oss: router (with bias), experts [E, H, 2I] interleaved gate/up and [E, I, H], biases.
GPT_OSS_EXPERTS = (
    "mlp.router.weight",
    "mlp.router.bias",
    "mlp.experts.gate_up_proj",
    "mlp.experts.gate_up_proj_bias",
    "mlp.experts.down_proj",
    "mlp.experts.down_proj_bias",
)

# MXFP4 (OCP microscaling): FP4 E2M1 codes, two per byte (low nibble first), 32 values per
# block sharing one E8M0 scale 2 ** (scale - 127); transformers' integrations/mxfp4.py.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)


def dequantize_mxfp4(blocks, scales) -> np.ndarray:
    """Float32 ``[..., G * 32]`` from MXFP4 ``blocks`` uint8 ``[..., G, 16]`` and ``scales``
    uint8 ``[..., G]``: byte ``b`` of a block holds values ``2b`` (low nibble) and ``2b + 1``
    (high nibble), each ``FP4_VALUES[code] * 2 ** (scale - 127)``.

    >>> dequantize_mxfp4(np.array([[[0x21, 0xF8] + [0] * 14]], np.uint8),
    ...                  np.array([[128]], np.uint8))[0, :4].tolist()
    [1.0, 2.0, -0.0, -12.0]
    """
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1:] != (16,):
        raise ValueError(
            f"MXFP4 blocks {blocks.shape} must be scales' shape {scales.shape} + (16,)"
        )
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)
    values = values.reshape(*scales.shape, 32)
    out = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * 32)


class Checkpoint:
    """The tensors of a checkpoint directory, opened lazily by name."""

    def __init__(self, path):
        from safetensors import safe_open  # the "models" extra

        self.path = pathlib.Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise ModelError(f"no *.safetensors files in {self.path}")
            weight_map = None
        self._files = {}
        for name in files:
            if not (self.path / name).exists():
                raise ModelError(f"{index.name} lists {name}, which is not in {self.path}")
            self._files[name] = safe_open(str(self.path / name), framework="np")
        if weight_map is None:
            weight_map = {k: name for name, f in self._files.items() for k in f.keys()}
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> np.ndarray:
        return self._files[self.weight_map[name]].get_tensor(name)


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint: its resolved config and its weights (a pytree of arrays)."""

    config: ModelConfig
    params: dict
    path: str = ""

    @property
    def dtype(self):
        return self.params["embed"].dtype


class _Reader:
    """Reads tensors by name, transposed to ``x @ W`` layout, checking shapes; collects the
    names of missing tensors so that one error lists them all."""

    def __init__(self, ckpt: Checkpoint, dtype):
        self.ckpt, self.dtype, self.missing, self.bad = ckpt, dtype, [], []

    def __call__(self, name, shape, *, transpose=False, required=True, dtype=None):
        if name not in self.ckpt:
            if required:
                self.missing.append(name)
            return None
        x = self.ckpt.get(name)
        if tuple(x.shape) != tuple(shape):
            self.bad.append(f"{name}: shape {tuple(x.shape)}, expected {tuple(shape)}")
            return None
        if transpose:
            x = np.swapaxes(x, -1, -2)
        return np.asarray(x).astype(dtype or self.dtype)

    def mxfp4(self, name, shape):
        """``name`` stored as MXFP4 ``{name}_blocks`` ``[E, out, in / 32, 16]`` + ``{name}_scales``
        ``[E, out, in / 32]`` (``shape = (E, out, in)``), dequantized one expert at a time and
        transposed to ``[E, in, out]``, in the model dtype."""
        e, out, inp = shape
        if inp % 32:
            self.bad.append(f"{name}_blocks: input size {inp} is not a multiple of 32 (MXFP4)")
            return None
        blocks = self(f"{name}_blocks", (e, out, inp // 32, 16), dtype=np.uint8)
        scales = self(f"{name}_scales", (e, out, inp // 32), dtype=np.uint8)
        if blocks is None or scales is None:
            return None
        w = np.empty((e, inp, out), self.dtype)
        for j in range(e):  # one expert's float32 copy at a time
            w[j] = dequantize_mxfp4(blocks[j], scales[j]).T
        return w

    def quantized(self, name) -> bool:
        return f"{name}_blocks" in self.ckpt


def _layer(read: _Reader, cfg: ModelConfig, i: int) -> dict:
    pre = f"model.layers.{i}."
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.family
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    norm = dict(dtype=np.float32)
    p = {}
    for key, name, out in (
        ("q", "q_proj", q_out),
        ("k", "k_proj", kv_out),
        ("v", "v_proj", kv_out),
    ):
        p[f"w{key}"] = read(f"{pre}self_attn.{name}.weight", (out, h), transpose=True)
        need_bias = cfg.attention_bias or f.qkv_bias
        p[f"b{key}"] = read(f"{pre}self_attn.{name}.bias", (out,), required=need_bias)
    p["wo"] = read(f"{pre}self_attn.o_proj.weight", (h, q_out), transpose=True)
    p["bo"] = read(f"{pre}self_attn.o_proj.bias", (h,), required=cfg.attention_bias)
    if cfg.sinks:
        p["sinks"] = read(f"{pre}self_attn.sinks", (cfg.num_heads,), dtype=np.float32)
    if f.qk_norm:
        p["q_norm"] = read(f"{pre}self_attn.q_norm.weight", (d,), **norm)
        p["k_norm"] = read(f"{pre}self_attn.k_norm.weight", (d,), **norm)
    p["attn_in_norm"] = read(f"{pre}input_layernorm.weight", (h,), **norm)
    if f.sandwich_norms:
        p["attn_out_norm"] = read(f"{pre}post_attention_layernorm.weight", (h,), **norm)
        p["mlp_in_norm"] = read(f"{pre}pre_feedforward_layernorm.weight", (h,), **norm)
        p["mlp_out_norm"] = read(f"{pre}post_feedforward_layernorm.weight", (h,), **norm)
    else:
        p["mlp_in_norm"] = read(f"{pre}post_attention_layernorm.weight", (h,), **norm)
    if cfg.moe_layers[i]:
        p.update(_experts(read, cfg, pre))
    else:
        n = cfg.intermediate_size
        gate = read(f"{pre}mlp.gate_proj.weight", (n, h), transpose=True)
        up = read(f"{pre}mlp.up_proj.weight", (n, h), transpose=True)
        p["w_gate_up"] = None if gate is None or up is None else np.concatenate([gate, up], 1)
        p["w_down"] = read(f"{pre}mlp.down_proj.weight", (h, n), transpose=True)
        if cfg.mlp_bias:
            bg = read(f"{pre}mlp.gate_proj.bias", (n,))
            bu = read(f"{pre}mlp.up_proj.bias", (n,))
            p["b_gate_up"] = None if bg is None or bu is None else np.concatenate([bg, bu])
            p["b_down"] = read(f"{pre}mlp.down_proj.bias", (h,))
    for key in ("attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm"):
        if p.get(key) is not None:
            p[key] = p[key] + np.float32(f.norm_offset)
    return {k: v for k, v in p.items() if v is not None}


def _deinterleave(x):
    """``[..., 2I]`` with gate/up columns alternating -> gate first, then up."""
    return None if x is None else np.concatenate([x[..., ::2], x[..., 1::2]], axis=-1)


def _gpt_oss_experts(read: _Reader, cfg: ModelConfig, pre: str) -> dict:
    e, h, n = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    router, router_bias, gate_up, b_gate_up, down, b_down = (pre + x for x in GPT_OSS_EXPERTS)
    if read.quantized(gate_up):
        w_gate_up = read.mxfp4(gate_up, (e, 2 * n, h))
    else:  # save_pretrained of an unquantized model: already [E, in, out]
        w_gate_up = read(gate_up, (e, h, 2 * n))
    if read.quantized(down):
        w_down = read.mxfp4(down, (e, h, n))
    else:
        w_down = read(down, (e, n, h))
    return dict(
        router=read(router, (e, h), transpose=True),
        router_bias=read(router_bias, (e,)),
        w_gate_up=_deinterleave(w_gate_up),
        b_gate_up=_deinterleave(read(b_gate_up, (e, 2 * n))),
        w_down=w_down,
        b_down=read(b_down, (e, h)),
    )


def _experts(read: _Reader, cfg: ModelConfig, pre: str) -> dict:
    e, h, n = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    if cfg.family.moe == "gpt_oss":
        return _gpt_oss_experts(read, cfg, pre)
    if f"{pre}{FUSED_EXPERTS[1]}" in read.ckpt:
        router = read(f"{pre}{FUSED_EXPERTS[0]}", (e, h), transpose=True)
        gate_up = read(f"{pre}{FUSED_EXPERTS[1]}", (e, 2 * n, h), transpose=True)
        down = read(f"{pre}{FUSED_EXPERTS[2]}", (e, h, n), transpose=True)
        return dict(router=router, w_gate_up=gate_up, w_down=down)
    router_name, gate_name, up_name, down_name = EXPERT_NAMES[cfg.family.moe]
    router = read(pre + router_name, (e, h), transpose=True)
    gate_up, down = [], []
    for j in range(e):
        gate = read(pre + gate_name.format(e=j), (n, h), transpose=True)
        up = read(pre + up_name.format(e=j), (n, h), transpose=True)
        gate_up.append(None if gate is None or up is None else np.concatenate([gate, up], 1))
        down.append(read(pre + down_name.format(e=j), (h, n), transpose=True))
    complete = all(x is not None for x in gate_up + down)
    return dict(
        router=router,
        w_gate_up=np.stack(gate_up) if complete else None,
        w_down=np.stack(down) if complete else None,
    )


def load_model(path, *, dtype=None) -> Model:
    """Loads ``path`` (a checkpoint directory) into a :class:`Model`.

    ``dtype`` (default: the checkpoint's ``torch_dtype``) is the compute and weight dtype;
    norms stay float32. Raises :class:`~jax_paged_attn.models.config.ModelError` subclasses:
    an unsupported architecture (naming the supported ones), an unsupported config feature,
    or missing / misshapen tensors (all named).
    """
    path = pathlib.Path(path)
    cfg = load_config(path)
    dtype = jnp.dtype(dtype or cfg.dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ModelError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    ckpt = Checkpoint(path)
    read = _Reader(ckpt, dtype)
    v, h = cfg.vocab_size, cfg.hidden_size
    embed = read("model.embed_tokens.weight", (v, h))
    # each layer goes to the device as it is read: the host holds one layer at a time
    layers = [_to_device(_layer(read, cfg, i)) for i in range(cfg.num_layers)]
    final_norm = read("model.norm.weight", (h,), dtype=np.float32)
    lm_head = None
    if not cfg.tie_word_embeddings:
        lm_head = read("lm_head.weight", (v, h), transpose=True)
    if read.missing or read.bad:
        problems = []
        if read.missing:
            shown = ", ".join(read.missing[:12])
            more = f" and {len(read.missing) - 12} more" if len(read.missing) > 12 else ""
            problems.append(f"missing tensors: {shown}{more}")
        problems.extend(read.bad[:12])
        raise MissingTensorError(
            f"checkpoint {path} does not fit {cfg.architecture}: " + "; ".join(problems)
        )
    params = dict(embed=embed, final_norm=final_norm + np.float32(cfg.family.norm_offset))
    if lm_head is not None:
        params["lm_head"] = lm_head
    params = _to_device(params)
    params["layers"] = layers
    return Model(cfg, params, str(path))


def random_model(cfg: ModelConfig, *, dtype="bfloat16", seed: int = 0) -> Model:
    """A :class:`Model` of random weights for ``cfg`` (e.g. ``parse_config(hf_dict)``), made on
    the device without a checkpoint: the tree :func:`load_model` builds, matrices normal with
    variance ``1 / fan_in``, norms 1, biases and sinks ``N(0, 0.1^2)``. For benchmarks."""
    dtype = jnp.dtype(dtype)
    base, counter = jax.random.key(seed), itertools.count()
    f32 = jnp.float32

    def normal(shape, fan_in=None, dt=None):
        x = jax.random.normal(jax.random.fold_in(base, next(counter)), shape, dt or dtype)
        scale = 1.0 / math.sqrt(fan_in) if fan_in else 0.1
        return x * jnp.asarray(scale, dt or dtype)

    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.family
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    layers = []
    for i in range(cfg.num_layers):
        p = dict(
            wq=normal((h, q_out), h),
            wk=normal((h, kv_out), h),
            wv=normal((h, kv_out), h),
            wo=normal((q_out, h), q_out),
            attn_in_norm=jnp.ones(h, f32),
            mlp_in_norm=jnp.ones(h, f32),
        )
        if cfg.attention_bias or f.qkv_bias:
            p.update(bq=normal((q_out,)), bk=normal((kv_out,)), bv=normal((kv_out,)))
        if cfg.attention_bias:
            p["bo"] = normal((h,))
        if cfg.sinks:
            p["sinks"] = normal((cfg.num_heads,), dt=f32)
        if f.qk_norm:
            p.update(q_norm=jnp.ones(d, f32), k_norm=jnp.ones(d, f32))
        if f.sandwich_norms:
            p.update(attn_out_norm=jnp.ones(h, f32), mlp_out_norm=jnp.ones(h, f32))
        if cfg.moe_layers[i]:
            e, n = cfg.num_experts, cfg.moe_intermediate_size
            p.update(
                router=normal((h, e), h),
                w_gate_up=normal((e, h, 2 * n), h),
                w_down=normal((e, n, h), n),
            )
            if cfg.router_bias:
                p["router_bias"] = normal((e,))
            if cfg.expert_bias:
                p.update(b_gate_up=normal((e, 2 * n)), b_down=normal((e, h)))
        else:
            n = cfg.intermediate_size
            p.update(w_gate_up=normal((h, 2 * n), h), w_down=normal((n, h), n))
            if cfg.mlp_bias:
                p.update(b_gate_up=normal((2 * n,)), b_down=normal((h,)))
        layers.append(p)
    params = dict(embed=normal((cfg.vocab_size, h), 1), layers=layers, final_norm=jnp.ones(h, f32))
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((h, cfg.vocab_size), h)
    return Model(dataclasses.replace(cfg, dtype=dtype.name), params, "random")


def _to_device(tree):
    if isinstance(tree, dict):
        return {k: _to_device(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_device(v) for v in tree]
    return jnp.asarray(tree)
