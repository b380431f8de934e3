"""Naive float64 NumPy oracles, one per op, written from the op's definition (not its kernels).

Each takes plain arrays (jax or NumPy, any float dtype: the values are taken as they are, so
pass what the op sees, e.g. the dequantised cache contents) and returns float64 NumPy results.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite float8_e4m3fn value: stores saturate to +-448


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _opt(x):
    return None if x is None else _f64(x)


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
    return_lse=False,
):
    """Causal attention of a batch of sequences, one sequence at a time.

    ``q`` ``[T, H, D]``; ``k_seqs[i]``, ``v_seqs[i]`` ``[L_i, Hkv, D]``: sequence ``i``'s keys
    and values as the cache holds them (dequantised), ``L_i = context_lens[i]``. Query row
    ``j`` of the ``n`` rows of sequence ``i`` sits at position ``p = L_i - n + j`` and sees keys
    ``t <= p`` (and ``t > p - sliding_window``). Query head ``h`` reads KV head
    ``h // (H // Hkv)``. Logits: ``scale * q.k``, then ``softcap * tanh(. / softcap)``, then
    ``+ alibi_slopes[h] * (t - p)``; a sink adds ``exp(sinks[h])`` to the softmax denominator.
    Rows with no visible key (padding rows past ``cu_seqlens_q[S]``, inactive sequences,
    ``p < 0``) are zero. ``return_lse=True`` returns ``(out, lse)``, ``lse`` float64 ``[T, H]``
    the natural log of the softmax denominator: ``log(exp(sinks[h]) + sum of exp(logit))`` over
    the visible keys (the sink term only with ``sinks``), ``-inf`` for rows of a sequence with no
    key and no sink (or a -inf sink), ``+inf`` for a +inf sink, and ``-inf`` for every row
    outside the sequences.
    """
    q = _f64(q)
    num_tokens, num_heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    alibi, sink = _opt(alibi_slopes), _opt(sinks)
    cu = np.asarray(cu_seqlens_q, np.int64)
    out = np.zeros_like(q)
    lse = np.full((num_tokens, num_heads), -np.inf)
    for i, ctx in enumerate(np.asarray(context_lens, np.int64)):
        start, end = int(cu[i]), int(cu[i + 1])
        n = end - start
        if n > 0 and sink is not None:  # rows that see no key: the sink alone
            lse[start:end] = sink[None, :]
        if ctx == 0 or n == 0:
            continue
        k, v = _f64(k_seqs[i])[:ctx], _f64(v_seqs[i])[:ctx]
        group = num_heads // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [L, H, D]
        pos = ctx - n + np.arange(n)  # [n]
        keys = np.arange(ctx)
        visible = keys[None, :] <= pos[:, None]  # [n, L]
        if sliding_window is not None:
            visible &= keys[None, :] > pos[:, None] - sliding_window
        s = scale * np.einsum("nhd,thd->nht", q[start:end], k)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        if alibi is not None:
            s = s + alibi[None, :, None] * (keys[None, None, :] - pos[:, None, None])
        s = np.where(visible[:, None, :], s, -np.inf)
        m = s.max(-1, keepdims=True)
        if sink is not None:
            m = np.maximum(m, sink[None, :, None])
        m = np.where(np.isfinite(m), m, 0.0)
        w = np.exp(s - m)
        denom = w.sum(-1, keepdims=True)
        if sink is not None:
            denom = denom + np.exp(sink[None, :, None] - m)
        o = np.einsum("nht,thd->nhd", w / np.where(denom == 0, 1.0, denom), v)
        out[start:end] = np.where(visible.any(-1)[:, None, None], o, 0.0)
        s_max = s.max(-1)  # [n, H]: -inf for rows that see no key
        safe = np.where(np.isfinite(s_max), s_max, 0.0)
        with np.errstate(divide="ignore"):
            keys_lse = np.log(np.exp(s - safe[..., None]).sum(-1)) + safe
        if sink is not None:
            keys_lse = np.logaddexp(keys_lse, sink[None, :])
        lse[start:end] = keys_lse
    return (out, lse) if return_lse else out


def paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    k_scale=None,
    v_scale=None,
    **opts,
) -> np.ndarray:
    """:func:`attention` over a paged cache as a kernel receives it: ``k_pages, v_pages``
    ``[NB, Hkv, BS, D]`` (float8: times the per-KV-head scales), token ``t`` of sequence
    ``i`` in block ``block_tables[i, t // BS]`` at offset ``t % BS``. Only those entries of the
    tables are read. ``opts``: :func:`attention`'s options."""
    tables = np.asarray(block_tables)
    lens = np.asarray(context_lens, np.int64)

    def per_sequence(pages, scale):
        pages = _f64(pages)
        if scale is not None:
            pages = pages * _f64(scale)[None, :, None, None]
        bs = pages.shape[2]
        return [
            pages[tables[i, np.arange(n) // bs], :, np.arange(n) % bs] for i, n in enumerate(lens)
        ]

    return attention(
        q,
        per_sequence(k_pages, k_scale),
        per_sequence(v_pages, v_scale),
        lens,
        cu_seqlens_q,
        **opts,
    )


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def moe_topk(
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
    """Router: ``(weights f64[T, k], ids i64[T, k])``, experts by decreasing score (ties: the
    lower id first). Scores are ``softmax`` or ``sigmoid`` of the logits; the choice adds
    ``correction_bias`` but the weights do not; grouped routing keeps the ``topk_group`` groups
    with the largest sum of their two best scores."""
    logits = _f64(logits)
    scores = _softmax(logits) if scoring == "softmax" else 1.0 / (1.0 + np.exp(-logits))
    select = scores + (0.0 if correction_bias is None else _f64(correction_bias))
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


def activation_fn(x, activation):
    """``silu``, ``gelu`` (erf) or ``gelu_tanh`` of a float64 array."""
    if activation == "silu":
        return x / (1.0 + np.exp(-x))
    if activation == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"unknown activation {activation!r}")


def fused_moe(
    x,
    w_gate_up,
    w_down,
    weights,
    ids,
    activation="silu",
    *,
    h_dtype=None,
    b_gate_up=None,
    b_down=None,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
    quantize=None,
):
    """``y[t] = sum_j weights[t, j] * (glu(x[t] @ Wgu[e] + bgu[e]) @ Wd[e] + bd[e])`` with
    ``e = ids[t, j]``; ``w_gate_up[e] = [Wg | Wu]`` (``[hidden, 2 * inter]``), the gate ``g`` and
    up ``u`` halves; ``glu = act(g) * u``, or for ``swigluoai``
    ``(clip(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`` with ``g' = min(g, limit)``.
    Absent biases are zero. Ids outside ``[0, E)`` (experts of other devices) contribute zero.
    With ``h_dtype`` the intermediate is rounded to that dtype, as a kernel that passes it
    through memory in ``x.dtype`` does. ``quantize`` (float64 -> float64, e.g. float8 token
    groups, ``oracle_fp8``) is applied to each GEMM's input: ``x``, then ``h``."""
    x, wgu, wd = _f64(x), _f64(w_gate_up), _f64(w_down)
    weights, ids = _f64(weights), np.asarray(ids)
    num_experts, inter = wd.shape[0], wd.shape[1]
    bgu = np.zeros((num_experts, 2 * inter)) if b_gate_up is None else _f64(b_gate_up)
    bd = np.zeros((num_experts, wd.shape[2])) if b_down is None else _f64(b_down)
    quantize = quantize or (lambda v: v)
    xq, out = quantize(x), np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < num_experts:
                continue
            gu = xq[t] @ wgu[e] + bgu[e]
            g, u = gu[:inter], gu[inter:]
            if activation == "swigluoai":
                g = np.minimum(g, swiglu_limit)
                u = np.clip(u, -swiglu_limit, swiglu_limit)
                h = (u + 1.0) * g / (1.0 + np.exp(-swiglu_alpha * g))
            else:
                h = activation_fn(g, activation) * u
            if h_dtype is not None:
                h = h.astype(np.float32).astype(jnp.dtype(h_dtype)).astype(np.float64)
            out[t] += weights[t, j] * (quantize(h) @ wd[e] + bd[e])
    return out


def stored(x, dtype, scale=None) -> np.ndarray:
    """What a cache of ``dtype`` stores for values ``x`` ``[..., Hkv, D]``, in that dtype.

    A rounding to ``dtype`` (float32 first, as the kernels compute); float8_e4m3fn stores
    ``saturate(x / scale[h])`` (the division in float32) and needs the per-KV-head ``scale``.
    """
    x = np.asarray(x).astype(np.float32)
    dtype = jnp.dtype(dtype)
    if dtype == FP8:
        s = np.asarray(scale, np.float32)[:, None]
        return np.clip(x / s, -FP8_MAX, FP8_MAX).astype(FP8)
    return x.astype(dtype)


def dequantized(x, dtype, scale=None) -> np.ndarray:
    """float64 values a cache of ``dtype`` holds after storing ``x`` (float8: times the
    per-KV-head scale)."""
    values = stored(x, dtype, scale).astype(np.float64)
    if jnp.dtype(dtype) == FP8:
        values = values * np.asarray(scale, np.float32).astype(np.float64)[:, None]
    return values


def write_kv(cache, k, v, slot_mapping):
    """The pages ``(k, v)`` (NumPy, in the cache's dtype) after ``write_kv(cache, k, v,
    slot_mapping)``: token ``i`` lands in block ``slot // BS`` at offset ``slot % BS``; slots
    ``< 0`` write nothing and every other byte is unchanged."""
    slots = np.asarray(slot_mapping, np.int64)
    written = slots >= 0
    block, offset = slots[written] // cache.block_size, slots[written] % cache.block_size
    pages = []
    for old, x, scale in ((cache.k, k, cache.k_scale), (cache.v, v, cache.v_scale)):
        new = np.array(old)
        new[block, :, offset] = stored(np.asarray(x)[written], cache.dtype, scale)
        pages.append(new)
    return tuple(pages)


def paged_mla_attention(
    q_nope,
    q_pe,
    kv_pages,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    scale,
    softcap=None,
    kv_scale=None,
    return_lse=False,
):
    """Multi-head latent attention (absorbed form) over a paged latent cache, in float64.

    ``q_nope`` ``[T, H, R]``, ``q_pe`` ``[T, H, P]``; ``kv_pages`` ``[NB, BS, R + P]`` as stored
    (float8: times the scalar ``kv_scale``), token ``t`` of sequence ``i`` in block
    ``block_tables[i, t // BS]`` at offset ``t % BS``. One KV head: ``logit = scale *
    (q_nope . c_kv + q_pe . k_pe)`` (then the softcap), value ``c_kv = row[:R]``; positions,
    visibility, zero rows and ``lse`` exactly as :func:`attention`. Returns ``[T, H, R]``
    (``(out, lse)`` with ``return_lse``)."""
    q_nope, q_pe = _f64(q_nope), _f64(q_pe)
    rank = q_nope.shape[-1]
    pages = _f64(kv_pages)
    if kv_scale is not None:
        pages = pages * float(np.asarray(kv_scale, np.float64).reshape(()))
    tables = np.asarray(block_tables)
    lens = np.asarray(context_lens, np.int64)
    bs = pages.shape[1]
    keys = [pages[tables[i, np.arange(n) // bs], np.arange(n) % bs][:, None] for i, n in
            enumerate(lens)]  # fmt: skip
    # Values: the latent part, zero-padded to the key width (attention wants one head dim).
    values = [np.concatenate([k[..., :rank], np.zeros_like(k[..., rank:])], -1) for k in keys]
    result = attention(
        np.concatenate([q_nope, q_pe], -1),
        keys,
        values,
        lens,
        cu_seqlens_q,
        scale=scale,
        softcap=softcap,
        return_lse=return_lse,
    )
    if return_lse:
        return result[0][..., :rank], result[1]
    return result[..., :rank]
