# %% [markdown]
# # 02 · Chunked prefill of a long prompt
#
# A serving engine rarely prefills a long prompt in one step. It cuts the prompt into
# **chunks** that fit the step's token budget (and share the step with other sequences' decode
# tokens). Each chunk writes its K/V into the paged cache, then attends over everything cached
# so far: the earlier chunks, read back through the block table, and itself, causally.
#
# In `paged_attention`, a chunk of `n` query rows of a sequence whose context is now `L` tokens
# is the **tail** of that context: row `j` sits at position `p = L - n + j`. It sees keys
# `t <= p`, and with `sliding_window=W` only the last `W` of them (`t > p - W`).
#
# This example prefills a 100-token prompt in chunks of 32, with a causal mask and with a
# sliding window. It checks the outputs against dense attention over the whole prompt, and it
# draws one chunk's attention weights against its context, measured from the op itself.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jax_paged_attn as jpa

BACKEND = os.environ.get("JPA_BACKEND", "auto")  # "auto": kernels on a GPU, "xla" on a CPU
print(f"jax {jax.__version__} on {jax.default_backend()}; backend={BACKEND!r}")

# %% [markdown]
# ## The prompt, its blocks, its chunks
#
# The prompt's K/V (what the model's projections would give) are random here. 100 tokens take
# 7 blocks of 16; the last block holds 4. The blocks are arbitrary physical ids.

# %%
PROMPT_LEN, CHUNK, BLOCK_SIZE = 100, 32, 16
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 1, 64  # MQA: all 4 query heads share one KV head
WINDOW = 24  # the sliding window of the second run

rng = np.random.default_rng(0)
q = rng.standard_normal((PROMPT_LEN, NUM_HEADS, HEAD_DIM)).astype(np.float32)
k = rng.standard_normal((PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
v = rng.standard_normal((PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)

num_prompt_blocks = -(-PROMPT_LEN // BLOCK_SIZE)  # 7
num_blocks = num_prompt_blocks + 3  # a few spare blocks
block_tables = rng.permutation(num_blocks)[None, :num_prompt_blocks].astype(np.int32)  # [1, 7]
positions = np.arange(PROMPT_LEN)
slots = block_tables[0, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
chunks = [(start, min(CHUNK, PROMPT_LEN - start)) for start in range(0, PROMPT_LEN, CHUNK)]
print("block table:", block_tables[0].tolist())
print("chunks (first position, rows):", chunks)

# %% [markdown]
# ## One prefill step per chunk
#
# The step has a fixed shape of `CHUNK` query rows, so it compiles once. The last chunk has
# only 4 real rows: `cu_seqlens_q = [0, 4]` says so, and the 28 rows past it are **padding**.
# Their slots are -1, so they write nothing, and their outputs come out as zeros.
#
# `context_lens` counts the chunk's own tokens (`start + n`). The chunk is written before it
# is read, so it sees itself.


# %%
def prefill_step(cache, q, k, v, meta, window):
    cache = jpa.write_kv(cache, k, v, meta.slot_mapping)
    out = jpa.paged_attention(q, cache, meta, sliding_window=window, backend=BACKEND)
    return out, cache


prefill_step = jax.jit(prefill_step, donate_argnums=0, static_argnames="window")


def chunk_inputs(start, n, values=v):
    """This chunk's q, k, v and metadata, padded to CHUNK rows."""
    rows = slice(start, start + n)
    pad = CHUNK - n

    def padded(x):
        return jnp.asarray(np.pad(x[rows], ((0, pad), (0, 0), (0, 0))))

    meta = jpa.AttentionMetadata(
        block_tables=jnp.asarray(block_tables),
        context_lens=jnp.array([start + n], jnp.int32),  # tokens cached after this step
        cu_seqlens_q=jnp.array([0, n], jnp.int32),  # rows 0..n-1 are this sequence
        slot_mapping=jnp.asarray(np.pad(slots[rows], (0, pad), constant_values=-1)),
    )
    return padded(q), padded(k), padded(values), meta


def prefill(window=None, values=v):
    """Runs the whole prompt chunk by chunk; returns the outputs [PROMPT_LEN, heads, dim]."""
    cache = jpa.KVCache.init(
        num_blocks, BLOCK_SIZE, NUM_KV_HEADS, values.shape[-1], dtype=jnp.float32
    )
    outs = []
    for start, n in chunks:
        q_c, k_c, v_c, meta = chunk_inputs(start, n, values)
        out, cache = prefill_step(cache, q_c, k_c, v_c, meta, window)
        out = np.asarray(out)
        assert not out[n:].any(), "padding rows must come out as zeros"
        outs.append(out[:n])
    return np.concatenate(outs)


# %% [markdown]
# ## Check against dense attention over the whole prompt
#
# The reference attends over the whole prompt at once, in float64, with the mask written out.
# No cache and no chunks are involved.


# %%
def visible(query_pos, key_pos, window=None):
    """The mask: query at position p sees key t if t <= p (and t > p - window)."""
    p, t = query_pos[:, None], key_pos[None, :]
    return (t <= p) & (t > p - window) if window else t <= p


def dense_attention(q, k, v, window=None):
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1).astype(np.float64), np.repeat(v, group, axis=1)
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(visible(np.arange(len(q)), np.arange(len(k)), window), logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", p / p.sum(axis=-1, keepdims=True), v)


for window in (None, WINDOW):
    got, expected = prefill(window), dense_attention(q, k, v, window)
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)
    print(
        f"sliding_window={window}: {len(chunks)} chunks, max |chunked - dense| "
        f"{np.max(np.abs(got - expected)):.1e}"
    )

# %% [markdown]
# ## What one chunk sees
#
# To see the mask that the op *actually* applies, we read the attention weights out of the op
# itself. The prefill is run again with one-hot values, `v[t] = e_t` (one column per key
# position; `head_dim = 64` covers the first 64 positions). Then output row `j`, column `t`
# is exactly the weight that row `j` gives key `t`. Zero means masked.
#
# The picture shows chunk 1 (positions 32–63, context 64), head 0. Left of the dashed line
# are the keys of chunk 0, read back from the cache; right of it is the chunk itself.

# %%
CHUNK_INDEX = 1
start, n = chunks[CHUNK_INDEX]
context = start + n  # 64 keys
assert context <= HEAD_DIM
one_hot = np.zeros((PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM), np.float32)
one_hot[np.arange(context), :, np.arange(context)] = 1.0  # v[t] = e_t (later keys unused)

query_pos, key_pos = np.arange(start, context), np.arange(context)
fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
for ax, window in zip(axes, (None, WINDOW)):
    weights = prefill(window, values=one_hot)[start:context, 0, :context]  # [rows, keys]
    mask = visible(query_pos, key_pos, window)
    assert np.array_equal(weights > 0, mask), "the op's mask differs from the formula"
    expected = dense_attention(q[:context], k[:context], one_hot[:context], window)
    np.testing.assert_allclose(weights, expected[start:, 0], atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-3)  # each row is a softmax

    image = ax.imshow(
        np.ma.masked_equal(weights, 0.0),
        cmap="viridis",
        aspect="auto",
        extent=(-0.5, context - 0.5, context - 0.5, start - 0.5),
    )
    ax.set_facecolor("0.85")  # masked keys: grey
    ax.axvline(start - 0.5, color="white", linestyle="--")
    ax.set(
        title=f"chunk {CHUNK_INDEX}, " + (f"sliding window {window}" if window else "causal"),
        xlabel="key position t (grey: masked)",
    )
    print(
        f"{'window ' + str(window) if window else 'causal'}: row p=40 sees keys "
        f"{key_pos[mask[40 - start]].min()}..{key_pos[mask[40 - start]].max()}"
    )
axes[0].set_ylabel("query position p = L - n + j")
fig.colorbar(image, ax=axes, label="attention weight (head 0)")
plt.show()
