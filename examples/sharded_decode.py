"""Scale-out recipe: tensor-parallel paged attention and an expert-parallel MoE layer.

One mesh axis ("model") of N devices serves both parallelisms of a decoder block:
- attention: query heads and KV heads split over the axis; the paged cache is sharded on its
  KV-head axis (``[NB, Hkv, BS, D]`` -> ``P(None, "model")``). With fewer KV heads than devices
  (here 2 KV heads on 8 devices) ``shard_cache`` stores each KV head on ``N / Hkv`` devices,
  so every device holds the one KV head its query heads read;
- MoE: each device holds ``E / N`` experts (``w_gate_up``, ``w_down`` -> ``P("model")``); the
  tokens are replicated, each device adds its experts' share and a ``psum`` combines;
- metadata (block tables, lengths, ``cu_seqlens_q``, slots) is replicated; it is tiny.

The script prefills a batch of prompts, then decodes a few steps, through both the sharded
functions and the plain single-device API, checks that they agree every step, and prints the
median step time of each. On a CPU it makes 8 host devices itself:

    python -m examples.sharded_decode [--devices 8] [--backend xla] [--steps 8]

On a machine with GPUs it uses them (``--devices`` of them; e.g. 2 on nvidia-h200-x2).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax

# 8 host devices when JAX runs on the CPU (set before the CPU backend starts; a GPU machine
# keeps its GPUs as the default devices).
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_paged_attn as jpa  # noqa: E402
from jax_paged_attn import sharding as sh  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    heads: int = 8
    kv_heads: int = 2  # < 8 devices: each KV head is replicated on 4 of them
    head_dim: int = 64
    block_size: int = 16
    max_blocks: int = 8  # per sequence: up to 128 tokens
    seqs: int = 4
    hidden: int = 256
    experts: int = 8
    top_k: int = 2
    expert_ffn: int = 256


def make_weights(cfg: Config, key):
    ks = jax.random.split(key, 6)
    hd = cfg.heads * cfg.head_dim

    def w(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)

    return dict(
        wq=w(ks[0], (cfg.hidden, hd), cfg.hidden),
        wkv=w(ks[1], (cfg.hidden, 2 * cfg.kv_heads * cfg.head_dim), cfg.hidden),
        wo=w(ks[2], (hd, cfg.hidden), hd),
        router=w(ks[3], (cfg.hidden, cfg.experts), cfg.hidden),
        w_gate_up=w(ks[4], (cfg.experts, cfg.hidden, 2 * cfg.expert_ffn), cfg.hidden),
        w_down=w(ks[5], (cfg.experts, cfg.expert_ffn, cfg.hidden), cfg.expert_ffn),
    )


def block(cfg, attend, moe, weights, x, cache, meta):
    """One decoder block: attention (write this step's KV, then attend) and a MoE MLP.

    ``attend(q, k, v, cache, meta) -> (out, cache)`` and ``moe(x, wgu, wd, w, ids) -> y`` are
    either the single-device API or its sharded versions; everything else is plain jnp, which
    jit partitions around the shard_maps."""
    t = x.shape[0]
    q = (x @ weights["wq"]).reshape(t, cfg.heads, cfg.head_dim)
    k, v = jnp.split((x @ weights["wkv"]).reshape(t, 2 * cfg.kv_heads, cfg.head_dim), 2, axis=1)
    attn, cache = attend(q, k, v, cache, meta)
    h = x + attn.reshape(t, -1) @ weights["wo"]
    topk_w, ids = jpa.moe_topk(h @ weights["router"], cfg.top_k, renormalize=True)
    y = moe(h, weights["w_gate_up"], weights["w_down"], topk_w, ids)
    return h + y, attn, cache


def schedule(cfg: Config, rng):
    """Step metadata: a prefill of every prompt, then decode steps (host-side, like a
    scheduler; the arrays have the same shapes every decode step, so nothing recompiles)."""
    perm = rng.permutation(cfg.seqs * cfg.max_blocks).astype(np.int32)
    tables = perm.reshape(cfg.seqs, cfg.max_blocks)
    prompt = rng.integers(5, 3 * cfg.block_size, size=cfg.seqs)

    def meta_for(q_lens, lens):
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        pos = np.concatenate([np.arange(L - n, L) for n, L in zip(q_lens, lens)])
        seq = np.repeat(np.arange(cfg.seqs), q_lens)
        slots = tables[seq, pos // cfg.block_size] * cfg.block_size + pos % cfg.block_size
        return jpa.AttentionMetadata(
            jnp.asarray(tables),
            jnp.asarray(lens, jnp.int32),
            jnp.asarray(cu),
            jnp.asarray(slots, jnp.int32),
        )

    yield meta_for(prompt, prompt)
    lens = prompt.copy()
    while True:
        lens = lens + 1
        yield meta_for(np.ones(cfg.seqs, np.int64), lens)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=min(8, jax.device_count()))
    ap.add_argument("--backend", default="xla", help="xla | auto | triton | mosaic")
    ap.add_argument("--steps", type=int, default=8, help="decode steps (timed after 2 warm-up)")
    args = ap.parse_args(argv)
    interpret = args.backend not in ("xla", "auto") and jax.default_backend() == "cpu"
    cfg = Config()
    n = args.devices
    print(
        f"{n} x {jax.devices()[0].platform} devices, backend={args.backend}"
        f"{' (interpreted)' if interpret else ''}; heads {cfg.heads}/{cfg.kv_heads} KV, "
        f"{cfg.experts} experts"
    )

    # --- 1. the mesh and the shardings -------------------------------------------------------
    mesh = Mesh(np.array(jax.devices()[:n]), ("model",))
    layout = sh.kv_head_layout(cfg.heads, cfg.kv_heads, n)
    print(
        f"each device: {layout.local_heads} query heads, {layout.local_kv_heads} KV head(s) "
        f"(each KV head stored {layout.replicas}x), {cfg.experts // n} experts"
    )
    weights = make_weights(cfg, jax.random.key(0))
    experts = NamedSharding(mesh, P("model"))  # [E, ...] split on the expert axis
    sharded_weights = dict(
        weights,
        w_gate_up=jax.device_put(weights["w_gate_up"], experts),
        w_down=jax.device_put(weights["w_down"], experts),
    )

    cache = jpa.KVCache.init(
        cfg.seqs * cfg.max_blocks, cfg.block_size, cfg.kv_heads, cfg.head_dim, jnp.float32
    )
    # Its own buffers: both steps donate their cache, and on one device placing it is a no-op.
    sharded_cache = sh.shard_cache(jax.tree.map(jnp.copy, cache), mesh, "model", cfg.heads)

    # --- 2. the step functions: the same block, single-device and sharded --------------------
    layer = jpa.PagedAttention(cfg.heads, cfg.head_dim, cfg.kv_heads, backend=args.backend)
    kw = dict(backend=args.backend, interpret=interpret)

    def single_attend(q, k, v, cache, meta):
        return layer(q, k, v, cache, meta, interpret=interpret)

    def single_moe(*a):
        return jpa.fused_moe(*a, **kw)

    tp_attend = functools.partial(sh.shard_layer(mesh, "model", layer), interpret=interpret)
    ep_moe = sh.shard_fused_moe(mesh, "model", **kw)

    single_step = jax.jit(
        lambda w, x, c, m: block(cfg, single_attend, single_moe, w, x, c, m), donate_argnums=2
    )
    sharded_step = jax.jit(
        lambda w, x, c, m: block(cfg, tp_attend, ep_moe, w, x, c, m), donate_argnums=2
    )

    # --- 3. prefill, then decode; check every step against the single device -----------------
    rng = np.random.default_rng(0)
    times = {"single": [], "sharded": []}
    worst = 0.0
    for i, meta in zip(range(args.steps + 3), schedule(cfg, rng)):
        x = jax.random.normal(jax.random.key(i + 1), (meta.slot_mapping.shape[0], cfg.hidden))
        t0 = time.perf_counter()
        y1, attn1, cache = single_step(weights, x, cache, meta)
        y1.block_until_ready()
        t1 = time.perf_counter()
        yn, attnn, sharded_cache = sharded_step(sharded_weights, x, sharded_cache, meta)
        yn.block_until_ready()
        t2 = time.perf_counter()
        if i >= 3:  # prefill + 2 warm-up decode steps
            times["single"].append(t1 - t0)
            times["sharded"].append(t2 - t1)
        err = float(jnp.max(jnp.abs(yn - y1)) / (jnp.max(jnp.abs(y1)) + 1e-30))
        worst = max(worst, err)
        if not err < 1e-3 or not bool(jnp.allclose(attnn, attn1, rtol=1e-3, atol=1e-3)):
            raise SystemExit(
                f"step {i}: sharded result differs from the single device "
                f"(max rel. error {err:.3g})"
            )
    # Each KV head's replicas hold the tokens of the single-device cache (up to the rounding
    # of the k/v projection, which XLA may compile differently in the two programs).
    for j in range(layout.replicas):
        np.testing.assert_allclose(
            np.asarray(sharded_cache.k[:, j :: layout.replicas]),
            np.asarray(cache.k),
            rtol=1e-4,
            atol=1e-5,
        )
    print(f"attention out sharding: {attnn.sharding.spec}; cache: {sharded_cache.k.sharding.spec}")
    print(f"{args.steps} decode steps agree with the single device (max rel. error {worst:.2e})")
    for name, ts in times.items():
        print(f"  {name:8s} median step {statistics.median(ts) * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
