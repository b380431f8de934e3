# %% [markdown]
# # 04 · The ops inside a Flax NNX model under `jax.jit`
#
# A small decoder-only transformer, written with `flax.nnx`, that serves two prompts through
# the paged KV cache:
#
# - The layers are **stacked**: one set of parameters with a leading layer axis, created with
#   `nnx.vmap`. The forward pass runs `jax.lax.scan` over them, so the step compiles one layer,
#   not three.
# - The per-layer KV caches are stacked the same way. They are **one `KVCache` pytree** whose
#   arrays are `[layers, num_blocks, kv_heads, block_size, head_dim]`. `scan` slices it per
#   layer, hands each layer its own `KVCache`, and stacks the updated ones back.
# - The step is `jax.jit(..., donate_argnums=...)` with the cache donated, so XLA updates it in
#   place. No step copies the cache.
# - One prefill step (both prompts packed into one flat batch), then a few greedy decode
#   steps. Every step's logits are checked against a dense forward pass of the same model, which
#   uses no cache and plain causal attention.
#
# It needs `flax` (`pip install "flax>=0.12"`).

# %%
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_paged_attn as jpa

BACKEND = os.environ.get("JPA_BACKEND", "auto")  # "auto": kernels on a GPU, "xla" on a CPU
print(f"jax {jax.__version__} on {jax.default_backend()}; backend={BACKEND!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2  # GQA: 2 query heads per KV head
    head_dim: int = 64  # the GPU kernels take 64 and up
    ffn: int = 256
    block_size: int = 8
    num_blocks: int = 16
    max_blocks_per_seq: int = 4  # 32 tokens per sequence


cfg = Config()

# %% [markdown]
# ## The model
#
# `Block` is one pre-norm layer: attention with rotary embeddings, then a SwiGLU MLP. Its
# attention is `jpa.PagedAttention`, a frozen, hashable config. NNX keeps it as a static
# attribute. Calling it writes this step's `k, v` into the layer's cache through
# `meta.slot_mapping`, then attends. `Block.dense` is the same layer with dense causal
# attention instead: the reference.


# %%
def rope(x, positions):
    """Rotary embedding of x [tokens, heads, dim] at absolute positions [tokens]."""
    half = x.shape[-1] // 2
    angle = positions[:, None, None] * (10000.0 ** (-jnp.arange(half) / half))
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate(
        [x1 * jnp.cos(angle) - x2 * jnp.sin(angle), x1 * jnp.sin(angle) + x2 * jnp.cos(angle)],
        axis=-1,
    )


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        linear = dict(use_bias=False, rngs=rngs)
        self.cfg = cfg
        self.attn_norm = nnx.RMSNorm(cfg.hidden, rngs=rngs)
        self.wq = nnx.Linear(cfg.hidden, cfg.heads * cfg.head_dim, **linear)
        self.wk = nnx.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, **linear)
        self.wv = nnx.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, **linear)
        self.wo = nnx.Linear(cfg.heads * cfg.head_dim, cfg.hidden, **linear)
        self.mlp_norm = nnx.RMSNorm(cfg.hidden, rngs=rngs)
        self.w_gate_up = nnx.Linear(cfg.hidden, 2 * cfg.ffn, **linear)
        self.w_down = nnx.Linear(cfg.ffn, cfg.hidden, **linear)
        self.attn = jpa.PagedAttention(cfg.heads, cfg.head_dim, cfg.kv_heads, backend=BACKEND)

    def qkv(self, x, positions):
        c, h = self.cfg, self.attn_norm(x)
        q = rope(self.wq(h).reshape(-1, c.heads, c.head_dim), positions)
        k = rope(self.wk(h).reshape(-1, c.kv_heads, c.head_dim), positions)
        return q, k, self.wv(h).reshape(-1, c.kv_heads, c.head_dim)

    def finish(self, x, attn_out):
        x = x + self.wo(attn_out.reshape(x.shape[0], -1))
        gate, up = jnp.split(self.w_gate_up(self.mlp_norm(x)), 2, axis=-1)
        return x + self.w_down(nnx.silu(gate) * up)

    def __call__(self, x, positions, cache: jpa.KVCache, meta: jpa.AttentionMetadata):
        """Paged: x [tokens, hidden] is a flat batch of many sequences' rows."""
        q, k, v = self.qkv(x, positions)
        out, cache = self.attn(q, k, v, cache, meta)  # write k, v; then attend
        return self.finish(x, out), cache

    def dense(self, x):
        """Reference: x [length, hidden] is one whole sequence; plain causal attention."""
        positions = jnp.arange(x.shape[0])
        q, k, v = self.qkv(x, positions)
        group = self.cfg.heads // self.cfg.kv_heads
        k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
        logits = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(self.cfg.head_dim)
        causal = positions[None, :] <= positions[:, None]
        p = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
        return self.finish(x, jnp.einsum("hqk,khd->qhd", p, v))


class Decoder(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab, cfg.hidden, rngs=rngs)

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):  # one Block whose params are stacked
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.RMSNorm(cfg.hidden, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden, cfg.vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens, positions, caches: jpa.KVCache, meta: jpa.AttentionMetadata):
        """Logits [tokens, vocab] of a flat batch, and the updated stacked caches."""
        block_def, block_params = nnx.split(self.blocks)

        def layer(x, params_and_cache):  # scan slices params and cache per layer
            params, cache = params_and_cache
            x, cache = nnx.merge(block_def, params)(x, positions, cache, meta)
            return x, cache

        x, caches = jax.lax.scan(layer, self.embed(tokens), (block_params, caches))
        return self.head(self.norm(x)), caches

    def dense(self, tokens):
        """Reference logits [length, vocab] of one whole sequence: no cache, no scan."""
        block_def, block_params = nnx.split(self.blocks)
        x = self.embed(tokens)
        for i in range(cfg.layers):
            x = nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], block_params)).dense(x)
        return self.head(self.norm(x))


model = Decoder(cfg, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model)
print("stacked layers: blocks.wq.kernel", model.blocks.wq.kernel.shape, "= [layers, in, out]")
print("parameters:", sum(x.size for x in jax.tree.leaves(params)))

# %% [markdown]
# ## The stacked cache and the jitted, donating step
#
# `KVCache` is a registered pytree, so stacking the per-layer caches is a `tree.map` over
# them. The step takes the parameters and the cache as arguments (`nnx.split` /
# `nnx.merge`, the functional NNX style) and donates the cache: argument 1.

# %%
caches = jax.tree.map(
    lambda *layers: jnp.stack(layers),
    *[
        jpa.KVCache.init(
            cfg.num_blocks, cfg.block_size, cfg.kv_heads, cfg.head_dim, dtype=jnp.float32
        )
        for _ in range(cfg.layers)
    ],
)
print("stacked cache: k", caches.k.shape, "= [layers, num_blocks, kv_heads, block_size, head_dim]")

traces = []


def forward(params, caches, tokens, positions, meta):
    traces.append(tokens.shape)  # runs only when jax traces a new shape
    return nnx.merge(graphdef, params)(tokens, positions, caches, meta)


step = jax.jit(forward, donate_argnums=1)

# %% [markdown]
# ## Prefill, then decode
#
# Blocks are reserved up front here (example 01 shows them taken as sequences grow). The
# prefill packs both prompts into one flat batch of 13 + 7 rows: `cu_seqlens_q = [0, 13, 20]`
# and each row has its own position and slot. Each decode step has one row per sequence. Each
# step's logits are kept for the check at the end.

# %%
rng = np.random.default_rng(0)
prompts = [rng.integers(0, cfg.vocab, n).tolist() for n in (13, 7)]
NEW_TOKENS = 4
free_blocks = [int(b) for b in rng.permutation(cfg.num_blocks)]
block_tables = np.zeros((len(prompts), cfg.max_blocks_per_seq), np.int32)
for seq, prompt in enumerate(prompts):
    needed = -(-(len(prompt) + NEW_TOKENS) // cfg.block_size)  # 17 -> 3 blocks, 11 -> 2
    block_tables[seq, :needed] = [free_blocks.pop() for _ in range(needed)]


def slot(seq, pos):
    return int(block_tables[seq, pos // cfg.block_size]) * cfg.block_size + pos % cfg.block_size


def run_step(caches, rows, q_lens, context_lens):
    """rows: [(seq, position, token)] packed by sequence; returns logits and the caches."""
    seqs, positions, tokens = (np.array(col, np.int32) for col in zip(*rows))
    meta = jpa.AttentionMetadata(
        block_tables=jnp.asarray(block_tables),
        context_lens=jnp.array(context_lens, jnp.int32),  # including this step's rows
        cu_seqlens_q=jnp.array(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        slot_mapping=jnp.array([slot(s, p) for s, p in zip(seqs, positions)], jnp.int32),
    )
    old = caches
    logits, caches = step(params, caches, jnp.asarray(tokens), jnp.asarray(positions), meta)
    assert old.k.is_deleted(), "the cache was copied, not donated"
    return np.asarray(logits), caches


tokens = [list(p) for p in prompts]
paged_logits = [[], []]  # per sequence: logits of each position

rows = [(s, pos, t) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
logits, caches = run_step(caches, rows, [len(p) for p in prompts], [len(p) for p in prompts])
first = 0
for seq, prompt in enumerate(prompts):
    paged_logits[seq].extend(logits[first : first + len(prompt)])
    first += len(prompt)
print(f"prefill: {len(rows)} rows, cu_seqlens_q {[0, len(prompts[0]), len(rows)]}")

for i in range(NEW_TOKENS):
    for seq in range(len(prompts)):  # greedy: the last position's argmax
        tokens[seq].append(int(np.argmax(paged_logits[seq][-1])))
    rows = [(s, len(t) - 1, t[-1]) for s, t in enumerate(tokens)]
    logits, caches = run_step(caches, rows, [1, 1], [len(t) for t in tokens])
    for seq in range(len(prompts)):
        paged_logits[seq].append(logits[seq])
    print(
        f"decode step {i + 1}: context_lens {[len(t) for t in tokens]}, "
        f"new tokens {[t[-1] for t in tokens]}"
    )

assert len(traces) == 2, traces  # one compilation for prefill, one for decode
print("compiled shapes:", traces)

# %% [markdown]
# ## Check against the dense model
#
# The model is causal, so one dense pass over each sequence's final tokens gives the logits
# that every step should have produced at its positions: the prefill rows and each decode row.

# %%
TOLERANCE = 5e-3  # max |paged - dense| / max |dense|; float32 matmuls may run as TF32 on GPUs
dense = jax.jit(lambda params, tokens: nnx.merge(graphdef, params).dense(tokens))
for seq, seq_tokens in enumerate(tokens):
    expected = np.asarray(dense(params, jnp.asarray(seq_tokens)))
    got = np.stack(paged_logits[seq])
    assert got.shape == expected.shape, (got.shape, expected.shape)
    error = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
    assert error < TOLERANCE, f"seq {seq}: relative logit error {error:.1e}"
    print(
        f"seq {seq}: {len(prompts[seq])} prompt + {NEW_TOKENS} generated tokens; max relative "
        f"logit error vs dense {error:.1e}"
    )
