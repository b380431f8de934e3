"""Naive float64 NumPy oracles: one sequence, one query row at a time, straight from SPEC.md."""

from __future__ import annotations

import math

import numpy as np


def attention(
    q,
    k_seqs,
    v_seqs,
    context_lens,
    cu_seqlens_q,
    *,
    scale=None,
    softcap=None,
    sliding_window=None,
    alibi_slopes=None,
    sinks=None,
):
    """q [T, H, D]; k_seqs[i], v_seqs[i]: [L_i, Hkv, D] (the values as stored, dequantised)."""
    q = np.asarray(q, np.float64)
    num_tokens, num_heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = np.zeros_like(q)
    for i, ctx in enumerate(context_lens):
        start, end = cu_seqlens_q[i], cu_seqlens_q[i + 1]
        n = end - start
        if ctx == 0 or n == 0:
            continue
        k = np.asarray(k_seqs[i], np.float64)
        v = np.asarray(v_seqs[i], np.float64)
        group = num_heads // k.shape[1]
        for j in range(n):
            p = ctx - n + j
            keys = np.arange(ctx)
            visible = keys <= p
            if sliding_window is not None:
                visible &= keys > p - sliding_window
            if not visible.any():
                continue
            for h in range(num_heads):
                logit = scale * (k[:, h // group, :] @ q[start + j, h])
                if softcap is not None:
                    logit = softcap * np.tanh(logit / softcap)
                if alibi_slopes is not None:
                    logit = logit + alibi_slopes[h] * (keys - p)
                logit = logit[visible]
                m = logit.max() if sinks is None else max(logit.max(), sinks[h])
                w = np.exp(logit - m)
                denom = w.sum() + (0.0 if sinks is None else np.exp(sinks[h] - m))
                out[start + j, h] = (w / denom) @ v[visible, h // group, :]
    return out


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def topk(
    logits,
    top_k,
    *,
    scoring="softmax",
    renormalize=False,
    correction_bias=None,
    num_expert_group=None,
    topk_group=None,
    routed_scaling_factor=1.0,
):
    logits = np.asarray(logits, np.float64)
    scores = _softmax(logits) if scoring == "softmax" else 1.0 / (1.0 + np.exp(-logits))
    select = scores + (0 if correction_bias is None else np.asarray(correction_bias))
    weights = np.zeros((logits.shape[0], top_k))
    ids = np.zeros((logits.shape[0], top_k), np.int64)
    for t in range(logits.shape[0]):
        sel = select[t].copy()
        if num_expert_group is not None:
            groups = sel.reshape(num_expert_group, -1)
            gscore = np.sort(groups, axis=-1)[:, ::-1][:, :2].sum(-1)
            keep = np.argsort(-gscore, kind="stable")[:topk_group]
            mask = np.zeros(num_expert_group, bool)
            mask[keep] = True
            sel = np.where(np.repeat(mask, groups.shape[1]), sel, -np.inf)
        order = np.argsort(-sel, kind="stable")[:top_k]
        ids[t] = order
        weights[t] = scores[t, order]
    if renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * routed_scaling_factor, ids


def _act(x, activation):
    if activation == "silu":
        return x / (1.0 + np.exp(-x))
    if activation == "gelu":
        from math import erf

        return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(activation)


def moe(x, w_gate_up, w_down, weights, ids, activation="silu"):
    x = np.asarray(x, np.float64)
    wgu = np.asarray(w_gate_up, np.float64)
    wd = np.asarray(w_down, np.float64)
    inter = wd.shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < wgu.shape[0]:
                continue
            h = x[t] @ wgu[e]
            out[t] += float(weights[t, j]) * ((_act(h[:inter], activation) * h[inter:]) @ wd[e])
    return out
