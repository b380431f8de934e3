"""The decoder forward pass, in plain JAX, for every supported family.

``forward`` runs a flat batch of rows (many sequences' prefill chunks and decode tokens packed
together) through the layers. Attention is a parameter: the serving path writes each layer's
``k, v`` into its paged cache and attends with :class:`jax_paged_attn.PagedAttention` (one
``write_kv`` + ``paged_attention`` per layer per step); :func:`dense_logits` attends over one
whole sequence without a cache, the reference the engine is checked against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

import jax_paged_attn as jpa
from jax_paged_attn.models.config import ModelConfig, Rope
from jax_paged_attn.models.loader import Model

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def rms_norm(x, weight, eps):
    """RMSNorm in float32; ``weight`` already includes Gemma's ``+ 1``."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight).astype(x.dtype)


def rope(x, positions, r: Rope):
    """Rotary embedding of ``x [T, heads, D]`` (the rotate-half layout of transformers)."""
    inv_freq = jnp.asarray(r.inv_freq, jnp.float32)
    angle = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angle = jnp.concatenate([angle, angle], axis=-1)[:, None, :]  # [T, 1, D]
    cos = (jnp.cos(angle) * r.scaling).astype(x.dtype)
    sin = (jnp.sin(angle) * r.scaling).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _dot(x, w):
    """``x @ w``; float32 models compute in true float32 (GPUs would round to TF32 by default),
    as the library's ops do."""
    precision = lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    return jnp.matmul(x, w, precision=precision)


def _linear(x, w, b=None):
    y = _dot(x, w)
    return y if b is None else y + b


def _mlp(cfg: ModelConfig, p, h):
    gate_up = _linear(h, p["w_gate_up"], p.get("b_gate_up"))
    n = gate_up.shape[-1] // 2
    return _linear(
        ACTIVATIONS[cfg.activation](gate_up[:, :n]) * gate_up[:, n:], p["w_down"], p.get("b_down")
    )


def _moe(cfg: ModelConfig, p, h, valid, backend):
    # gpt-oss: softmax over the top-k router logits = renormalized softmax over all, top-k
    router_logits = _linear(h, p["router"], p.get("router_bias"))
    weights, ids = jpa.moe_topk(router_logits, cfg.top_k, renormalize=cfg.moe_renormalize)
    ids = jnp.where(valid[:, None], ids, cfg.num_experts)  # padding rows go to no expert
    weights = weights.astype(h.dtype)  # transformers rounds the routing weights to the model dtype
    return jpa.fused_moe(
        h,
        p["w_gate_up"],
        p["w_down"],
        weights,
        ids,
        activation=cfg.expert_activation or cfg.activation,
        b_gate_up=p.get("b_gate_up"),
        b_down=p.get("b_down"),
        swiglu_alpha=cfg.swiglu_alpha,
        swiglu_limit=cfg.swiglu_limit,
        backend=backend,
    )


def _attention(cfg: ModelConfig, i, p, h, positions, attend):
    t, d = h.shape[0], cfg.head_dim
    q = _linear(h, p["wq"], p.get("bq")).reshape(t, cfg.num_heads, d)
    k = _linear(h, p["wk"], p.get("bk")).reshape(t, cfg.num_kv_heads, d)
    v = _linear(h, p["wv"], p.get("bv")).reshape(t, cfg.num_kv_heads, d)
    if cfg.family.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = rope(q, positions, cfg.ropes[i]), rope(k, positions, cfg.ropes[i])
    out = attend(i, q, k, v, p.get("sinks"))  # [T, heads, D]
    return _linear(out.reshape(t, cfg.num_heads * d), p["wo"], p.get("bo"))


def forward(cfg: ModelConfig, params, tokens, positions, attend, *, valid=None, backend="auto"):
    """Hidden states ``[T, H]`` (after the final norm) of a flat batch of rows.

    ``attend(layer, q, k, v, sinks) -> [T, heads, D]`` is the attention (``sinks``: the layer's
    f32 ``[heads]`` sink logits, or None); ``valid`` (bool ``[T]``)
    marks real rows (padding rows are routed to no expert).
    """
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    x = params["embed"][tokens]
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    eps = cfg.rms_norm_eps
    for i, p in enumerate(params["layers"]):
        a = _attention(cfg, i, p, rms_norm(x, p["attn_in_norm"], eps), positions, attend)
        if cfg.family.sandwich_norms:
            a = rms_norm(a, p["attn_out_norm"], eps)
        x = x + a
        h = rms_norm(x, p["mlp_in_norm"], eps)
        m = _moe(cfg, p, h, valid, backend) if cfg.moe_layers[i] else _mlp(cfg, p, h)
        if cfg.family.sandwich_norms:
            m = rms_norm(m, p["mlp_out_norm"], eps)
        x = x + m
    return rms_norm(x, params["final_norm"], eps)


def lm_logits(cfg: ModelConfig, params, hidden):
    """Float32 logits ``[N, vocab]`` of hidden states ``[N, H]`` (final softcap applied)."""
    head = params.get("lm_head")
    logits = _dot(hidden, head if head is not None else params["embed"].T)
    logits = logits.astype(jnp.float32)
    if cfg.final_softcap is not None:
        logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return logits


def attention_layers(cfg: ModelConfig, backend: str = "auto") -> tuple:
    """One :class:`jax_paged_attn.PagedAttention` per layer (its scale, softcap, window)."""
    return tuple(
        jpa.PagedAttention(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            num_kv_heads=cfg.num_kv_heads,
            scale=cfg.attn_scale,
            softcap=cfg.attn_softcap,
            sliding_window=cfg.windows[i],
            backend=backend,
        )
        for i in range(cfg.num_layers)
    )


def paged_forward(cfg: ModelConfig, params, caches, tokens, positions, meta, *, backend="auto"):
    """The serving forward: returns (hidden ``[T, H]``, the updated per-layer caches)."""
    layers = attention_layers(cfg, backend)
    caches = list(caches)

    def attend(i, q, k, v, sinks):
        # write_kv, then paged_attention
        out, caches[i] = layers[i](q, k, v, caches[i], meta, sinks=sinks)
        return out

    valid = jnp.arange(tokens.shape[0]) < meta.cu_seqlens_q[-1]
    hidden = forward(cfg, params, tokens, positions, attend, valid=valid, backend=backend)
    return hidden, caches


def init_caches(cfg: ModelConfig, num_blocks: int, block_size: int, dtype) -> list:
    return [
        jpa.KVCache.init(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        for _ in range(cfg.num_layers)
    ]


def _dense_attend(cfg: ModelConfig):
    def attend(i, q, k, v, sinks=None):
        n = q.shape[0]
        group = cfg.num_heads // cfg.num_kv_heads
        k = jnp.repeat(k, group, axis=1).astype(jnp.float32)
        v = jnp.repeat(v, group, axis=1).astype(jnp.float32)
        s = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k, precision="highest")
        s = s * cfg.attn_scale
        if cfg.attn_softcap is not None:
            s = cfg.attn_softcap * jnp.tanh(s / cfg.attn_softcap)
        pos = jnp.arange(n)
        mask = pos[None, :] <= pos[:, None]
        if cfg.windows[i] is not None:
            mask &= pos[None, :] > pos[:, None] - cfg.windows[i]
        s = jnp.where(mask, s, -jnp.inf)
        if sinks is None:
            p = jax.nn.softmax(s, axis=-1)
        else:  # the sink joins the denominator (a key with no value), as transformers' eager
            sink = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None, None], (*s.shape[:2], 1))
            p = jax.nn.softmax(jnp.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
        return jnp.einsum("hqk,khd->qhd", p, v, precision="highest").astype(q.dtype)

    return attend


@functools.partial(jax.jit, static_argnums=0)
def _dense(cfg, params, tokens):
    hidden = forward(cfg, params, tokens, jnp.arange(tokens.shape[0]), _dense_attend(cfg))
    return lm_logits(cfg, params, hidden)


def dense_logits(model: Model, tokens) -> jax.Array:
    """Reference logits ``[L, vocab]`` of one whole sequence: causal attention without a cache
    (dense MoE routing goes through the same ``moe_topk`` / ``fused_moe``)."""
    return _dense(model.config, model.params, jnp.asarray(tokens, jnp.int32))
