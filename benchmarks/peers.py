"""The peers: other implementations of the same work, timed on the same data in the same run.

Each ``*_row`` function fills and records one row (never raises: a peer that fails is recorded
with its error). GPU-only peers are recorded as ``skipped`` elsewhere; ``--interpret-peers``
runs the Pallas Triton peers under the Pallas interpreter (a CPU test of the wiring).

- decode: :func:`naive_paged_decode` (``xla_gather_softmax``), :func:`pallas_paged_attention_row`
  (``jax.experimental.pallas.ops.gpu.paged_attention``), :func:`dpa_row` (``cudnn``,
  ``xla_dpa``), :func:`torch_sdpa_row`;
- prefill: :func:`dpa_row`, :func:`triton_mha_row`, :func:`mosaic_fa3_row`,
  :func:`torch_sdpa_row`;
- MoE GEMMs: :func:`mgpu_ragged_dot_row` (``lax.ragged_dot`` is timed by the group itself).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.harness import Ctx, fail, run_row, skip, tune_and_run


def naive_paged_decode(q, k_pages, v_pages, block_tables, context_lens, *, scale):
    """What a JAX user writes by hand: gather every page, masked softmax."""
    s, h, d = q.shape
    _, hkv, bs, _ = k_pages.shape
    mb = block_tables.shape[1]
    k = k_pages[block_tables].transpose(0, 2, 1, 3, 4).reshape(s, hkv, mb * bs, d)
    v = v_pages[block_tables].transpose(0, 2, 1, 3, 4).reshape(s, hkv, mb * bs, d)
    mask = (jnp.arange(mb * bs)[None, :] < context_lens[:, None])[:, None, None, :]
    qg = q.reshape(s, hkv, h // hkv, d)
    logits = jnp.einsum("skgd,sktd->skgt", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    p = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    v = jnp.where(mask[:, :, 0, :, None], v, 0)
    out = jnp.einsum("skgt,sktd->skgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(s, h, d).astype(q.dtype)


def pallas_paged_attention_row(ctx: Ctx, row, sets, *, scale, check) -> dict:
    """JAX Pallas ``paged_attention`` on ``sets`` of ``(q, Paged)``: pages transposed to
    ``[Hkv, NB, BS, D]``, q pre-scaled; tuned over k_splits x pages_per_compute_block."""
    if not (ctx.on_gpu or ctx.args.interpret_peers):
        return skip(ctx, row, "needs a CUDA GPU (Triton)")
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as pa

        psets = [
            (
                (q * scale).astype(q.dtype),
                p.cache.k.transpose(1, 0, 2, 3),
                p.cache.v.transpose(1, 0, 2, 3),
                p.block_tables,
                p.context_lens,
            )
            for q, p in sets
        ]
        pages = sets[0][1].bt_np.shape[1]
        ks_opts = (1, 2, 4) if ctx.args.quick else (4, 8, 16, 32)
        ppcb_opts = (1, 2) if ctx.args.quick else (4, 8, 16)
        cands = []
        for ks in ks_opts:
            for ppcb in ppcb_opts:
                if pages % ks or (pages // ks) % min(ppcb, pages // ks):
                    continue
                cands.append(
                    (
                        {"k_splits": ks, "pages_per_compute_block": ppcb},
                        functools.partial(
                            pa.paged_attention,
                            k_splits=ks,
                            pages_per_compute_block=ppcb,
                            interpret=ctx.args.interpret_peers,
                        ),
                    )
                )
        return tune_and_run(ctx, row, cands, psets, check=check, work_key="bytes")
    except Exception as e:
        return fail(ctx, row, e)


def dpa_row(ctx: Ctx, row, impl, csets, *, check, work_key, causal=False) -> dict:
    """``jax.nn.dot_product_attention`` (``cudnn`` or ``xla_dpa``) on contiguous
    ``[B, L, H|Hkv, D]`` sets."""
    if impl == "cudnn" and not ctx.on_gpu:
        return skip(ctx, row, "needs a CUDA GPU (cuDNN)")
    kw = {"is_causal": True} if causal else {}
    f = jax.jit(
        functools.partial(
            jax.nn.dot_product_attention, implementation=impl.replace("_dpa", ""), **kw
        )
    )
    return run_row(ctx, row, f, csets, check=check, work_key=work_key)


def triton_mha_row(ctx: Ctx, row, csets, *, scale, check) -> dict:
    """Pallas Triton flash attention (``ops.gpu.attention.mha``; no GQA: KV repeated to H heads
    outside the timing), causal, on contiguous ``[1, L, H|Hkv, D]`` sets."""
    if not (ctx.on_gpu or ctx.args.interpret_peers):
        return skip(ctx, row, "needs a CUDA GPU (Triton)")
    try:
        from jax.experimental.pallas.ops.gpu import attention as mha_mod

        group = csets[0][0].shape[2] // csets[0][1].shape[2]
        rsets = [
            (q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)) for q, k, v in csets
        ]
        interp = ctx.args.interpret_peers

        def f(q, k, v):  # positional: mha is a custom_vjp with nondiff_argnums
            return mha_mod.mha(q, k, v, None, scale, True, interpret=interp)

        return run_row(ctx, row, f, rsets, check=check, work_key="flops")
    except Exception as e:
        return fail(ctx, row, e)


def mosaic_fa3_row(ctx: Ctx, row, csets, *, scale, check) -> dict:
    """Pallas Mosaic GPU FA3 (``ops.gpu.attention_mgpu``), causal: no scale argument, so q is
    pre-scaled; its shared-memory buffers are float16 (hard-coded), so it runs on float16
    copies. Tuned over block_q x block_kv."""
    if not ctx.on_gpu:
        return skip(ctx, row, "needs a Hopper GPU (Mosaic GPU)")
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

        f16 = jnp.float16
        L = csets[0][0].shape[1]
        msets = [((q * scale).astype(f16), k.astype(f16), v.astype(f16)) for q, k, v in csets]
        cands = []
        for bq, bkv in ((64, 256), (64, 128), (64, 64), (128, 128)):
            if L % bkv or L % (2 * bq):  # two compute warpgroups of block_q rows each
                continue
            cfg = fa3.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=True)
            cands.append(
                (
                    {"block_q": bq, "block_kv": bkv, "max_concurrent_steps": 2},
                    jax.jit(lambda q, k, v, cfg=cfg: fa3.attention(q, k, v, cfg)),
                )
            )
        return tune_and_run(ctx, row, cands, msets, check=check, work_key="flops")
    except Exception as e:
        return fail(ctx, row, e)


def to_torch(torch, x):
    """A torch CUDA tensor holding a copy of the JAX array ``x`` (dlpack, then clone)."""
    return torch.from_dlpack(jnp.asarray(x)).clone()


def torch_np(t):
    return t.float().cpu().numpy()


def torch_sdpa_row(ctx: Ctx, row, jsets, *, causal, check, work_key) -> dict:
    """torch SDPA on ``[B, L, H, D]`` JAX inputs, converted to ``[B, H, L, D]`` torch tensors;
    with GQA both ``enable_gqa`` and KV repeated to H heads are tried."""
    torch = ctx.torch
    if torch is None:
        return skip(ctx, row, ctx.torch_missing())
    try:
        import torch.nn.functional as F

        tsets = [tuple(to_torch(torch, x.transpose(0, 2, 1, 3)) for x in s) for s in jsets]
        group = tsets[0][0].shape[1] // tsets[0][1].shape[1]

        def f(q, k, v, gqa=group > 1):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        cands = [({"enable_gqa": group > 1}, f)]
        if group > 1:  # SDPA's GQA may not reach the flash kernel: also try KV repeated
            rsets = [
                (q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
                for q, k, v in tsets
            ]
            cands.append(
                (
                    {"enable_gqa": False, "kv": "repeated to H heads"},
                    functools.partial(f, gqa=False),
                    rsets,
                )
            )
        r = tune_and_run(
            ctx, row, cands, tsets, sync=timing.torch_sync(torch), check=check, work_key=work_key
        )
        del tsets, cands
        torch.cuda.empty_cache()
        return r
    except Exception as e:
        return fail(ctx, row, e)


# ragged_dot_mgpu configurations: block_m, block_n, block_k, max_concurrent_steps, grid_block_n.
MGPU_RAGGED_DOT_CONFIGS = (
    (128, 128, 64, 4, 1),
    (128, 256, 64, 3, 1),
    (64, 128, 64, 4, 1),
    (128, 128, 64, 4, 4),
)


def mgpu_ragged_dot_row(ctx: Ctx, row, args, *, check, work_key, scale) -> dict:
    """Pallas Mosaic GPU ``ragged_dot_mgpu`` on ``args`` of ``(lhs, rhs, group_sizes)``, tuned
    over :data:`MGPU_RAGGED_DOT_CONFIGS`; float16 copies only if no bfloat16 configuration
    runs."""
    if not ctx.on_gpu:
        return skip(ctx, row, "needs a Hopper GPU (Mosaic GPU)")
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rdm

        n_out = args[0][1].shape[2]
        k_in = args[0][1].shape[1]
        cands = []
        for bm, bn, bk, steps, gbn in MGPU_RAGGED_DOT_CONFIGS:
            if n_out % (bn * gbn) or k_in % bk:
                continue
            cfg = {
                "block_m": bm,
                "block_n": bn,
                "block_k": bk,
                "max_concurrent_steps": steps,
                "grid_block_n": gbn,
            }
            fn = jax.jit(
                lambda lhs, rhs, g, cfg=cfg: rdm.ragged_dot(lhs, rhs, group_sizes=g, **cfg)
            )
            cands.append((cfg, fn))
        f16 = [(x.astype(jnp.float16), w.astype(jnp.float16), g) for x, w, g in args[:1]]
        fb = [(dict(c, dtype="float16"), fn, f16) for c, fn in cands]
        return tune_and_run(
            ctx, row, cands, args, check=check, work_key=work_key, scale=scale, fallback=fb
        )
    except Exception as e:
        return fail(ctx, row, e)
