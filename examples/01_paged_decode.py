# %% [markdown]
# # 01 · Decode over a paged KV cache, step by step
#
# A paged KV cache keeps the keys and values of every sequence in fixed-size **blocks** of one
# shared pool, the way virtual memory keeps pages. A sequence owns a list of physical blocks, its
# row of the **block table**, and takes a new block only when its last one is full. So there is
# no per-sequence maximum-length buffer, and no copy when a sequence grows.
#
# This example:
# 1. allocates a cache and a free list of blocks;
# 2. writes three prompts' K/V with `write_kv` through a **slot mapping**
#    (`slot = physical_block * block_size + offset`);
# 3. runs `paged_decode` step after step as the sequences grow. A sequence takes a new block when
#    one fills, and one sequence finishes and frees its blocks, which the others then reuse;
# 4. draws the block table, and checks every step's output against plain dense attention over
#    each sequence's whole history.
#
# It runs on the CPU with the pure-JAX `xla` backend. On a GPU, `JPA_BACKEND=auto` (the
# default) picks the Pallas kernels.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

import jax_paged_attn as jpa

BACKEND = os.environ.get("JPA_BACKEND", "auto")  # "auto": kernels on a GPU, "xla" on a CPU
print(f"jax {jax.__version__} on {jax.default_backend()}; backend={BACKEND!r}")

# %% [markdown]
# ## A cache and a free list of blocks
#
# `KVCache.init` allocates the pool: `k` and `v` are `[num_blocks, kv_heads, block_size,
# head_dim]`. The block size here is 8 tokens, the smallest that the GPU kernels take, so the
# picture stays small; engines commonly use 16. The free list is shuffled on purpose: the block
# table maps logical blocks to any physical ones, so a sequence's blocks need not be contiguous.

# %%
BLOCK_SIZE = 8  # tokens per block
NUM_BLOCKS = 16  # the whole pool
NUM_KV_HEADS, NUM_HEADS, HEAD_DIM = 2, 4, 64  # GQA: query heads 0,1 read KV head 0; 2,3 head 1
NUM_SEQS, MAX_BLOCKS = 3, 4  # block-table shape: up to 4 blocks = 32 tokens per sequence

cache = jpa.KVCache.init(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=jnp.float32)
print("cache.k:", cache.k.shape, "= [num_blocks, kv_heads, block_size, head_dim]")

rng = np.random.default_rng(0)
free_blocks = [int(b) for b in rng.permutation(NUM_BLOCKS)]  # pop() takes from the end
block_tables = np.zeros((NUM_SEQS, MAX_BLOCKS), np.int32)  # entries past a context are unread
context_lens = np.zeros(NUM_SEQS, np.int32)  # tokens in the cache per sequence


def slot_of(seq: int, pos: int) -> int:
    """The cache slot of token `pos` of `seq`; takes a new block when `pos` starts one."""
    if pos % BLOCK_SIZE == 0:  # first token of a logical block
        block_tables[seq, pos // BLOCK_SIZE] = free_blocks.pop()
    return int(block_tables[seq, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE


def free_sequence(seq: int) -> None:
    """Returns a finished sequence's blocks to the free list."""
    used = -(-int(context_lens[seq]) // BLOCK_SIZE)  # ceil(len / block size)
    free_blocks.extend(int(b) for b in block_tables[seq, :used])
    context_lens[seq] = 0  # 0 marks an inactive sequence


# %% [markdown]
# ## Write the prompts through a slot mapping
#
# All three prompts go into one `write_kv` call: the rows of `k` and `v` are packed
# (`[tokens, kv_heads, head_dim]`), and `slot_mapping[i]` says where row `i` goes. For
# example, a prompt of 13 tokens takes 2 blocks, and the last block holds 5 of them.
# We keep a dense copy of every sequence's history in NumPy. It is the reference that each
# step is checked against.

# %%
PROMPT_LENS = [13, 6, 20]
history_k = [np.zeros((0, NUM_KV_HEADS, HEAD_DIM), np.float32) for _ in range(NUM_SEQS)]
history_v = [np.zeros((0, NUM_KV_HEADS, HEAD_DIM), np.float32) for _ in range(NUM_SEQS)]

slots, new_k, new_v = [], [], []
for seq, n in enumerate(PROMPT_LENS):
    k = rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    slots += [slot_of(seq, pos) for pos in range(n)]
    context_lens[seq] = n
    history_k[seq], history_v[seq] = k, v
    new_k.append(k)
    new_v.append(v)

slot_mapping = np.array(slots, np.int32)
cache = jpa.write_kv(
    cache,
    jnp.asarray(np.concatenate(new_k)),
    jnp.asarray(np.concatenate(new_v)),
    jnp.asarray(slot_mapping),
)
print("block_tables:\n", block_tables)
print("slot_mapping:", slot_mapping.tolist())
for seq, n in enumerate(PROMPT_LENS):
    last = slots[sum(PROMPT_LENS[:seq]) + n - 1]
    print(
        f"  seq {seq}: {n} tokens -> {-(-n // BLOCK_SIZE)} block(s); token {n - 1} is in slot "
        f"{last} = block {last // BLOCK_SIZE} * {BLOCK_SIZE} + offset {last % BLOCK_SIZE}"
    )


def read_back(cache, seq):
    """A sequence's keys and values, gathered through its block table: [len, kv_heads, dim]."""
    pos = np.arange(context_lens[seq])
    blocks, offsets = block_tables[seq, pos // BLOCK_SIZE], pos % BLOCK_SIZE
    return np.asarray(cache.k)[blocks, :, offsets], np.asarray(cache.v)[blocks, :, offsets]


for seq in range(NUM_SEQS):  # written exactly, bit for bit
    k, v = read_back(cache, seq)
    np.testing.assert_array_equal(k, history_k[seq])
    np.testing.assert_array_equal(v, history_v[seq])

# %% [markdown]
# ## The block table as a picture
#
# Rows are sequences and cells are logical blocks. Each cell is coloured and labelled by its
# physical block id. The filled part of a cell shows how many of its `block_size` slots hold
# tokens, so a partly filled last block is drawn partly filled.

# %%
COLOURS = plt.get_cmap("tab20")  # 20 distinct colours, indexed by physical block id


def draw_block_table(ax, tables, lens, title):
    """Draws `tables` [seqs, max_blocks] with each sequence's `lens` tokens; returns the
    physical block id of every drawn cell (-1 where a cell is unused), for checking."""
    drawn = np.full(tables.shape, -1)
    for seq in range(tables.shape[0]):
        for b in range(tables.shape[1]):
            ax.add_patch(Rectangle((b, seq), 1, 1, fill=False, edgecolor="0.7"))
            filled = min(BLOCK_SIZE, int(lens[seq]) - b * BLOCK_SIZE)
            if filled <= 0:
                continue
            block = int(tables[seq, b])
            drawn[seq, b] = block
            ax.add_patch(
                Rectangle(
                    (b, seq), filled / BLOCK_SIZE, 1, facecolor=COLOURS(block), edgecolor="none"
                )
            )
            ax.add_patch(Rectangle((b, seq), 1, 1, fill=False, edgecolor="black"))
            ax.text(
                b + 0.5,
                seq + 0.5,
                f"#{block}\n{filled}/{BLOCK_SIZE}",
                ha="center",
                va="center",
                fontsize=8,
            )
        if lens[seq] == 0:
            ax.text(
                tables.shape[1] / 2,
                seq + 0.5,
                "(inactive: blocks freed)",
                ha="center",
                va="center",
                fontsize=8,
                color="0.4",
            )
    ax.set(
        xlim=(0, tables.shape[1]),
        ylim=(tables.shape[0], 0),
        title=title,
        xlabel="logical block",
        xticks=np.arange(tables.shape[1]) + 0.5,
        xticklabels=range(tables.shape[1]),
        yticks=np.arange(tables.shape[0]) + 0.5,
        yticklabels=[f"seq {s}\n{n} tok" for s, n in enumerate(lens)],
    )
    ax.set_aspect("equal")
    return drawn


def snapshot(title):
    return title, block_tables.copy(), context_lens.copy(), list(free_blocks)


snapshots = [snapshot("after the prompts")]

# %% [markdown]
# ## Decode, step by step
#
# Each step appends one token to every active sequence. Its K/V are written first (the slot
# comes from `slot_of`, which takes a new block when the last one is full), and then its query
# attends over the whole context, *including itself*. `context_lens` counts this step's
# token too. A finished sequence keeps its row. Its context length becomes 0 and its slot -1
# (padding), so its output row comes out as zeros.
#
# The step is jitted, with the cache **donated**, so it is updated in place. Block tables and
# lengths are arrays, not static arguments, so new values never force a recompile: the step
# compiles once.

# %%
traces = []


def decode_step(cache, q, k, v, slot_mapping, block_tables, context_lens):
    traces.append(1)  # runs only while jax traces
    cache = jpa.write_kv(cache, k, v, slot_mapping)  # write this step's token first ...
    out = jpa.paged_decode(q, cache, block_tables, context_lens, backend=BACKEND)  # ... attend
    return out, cache


decode_step = jax.jit(decode_step, donate_argnums=0)


def dense_attention(q, k, v):
    """Reference: one query `q` [heads, dim] over a whole history `k, v` [len, kv_heads, dim]."""
    group = q.shape[0] // k.shape[1]
    k, v = np.repeat(k, group, axis=1).astype(np.float64), np.repeat(v, group, axis=1)
    logits = np.einsum("hd,lhd->hl", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.einsum("hl,lhd->hd", p / p.sum(axis=-1, keepdims=True), v)


MAX_NEW = [10, 3, 7]  # tokens each sequence generates; seq 1 finishes after 3 steps
NUM_STEPS = max(MAX_NEW)
generated = [0] * NUM_SEQS
for step in range(1, NUM_STEPS + 1):
    q = rng.standard_normal((NUM_SEQS, NUM_HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((NUM_SEQS, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((NUM_SEQS, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    slot_mapping = np.full(NUM_SEQS, -1, np.int32)  # -1: padding, nothing is written
    for seq in range(NUM_SEQS):
        if generated[seq] == MAX_NEW[seq]:
            continue  # finished: stays inactive
        slot_mapping[seq] = slot_of(seq, int(context_lens[seq]))
        context_lens[seq] += 1
        generated[seq] += 1
        history_k[seq] = np.concatenate([history_k[seq], k[seq : seq + 1]])
        history_v[seq] = np.concatenate([history_v[seq], v[seq : seq + 1]])

    out, cache = decode_step(
        cache,
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        jnp.array(slot_mapping),
        jnp.array(block_tables),
        jnp.array(context_lens),
    )
    out = np.asarray(out)

    errors = []
    for seq in range(NUM_SEQS):
        if context_lens[seq] == 0:
            expected = np.zeros((NUM_HEADS, HEAD_DIM))  # inactive rows are zeros, not NaN
        else:
            expected = dense_attention(q[seq], history_k[seq], history_v[seq])
        np.testing.assert_allclose(out[seq], expected, atol=2e-3, rtol=2e-3)
        errors.append(float(np.max(np.abs(out[seq] - expected))))
    print(
        f"step {step}: context_lens {context_lens.tolist()}, slots {slot_mapping.tolist()}, "
        f"max |paged - dense| {max(errors):.1e}"
    )

    if step in (3, 5, NUM_STEPS):
        snapshots.append(snapshot(f"after decode step {step}"))
    for seq in range(NUM_SEQS):
        if generated[seq] == MAX_NEW[seq] and context_lens[seq] > 0:
            free_sequence(seq)
            print(f"        seq {seq} finished; free blocks now {free_blocks}")

assert len(traces) == 1, f"the decode step compiled {len(traces)} times"
for seq in range(NUM_SEQS):  # the cache holds every history
    if context_lens[seq]:
        k, v = read_back(cache, seq)
        np.testing.assert_array_equal(k, history_k[seq])
        np.testing.assert_array_equal(v, history_v[seq])
print(f"{NUM_STEPS} decode steps, one compilation; every step matched dense attention")

# %% [markdown]
# The block tables at four moments (each drawn before that step frees anything). Follow the
# colours of seq 1's two blocks: seq 1 finishes at step 3 and frees them. At step 4, seq 0
# crosses into its third block and takes one of them, and at step 5, seq 2 takes the other.

# %%
fig, axes = plt.subplots(1, len(snapshots), figsize=(4.2 * len(snapshots), 3.2))
for ax, (title, tables, lens, free) in zip(axes, snapshots):
    drawn = draw_block_table(ax, tables, lens, title)
    owned = drawn[drawn >= 0].tolist()
    # every physical block is either owned by exactly one sequence or free: none leaks
    assert sorted(owned + free) == list(range(NUM_BLOCKS)), (title, owned, free)
fig.suptitle(
    f"block tables: cells = logical blocks, #id = physical block, n/{BLOCK_SIZE} = slots filled"
)
fig.tight_layout()
plt.show()
