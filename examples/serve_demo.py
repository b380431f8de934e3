"""`make demo`: serve a small decoder-only MoE transformer through the paged KV cache.

A toy engine with the parts a real one has: a block manager that hands out cache blocks as
sequences grow, a scheduler that packs prefill chunks (smaller than the prompts) and decode
tokens into one flat batch per step, and a jitted model step whose shapes never change (so it
compiles once). A prompt arrives late and is prefilled while the others decode. Every step's
logits are checked against a dense, non-paged forward pass of the same weights.

Runs on the CPU by default (backend "xla"); on a GPU, backend "auto" picks the kernels.
    python -m examples.serve_demo [--backend auto|xla|triton|mosaic] [--steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_paged_attn as jpa
from jax_paged_attn import backends


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 512
    hidden: int = 256
    layers: int = 3
    moe_layer: int = 1  # this layer's MLP is a mixture of experts
    heads: int = 8
    kv_heads: int = 2  # GQA: 4 query heads per KV head
    head_dim: int = 64
    ffn: int = 512
    experts: int = 8
    top_k: int = 2
    expert_ffn: int = 256
    block_size: int = 16
    num_blocks: int = 64
    max_seqs: int = 4  # batch slots (static)
    max_blocks_per_seq: int = 8  # 128 tokens
    token_budget: int = 32  # rows per step (static): prefill chunks + decode tokens
    prefill_chunk: int = 12  # smaller than every prompt: prompts take several steps


def init_params(cfg: Config, key):
    def dense(key, *shape):
        return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-2])

    keys = iter(jax.random.split(key, 8 * cfg.layers + 4))
    layers = []
    for i in range(cfg.layers):
        layer = dict(
            wq=dense(next(keys), cfg.hidden, cfg.heads * cfg.head_dim),
            wk=dense(next(keys), cfg.hidden, cfg.kv_heads * cfg.head_dim),
            wv=dense(next(keys), cfg.hidden, cfg.kv_heads * cfg.head_dim),
            wo=dense(next(keys), cfg.heads * cfg.head_dim, cfg.hidden),
        )
        if i == cfg.moe_layer:
            layer["router"] = dense(next(keys), cfg.hidden, cfg.experts)
            layer["w_gate_up"] = dense(next(keys), cfg.experts, cfg.hidden, 2 * cfg.expert_ffn)
            layer["w_down"] = dense(next(keys), cfg.experts, cfg.expert_ffn, cfg.hidden)
        else:
            layer["w_gate_up"] = dense(next(keys), cfg.hidden, 2 * cfg.ffn)
            layer["w_down"] = dense(next(keys), cfg.ffn, cfg.hidden)
        layers.append(layer)
    return dict(
        embed=jax.random.normal(next(keys), (cfg.vocab, cfg.hidden)) * 0.5,
        layers=layers,
        head=dense(next(keys), cfg.hidden, cfg.vocab),
    )


def rms_norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def rope(x, pos):
    """Rotary embedding of x [T, heads, D] at absolute positions pos [T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half) / half))
    angle = pos[:, None, None].astype(jnp.float32) * freq
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate(
        [x1 * jnp.cos(angle) - x2 * jnp.sin(angle), x1 * jnp.sin(angle) + x2 * jnp.cos(angle)],
        axis=-1,
    )


def mlp(cfg, layer, i, x, *, moe_fn):
    if i == cfg.moe_layer:
        weights, ids = jpa.moe_topk(x @ layer["router"], cfg.top_k, renormalize=True)
        return moe_fn(x, layer["w_gate_up"], layer["w_down"], weights, ids)
    h = x @ layer["w_gate_up"]
    return (jax.nn.silu(h[:, : cfg.ffn]) * h[:, cfg.ffn :]) @ layer["w_down"]


def paged_step(cfg: Config, backend: str, params, caches, tokens, positions, meta):
    """One engine step over a flat batch of rows; returns logits [T, vocab] and the caches."""
    attn = jpa.PagedAttention(cfg.heads, cfg.head_dim, cfg.kv_heads, backend=backend)
    x = params["embed"][tokens]
    new_caches = []
    for i, (layer, cache) in enumerate(zip(params["layers"], caches)):
        h = rms_norm(x)
        q = rope((h @ layer["wq"]).reshape(-1, cfg.heads, cfg.head_dim), positions)
        k = rope((h @ layer["wk"]).reshape(-1, cfg.kv_heads, cfg.head_dim), positions)
        v = (h @ layer["wv"]).reshape(-1, cfg.kv_heads, cfg.head_dim)
        out, cache = attn(q, k, v, cache, meta)
        new_caches.append(cache)
        x = x + out.reshape(-1, cfg.heads * cfg.head_dim) @ layer["wo"]
        x = x + mlp(
            cfg, layer, i, rms_norm(x), moe_fn=lambda *a: jpa.fused_moe(*a, backend=backend)
        )
    return rms_norm(x) @ params["head"], new_caches


def dense_forward(cfg: Config, params, tokens, length):
    """The same model without a cache: causal attention over a whole (padded) sequence, and
    every expert run densely on every token (weighted by the routing). The check's oracle."""
    pos = jnp.arange(tokens.shape[0])
    x = params["embed"][tokens]
    causal = (pos[None, :] <= pos[:, None]) & (pos[None, :] < length)
    group = cfg.heads // cfg.kv_heads

    def dense_moe(x, w_gate_up, w_down, weights, ids):
        h = jnp.einsum("td,edf->tef", x, w_gate_up)
        y = jnp.einsum(
            "tef,efd->ted", jax.nn.silu(h[..., : cfg.expert_ffn]) * h[..., cfg.expert_ffn :], w_down
        )
        combine = jnp.sum(jax.nn.one_hot(ids, cfg.experts) * weights[..., None], axis=1)
        return jnp.einsum("te,ted->td", combine, y)

    for i, layer in enumerate(params["layers"]):
        h = rms_norm(x)
        q = rope((h @ layer["wq"]).reshape(-1, cfg.heads, cfg.head_dim), pos)
        k = rope((h @ layer["wk"]).reshape(-1, cfg.kv_heads, cfg.head_dim), pos)
        v = (h @ layer["wv"]).reshape(-1, cfg.kv_heads, cfg.head_dim)
        k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
        s = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(cfg.head_dim)
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        out = jnp.einsum("hqk,khd->qhd", p, v)
        x = x + out.reshape(-1, cfg.heads * cfg.head_dim) @ layer["wo"]
        x = x + mlp(cfg, layer, i, rms_norm(x), moe_fn=dense_moe)
    return rms_norm(x) @ params["head"]


class BlockManager:
    """Hands out cache blocks from a free list as sequences grow; frees them when done."""

    def __init__(self, cfg: Config, rng):
        self.cfg = cfg
        self.free = list(rng.permutation(cfg.num_blocks))  # any order works: tables map it
        self.tables = np.zeros((cfg.max_seqs, cfg.max_blocks_per_seq), np.int32)
        self.owned = [[] for _ in range(cfg.max_seqs)]

    def reserve(self, slot: int, num_tokens: int):
        needed = -(-num_tokens // self.cfg.block_size)
        if needed > self.cfg.max_blocks_per_seq:
            raise RuntimeError(f"sequence of {num_tokens} tokens exceeds max_blocks_per_seq")
        while len(self.owned[slot]) < needed:
            if not self.free:
                raise RuntimeError("out of KV-cache blocks")
            block = self.free.pop()
            self.tables[slot, len(self.owned[slot])] = block
            self.owned[slot].append(block)

    def slot_of(self, slot: int, pos: int) -> int:
        bs = self.cfg.block_size
        return int(self.tables[slot, pos // bs]) * bs + pos % bs

    def release(self, slot: int):
        self.free.extend(self.owned[slot])
        self.owned[slot] = []


@dataclasses.dataclass
class Sequence:
    slot: int
    tokens: list  # prompt, then generated tokens
    prompt_len: int
    computed: int = 0  # tokens whose KV is in the cache
    max_new: int = 8

    @property
    def done(self):
        return len(self.tokens) - self.prompt_len >= self.max_new


def schedule(cfg: Config, running: list[Sequence], blocks: BlockManager):
    """Packs this step's rows: one decode token per generating sequence, then prefill chunks."""
    rows, budget = [], cfg.token_budget
    decoding = [s for s in running if s.computed >= s.prompt_len]
    prefilling = [s for s in running if s.computed < s.prompt_len]
    for seq in decoding + prefilling:
        n = 1 if seq in decoding else min(cfg.prefill_chunk, seq.prompt_len - seq.computed, budget)
        if n <= 0 or budget < n:
            continue
        budget -= n
        rows.append((seq, n))
    tokens = np.zeros(cfg.token_budget, np.int32)
    positions = np.zeros(cfg.token_budget, np.int32)
    slots = np.full(cfg.token_budget, -1, np.int32)
    context_lens = np.zeros(cfg.max_seqs, np.int32)
    q_lens = np.zeros(cfg.max_seqs, np.int32)
    order = sorted(rows, key=lambda r: r[0].slot)  # rows grouped by batch slot
    row = 0
    for seq, n in order:
        start = seq.computed
        blocks.reserve(seq.slot, start + n)
        for j in range(n):
            tokens[row + j] = seq.tokens[start + j]
            positions[row + j] = start + j
            slots[row + j] = blocks.slot_of(seq.slot, start + j)
        context_lens[seq.slot] = start + n
        q_lens[seq.slot] = n
        row += n
    # cu_seqlens_q over batch slots in order; idle slots have 0 rows and context 0.
    starts = {}
    acc = 0
    for s in range(cfg.max_seqs):
        starts[s] = acc
        acc += q_lens[s]
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    meta = jpa.AttentionMetadata(
        jnp.asarray(blocks.tables), jnp.asarray(context_lens), jnp.asarray(cu), jnp.asarray(slots)
    )
    return order, starts, jnp.asarray(tokens), jnp.asarray(positions), meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        default=None,
        help="attention/MoE backend (default: xla on CPU, auto elsewhere)",
    )
    parser.add_argument("--max-new", type=int, default=8, help="tokens generated per prompt")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=2e-3,
        help="max |paged - dense| / max|dense| of the logits",
    )
    args = parser.parse_args(argv)
    backend = args.backend or ("xla" if jax.default_backend() == "cpu" else "auto")
    cfg = Config()
    rng = np.random.default_rng(0)
    params = init_params(cfg, jax.random.key(0))
    caches = [
        jpa.KVCache.init(cfg.num_blocks, cfg.block_size, cfg.kv_heads, cfg.head_dim, jnp.float32)
        for _ in range(cfg.layers)
    ]
    step = jax.jit(paged_step, static_argnums=(0, 1), donate_argnums=(3,))
    dense = jax.jit(dense_forward, static_argnums=0)
    resolved = backends.name_of(backends.implementation("attention", backend, interpret=False))
    print(
        f"jax {jax.__version__} on {jax.default_backend()}: attention backend {backend!r} "
        f"-> {resolved!r}; {cfg.layers} layers (layer {cfg.moe_layer} MoE, {cfg.experts} "
        f"experts top-{cfg.top_k}), {cfg.heads}/{cfg.kv_heads} heads, block {cfg.block_size}"
    )

    prompts = [rng.integers(0, cfg.vocab, n).tolist() for n in (37, 21, 50)]
    late_prompt = rng.integers(0, cfg.vocab, 29).tolist()
    running = [Sequence(i, p, len(p), max_new=args.max_new) for i, p in enumerate(prompts)]
    blocks = BlockManager(cfg, rng)
    finished, worst, rows_done, steps, busy = [], 0.0, 0, 0, 0.0
    while running:
        if steps == 4:  # a prompt arrives while the others are prefilling/decoding
            running.append(Sequence(3, late_prompt, len(late_prompt), max_new=args.max_new))
            print(f"step {steps}: late prompt of {len(late_prompt)} tokens arrives")
        order, starts, tokens, positions, meta = schedule(cfg, running, blocks)
        t0 = time.perf_counter()
        logits, caches = step(cfg, backend, params, caches, tokens, positions, meta)
        logits = np.asarray(logits)
        if steps > 0:  # the first step includes compilation
            busy += time.perf_counter() - t0
            rows_done += sum(n for _, n in order)
        kinds = []
        for seq, n in order:
            first = starts[seq.slot]
            seq.computed += n
            # the check: these rows' logits against the dense model on the whole sequence
            padded = np.zeros(cfg.max_blocks_per_seq * cfg.block_size, np.int32)
            padded[: seq.computed] = seq.tokens[: seq.computed]
            ref = np.asarray(dense(cfg, params, jnp.asarray(padded), seq.computed))
            ref = ref[seq.computed - n : seq.computed]
            got = logits[first : first + n]
            worst = max(worst, float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))
            kinds.append(
                f"{'decode' if seq.computed > seq.prompt_len else 'prefill'}[{seq.slot}]x{n}"
            )
            if seq.computed >= seq.prompt_len:  # greedy: the last row's argmax
                seq.tokens.append(int(np.argmax(got[-1])))
        print(f"step {steps:2d}: {' '.join(kinds)}")
        for seq in [s for s in running if s.done]:
            running.remove(seq)
            blocks.release(seq.slot)
            finished.append(seq)
        steps += 1
    ok = worst <= args.tolerance
    for seq in sorted(finished, key=lambda s: s.slot):
        print(
            f"seq {seq.slot}: prompt {seq.prompt_len} tokens -> generated "
            f"{seq.tokens[seq.prompt_len :]}"
        )
    print(
        f"{steps} steps, {rows_done / busy:.0f} tokens/s (after the first step's compile), "
        f"backend {resolved!r}"
    )
    print(
        f"check against the dense model: max relative logit error {worst:.2e} "
        f"(tolerance {args.tolerance:.0e}) -> {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
