"""Every bad input raises at trace time, naming the argument; check_metadata finds the rest."""

from __future__ import annotations

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jax_paged_attn as jpa
from jax_paged_attn import backends
from jax_paged_attn.testing import FP8, build_case

_case = build_case(np.random.default_rng(0), [(1, 20), (4, 4)], num_heads=4, num_kv_heads=2)
Q, CACHE, META = _case.q, _case.cache, _case.meta
K = jnp.zeros((3, 2, 64))
SLOTS = jnp.array([0, 1, 2], jnp.int32)
X = jnp.ones((5, 32))
WGU = jnp.ones((4, 32, 48))
WD = jnp.ones((4, 24, 32))
W = jnp.ones((5, 2))
IDS = jnp.zeros((5, 2), jnp.int32)


def meta_with(**kw):
    fields = dict(
        block_tables=META.block_tables,
        context_lens=META.context_lens,
        cu_seqlens_q=META.cu_seqlens_q,
        slot_mapping=META.slot_mapping,
    )
    fields.update(kw)
    return jpa.AttentionMetadata(**fields)


def attn(**kw):
    args = dict(q=Q, cache=CACHE, meta=META)
    args.update(kw)
    return lambda: jpa.paged_attention(args.pop("q"), args.pop("cache"), args.pop("meta"), **args)


INVALID = {
    # argument named in the message: call
    "q/rank": ("q", attn(q=Q[0])),
    "q/dtype": ("q", attn(q=Q.astype(jnp.int32))),
    "q/head_dim": ("q", attn(q=Q[..., :32])),
    "q/heads": ("q", attn(q=jnp.ones((Q.shape[0], 3, 64)))),
    "cache/type": ("cache", attn(cache=(CACHE.k, CACHE.v))),
    "meta/type": ("meta", attn(meta=(1, 2, 3))),
    "meta.block_tables/dtype": (
        "meta.block_tables",
        attn(meta=meta_with(block_tables=META.block_tables.astype(jnp.float32))),
    ),
    "meta.block_tables/rank": (
        "meta.block_tables",
        attn(meta=meta_with(block_tables=META.block_tables[0])),
    ),
    "meta.context_lens/shape": (
        "meta.context_lens",
        attn(meta=meta_with(context_lens=jnp.ones((3,), jnp.int32))),
    ),
    "meta.cu_seqlens_q/shape": (
        "meta.cu_seqlens_q",
        attn(meta=meta_with(cu_seqlens_q=jnp.array([0, 1], jnp.int32))),
    ),
    "scale/negative": ("scale", attn(scale=-1.0)),
    "scale/type": ("scale", attn(scale="big")),
    "softcap/zero": ("softcap", attn(softcap=0.0)),
    "softcap/negative": ("softcap", attn(softcap=-3.0)),
    "sliding_window/zero": ("sliding_window", attn(sliding_window=0)),
    "sliding_window/fraction": ("sliding_window", attn(sliding_window=2.5)),
    "alibi_slopes/shape": ("alibi_slopes", attn(alibi_slopes=jnp.ones((3,)))),
    "alibi_slopes/dtype": ("alibi_slopes", attn(alibi_slopes=jnp.ones((4,), jnp.int32))),
    "sinks/shape": ("sinks", attn(sinks=jnp.ones((4, 1)))),
    "backend/name": ("backend", attn(backend="cuda")),
    "interpret/type": ("interpret", attn(interpret="yes")),
    "decode/block_tables": (
        "block_tables",
        lambda: jpa.paged_decode(Q[:2], CACHE, META.block_tables[:1], META.context_lens),
    ),
    "decode/context_lens": (
        "context_lens",
        lambda: jpa.paged_decode(Q[:2], CACHE, META.block_tables, META.context_lens[:1]),
    ),
    "write_kv/k": ("k", lambda: jpa.write_kv(CACHE, K[:, :1], K, SLOTS)),
    "write_kv/v": ("v", lambda: jpa.write_kv(CACHE, K, K[:2], SLOTS)),
    "write_kv/slot_mapping shape": ("slot_mapping", lambda: jpa.write_kv(CACHE, K, K, SLOTS[:2])),
    "write_kv/slot_mapping dtype": (
        "slot_mapping",
        lambda: jpa.write_kv(CACHE, K, K, SLOTS.astype(jnp.float32)),
    ),
    "init/dtype": ("dtype", lambda: jpa.KVCache.init(4, 16, 2, 64, jnp.int8)),
    "init/block_size": ("block_size", lambda: jpa.KVCache.init(4, 0, 2, 64)),
    "init/k_scale": ("k_scale", lambda: jpa.KVCache.init(4, 16, 2, 64, jnp.float16, k_scale=0.1)),
    "init/k_scale shape": (
        "k_scale",
        lambda: jpa.KVCache.init(4, 16, 2, 64, FP8, k_scale=jnp.ones(3)),
    ),
    "copy_blocks/dst": ("dst", lambda: jpa.copy_blocks(CACHE, SLOTS, SLOTS[:1])),
    "copy_blocks/src dtype": ("src", lambda: jpa.copy_blocks(CACHE, SLOTS * 1.0, SLOTS)),
    "scatter_blocks/k dtype": (
        "k",
        lambda: jpa.scatter_blocks(CACHE, SLOTS[:1], CACHE.k[:1].astype(jnp.float16), CACHE.v[:1]),
    ),
    "scatter_blocks/v shape": (
        "v",
        lambda: jpa.scatter_blocks(CACHE, SLOTS[:1], CACHE.k[:1], CACHE.v[:2]),
    ),
    "update_kv_scales/cache": ("cache", lambda: jpa.update_kv_scales(CACHE, K, K)),
    "topk/top_k": ("top_k", lambda: jpa.moe_topk(jnp.ones((3, 4)), 5)),
    "topk/scoring": ("scoring", lambda: jpa.moe_topk(jnp.ones((3, 4)), 2, scoring="relu")),
    "topk/router_logits": ("router_logits", lambda: jpa.moe_topk(jnp.ones((3,)), 2)),
    "topk/correction_bias": (
        "correction_bias",
        lambda: jpa.moe_topk(jnp.ones((3, 4)), 2, scoring="sigmoid", correction_bias=jnp.ones(5)),
    ),
    "topk/num_expert_group": (
        "num_expert_group",
        lambda: jpa.moe_topk(jnp.ones((3, 8)), 2, num_expert_group=3, topk_group=1),
    ),
    "topk/topk_group": (
        "topk_group",
        lambda: jpa.moe_topk(jnp.ones((3, 8)), 2, num_expert_group=2, topk_group=3),
    ),
    "topk/routed_scaling_factor": (
        "routed_scaling_factor",
        lambda: jpa.moe_topk(jnp.ones((3, 8)), 2, routed_scaling_factor=0),
    ),
    "moe/x": ("x", lambda: jpa.fused_moe(X[0], WGU, WD, W, IDS)),
    "moe/w_gate_up": ("w_gate_up", lambda: jpa.fused_moe(X, WGU[:, :16], WD, W, IDS)),
    "moe/w_gate_up dtype": (
        "w_gate_up",
        lambda: jpa.fused_moe(X, WGU.astype(jnp.bfloat16), WD, W, IDS),
    ),
    "moe/w_down": ("w_down", lambda: jpa.fused_moe(X, WGU, WD[:, :8], W, IDS)),
    "moe/ids": ("ids", lambda: jpa.fused_moe(X, WGU, WD, W, IDS[:3])),
    "moe/ids dtype": ("ids", lambda: jpa.fused_moe(X, WGU, WD, W, IDS * 1.0)),
    "moe/weights": ("weights", lambda: jpa.fused_moe(X, WGU, WD, W[:, :1], IDS)),
    "moe/activation": ("activation", lambda: jpa.fused_moe(X, WGU, WD, W, IDS, activation="relu")),
    "layer/num_heads": ("num_heads", lambda: jpa.PagedAttention(6, 64, num_kv_heads=4)),
    "layer/alibi_slopes": (
        "alibi_slopes",
        lambda: jpa.PagedAttention(4, 64, 2, alibi_slopes=(1.0, 2.0)),
    ),
    "layer/softcap": ("softcap", lambda: jpa.PagedAttention(4, 64, 2, softcap=-1.0)),
    "layer/slot_mapping": (
        "meta.slot_mapping",
        lambda: jpa.PagedAttention(4, 64, 2)(Q, K, K, CACHE, meta_with(slot_mapping=None)),
    ),
    "layer/q": ("q", lambda: jpa.PagedAttention(4, 64, 2)(Q[:, :2], K, K, CACHE, META)),
}


@pytest.mark.parametrize("which", list(INVALID))
def test_invalid_argument_named(which):
    name, call = INVALID[which]
    with pytest.raises(ValueError, match=r"^" + re.escape(name) + r"\b"):
        call()


def test_validation_happens_at_trace_time():
    # Shapes alone decide: the error comes while tracing, before anything runs.
    with pytest.raises(ValueError, match="^softcap"):
        jax.eval_shape(lambda q: jpa.paged_attention(q, CACHE, META, softcap=-1.0), Q)
    with pytest.raises(ValueError, match="^softcap must be a static"):
        jax.jit(lambda q, c: jpa.paged_attention(q, CACHE, META, softcap=c))(Q, 2.0)


def test_unbuilt_or_foreign_backend_raises_not_implemented(monkeypatch):
    # A build whose mosaic entry lacks attention kernels.
    mosaic = backends.TABLE["mosaic"]
    no_attention = {op: impl for op, impl in mosaic.ops.items() if op != "attention"}
    table = dict(backends.TABLE, mosaic=dataclasses.replace(mosaic, ops=no_attention))
    monkeypatch.setattr(backends, "TABLE", types.MappingProxyType(table))
    with pytest.raises(NotImplementedError, match=r"backends that implement attention: \('xla'"):
        jpa.paged_attention(Q, CACHE, META, backend="mosaic")
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="interpret=True"):
            jpa.paged_attention(Q, CACHE, META, backend="triton")


def _bad(meta=None, cache=CACHE, num_tokens=None):
    return lambda: jpa.check_metadata(cache, meta, num_tokens=num_tokens)


@pytest.mark.parametrize(
    "which,meta,pattern",
    [
        ("block id", meta_with(block_tables=META.block_tables.at[0, 0].set(999)), "block_tables"),
        (
            "negative block id",
            meta_with(block_tables=META.block_tables.at[1, 0].set(-1)),
            "block_tables",
        ),
        ("decreasing", meta_with(cu_seqlens_q=jnp.array([0, 3, 1], jnp.int32)), "non-decreasing"),
        ("first", meta_with(cu_seqlens_q=jnp.array([1, 3, 5], jnp.int32)), r"cu_seqlens_q\[0\]"),
        (
            "too long",
            meta_with(context_lens=jnp.array([20, 1000], jnp.int32)),
            "longer than a block-table row holds",
        ),
        ("past T", meta_with(cu_seqlens_q=jnp.array([0, 1, 9], jnp.int32)), r"cu_seqlens_q\[-1\]"),
        ("slot", meta_with(slot_mapping=META.slot_mapping.at[0].set(10**6)), "slot_mapping"),
    ],
)
def test_check_metadata_reports(which, meta, pattern):
    with pytest.raises(ValueError, match=pattern):
        jpa.check_metadata(CACHE, meta)


def test_check_metadata_passes_valid_and_is_jittable():
    jpa.check_metadata(CACHE, META)  # no error
    bad = meta_with(block_tables=META.block_tables.at[0, 0].set(999))

    @jax.jit
    def step(cache, meta):
        jpa.metadata_checks(cache, meta, num_tokens=Q.shape[0])
        return jpa.paged_attention(Q, cache, meta, backend="xla")

    err, _ = checkify.checkify(step)(CACHE, META)
    err.throw()
    err, _ = checkify.checkify(step)(CACHE, bad)
    with pytest.raises(checkify.JaxRuntimeError, match="block_tables"):
        err.throw()
