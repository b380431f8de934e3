"""The ``moe`` group: ``fused_moe`` per backend through the public API, and its two grouped
GEMMs as peers (``lax.ragged_dot`` and Pallas Mosaic GPU ``ragged_dot_mgpu`` on expert-sorted
rows, the sort and gather outside the timing).

Weights are scaled by ``1/sqrt(fan_in)``; routing is ``moe_topk`` (softmax top-k) on random
logits, outside the timing. Prefill-shaped rows report TFLOP/s, decode-shaped rows TB/s of the
expert weights touched (distinct routed experts).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import peers, timing
from benchmarks import shapes as S
from benchmarks.harness import (
    NAMED_PEER,
    Ctx,
    api_kw,
    compare,
    err_line,
    jpa,
    new_row,
    reference_check,
    run_row,
)


def moe_inputs(key, num_tokens, num_experts, top_k, hidden, inter, dtype=jnp.bfloat16, **topk):
    """``(x, w_gate_up, w_down, topk_weights, topk_ids)``: random normal activations, weights
    scaled by ``1/sqrt(fan_in)``, routing by ``moe_topk`` (keyword arguments ``topk``) of random
    logits. Made on the device."""
    dt = jnp.dtype(dtype)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (num_tokens, hidden), jnp.float32).astype(dt)
    wgu = jax.random.normal(k2, (num_experts, hidden, 2 * inter), jnp.float32) / math.sqrt(hidden)
    wd = jax.random.normal(k3, (num_experts, inter, hidden), jnp.float32) / math.sqrt(inter)
    logits = jax.random.normal(k4, (num_tokens, num_experts), jnp.float32)
    w, ids = jpa().moe_topk(logits, top_k, **topk)
    return x, wgu.astype(dt), wd.astype(dt), w, ids


def shape_inputs(shape: S.MoEShape, key, **topk):
    """:func:`moe_inputs` of a named shape."""
    return moe_inputs(
        key,
        shape.num_tokens,
        shape.num_experts,
        shape.top_k,
        shape.hidden,
        shape.inter,
        shape.dtype,
        **topk,
    )


def bench_moe(ctx: Ctx, shape: S.MoEShape) -> None:
    api = jpa()
    dt = jnp.dtype(shape.dtype)
    T, E, K, Hd, I = shape.num_tokens, shape.num_experts, shape.top_k, shape.hidden, shape.inter
    wbytes_all = E * shape.expert_bytes
    nsets = timing.num_sets(wbytes_all + T * Hd * dt.itemsize)
    ctx.log(
        f"moe {shape.name}: {T} tokens, top-{K} of {E}, Hd {Hd}, I {I}, "
        f"{wbytes_all / 2**30:.3g} GiB of weights, {nsets} input set(s)"
    )
    sets = [shape_inputs(shape, jax.random.key(500 + i)) for i in range(nsets)]
    ids0 = np.asarray(sets[0][4])
    touched = int(np.unique(ids0[(ids0 >= 0) & (ids0 < E)]).size)
    work = {"flops": shape.flops, "bytes": shape.weight_bytes(touched), "experts_touched": touched}
    metric, key, sc = ("TB/s", "bytes", 1e12) if shape.decode else ("TFLOP/s", "flops", 1e12)

    fns = {
        b: jax.jit(functools.partial(api.fused_moe, activation=shape.activation, **api_kw(ctx, b)))
        for b in set(ctx.args.backends) | {"xla"}
    }
    ref = {}
    try:
        ref["out"] = np.asarray(jax.block_until_ready(fns["xla"](*sets[0])), np.float32)
    except Exception as e:
        ref["error"] = err_line(e)
        ctx.log(f"moe {shape.name}: xla reference failed: {ref['error']}")
    check = reference_check(ref, shape.dtype)

    for b in ctx.args.backends:
        config = dict(
            api_kw(ctx, b),
            activation=shape.activation,
            routing="moe_topk softmax, excluded from the timing",
        )
        row = new_row(
            "moe", shape, b, "ours", metric, peer=NAMED_PEER["moe"], work=work, config=config
        )
        run_row(ctx, row, fns[b], sets, check=None if b == "xla" else check, work_key=key, scale=sc)
    if ctx.args.no_peers:
        return

    # Peers: the two grouped GEMMs on expert-sorted rows (sorting/gather outside the timing).
    gsets = []
    for i, (x, _, _, _, ids) in enumerate(sets):
        flat = np.asarray(ids).reshape(-1)
        order = np.argsort(flat, kind="stable")
        gs = jnp.asarray(np.bincount(flat, minlength=E).astype(np.int32))
        xs = x[jnp.asarray(order // K)]
        a = jax.random.normal(jax.random.key(600 + i), (T * K, I), dt)
        gsets.append({"gate_up": (xs, sets[i][1], gs), "down": (a, sets[i][2], gs)})
    gemm_w = {"gate_up": touched * Hd * 2 * I * dt.itemsize, "down": touched * I * Hd * dt.itemsize}
    lax_fn = jax.jit(lambda lhs, rhs, g: lax.ragged_dot(lhs, rhs, g))
    for gemm in ("gate_up", "down"):
        gwork = {"flops": shape.gemm_flops[gemm], "bytes": gemm_w[gemm], "experts_touched": touched}
        args = [s[gemm] for s in gsets]
        gref = {}

        def keep(out, gref=gref):
            gref["out"] = np.asarray(out, np.float32)
            return {}

        impl = f"lax_ragged_dot:{gemm}"
        row = new_row("moe", shape, impl, "peer", metric, work=gwork, config={"gemm": gemm})
        run_row(ctx, row, lax_fn, args, check=keep, work_key=key, scale=sc)

        def gcheck(out, gref=gref):
            if "out" not in gref:
                return {"ok": None, "error": "no lax.ragged_dot output"}
            return dict(compare(out, gref["out"], shape.dtype), ref="lax.ragged_dot")

        row = new_row(
            "moe",
            shape,
            f"mgpu_ragged_dot:{gemm}",
            "peer",
            metric,
            work=gwork,
            peer=impl,
            config={"gemm": gemm},
        )
        peers.mgpu_ragged_dot_row(ctx, row, args, check=gcheck, work_key=key, scale=sc)
    del sets, gsets
