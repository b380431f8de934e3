"""Loads a Hugging Face checkpoint directory: ``config.json`` and ``*.safetensors`` (one file,
or shards listed in ``model.safetensors.index.json``), read with ``safetensors``' NumPy loader.

Weights are stored the way the model multiplies them, ``x @ W`` (Hugging Face keeps
``[out, in]``): attention ``wq [H, heads*D]``, ``wo [heads*D, H]``; the MLP's gate and up
projections side by side, ``w_gate_up [H, 2I]`` (gate first), ``w_down [I, H]``; experts
stacked for :func:`jax_paged_attn.fused_moe`, ``[E, H, 2I]`` and ``[E, I, H]``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

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


def _experts(read: _Reader, cfg: ModelConfig, pre: str) -> dict:
    e, h, n = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
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
    layers = [_layer(read, cfg, i) for i in range(cfg.num_layers)]
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
    params = dict(
        embed=embed,
        layers=layers,
        final_norm=final_norm + np.float32(cfg.family.norm_offset),
    )
    if lm_head is not None:
        params["lm_head"] = lm_head
    return Model(cfg, _to_device(params), str(path))


def _to_device(tree):
    if isinstance(tree, dict):
        return {k: _to_device(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_device(v) for v in tree]
    return jnp.asarray(tree)
