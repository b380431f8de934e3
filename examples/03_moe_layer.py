# %% [markdown]
# # 03 · A mixture-of-experts layer: routing and the fused expert computation
#
# An MoE layer replaces one big MLP with `E` small ones (the **experts**). A router scores
# every token against every expert, and each token runs through only its `top_k` best
# experts. Their outputs are combined with the routing weights:
#
# `y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`, where
# `expert_e(x) = (silu(x @ Wg[e]) * (x @ Wu[e])) @ Wd[e]`.
#
# This example:
# 1. routes with `moe_topk` in the two styles that models use: **softmax** (Mixtral, Qwen) and
#    **sigmoid + a correction bias** (DeepSeek-V3, whose bias balances the experts' load
#    without an auxiliary loss), and checks both against NumPy;
# 2. plots the load per expert;
# 3. runs `fused_moe` (sort the tokens by expert, grouped GEMMs, combine) and checks it
#    against a dense layer that runs every expert on every token;
# 4. splits the experts over two "devices", as expert parallelism does.

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
# ## A layer and a batch of tokens
#
# The router is skewed on purpose (a per-expert offset on its logits), as trained routers
# often are: a few experts are popular.

# %%
NUM_TOKENS, HIDDEN, NUM_EXPERTS, INTER, TOP_K = 512, 64, 8, 128, 2

rng = np.random.default_rng(0)
x = rng.standard_normal((NUM_TOKENS, HIDDEN)).astype(np.float32)
w_router = (rng.standard_normal((HIDDEN, NUM_EXPERTS)) / np.sqrt(HIDDEN)).astype(np.float32)
router_skew = np.linspace(1.0, -1.0, NUM_EXPERTS).astype(np.float32)  # expert 0 is favoured
w_gate_up = (rng.standard_normal((NUM_EXPERTS, HIDDEN, 2 * INTER)) / np.sqrt(HIDDEN)).astype(
    np.float32
)
w_down = (rng.standard_normal((NUM_EXPERTS, INTER, HIDDEN)) / np.sqrt(INTER)).astype(np.float32)
router_logits = x @ w_router + router_skew  # [tokens, experts]
print("x", x.shape, "w_gate_up", w_gate_up.shape, "(gate | up)", "w_down", w_down.shape)


def load(ids):
    """Tokens routed to each expert."""
    return np.bincount(np.asarray(ids).reshape(-1), minlength=NUM_EXPERTS)


def top_k_np(scores, k):
    """Ids of the k largest scores per row, best first."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


# %% [markdown]
# ## Softmax routing
#
# The router takes a softmax over all experts, then the top-k. `renormalize=True` makes each
# token's k weights sum to 1.

# %%
weights_sm, ids_sm = jpa.moe_topk(jnp.asarray(router_logits), TOP_K, renormalize=True)

probs = np.exp(router_logits - router_logits.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
ids_ref = top_k_np(probs, TOP_K)
weights_ref = np.take_along_axis(probs, ids_ref, -1)
weights_ref /= weights_ref.sum(-1, keepdims=True)
np.testing.assert_array_equal(ids_sm, ids_ref)
np.testing.assert_allclose(weights_sm, weights_ref, rtol=1e-5, atol=1e-6)
print(
    "softmax: token 0 -> experts",
    np.asarray(ids_sm)[0].tolist(),
    "with weights",
    [f"{w:.3f}" for w in np.asarray(weights_sm)[0]],
)
print("softmax: load per expert", load(ids_sm).tolist())

# %% [markdown]
# ## Sigmoid routing with a correction bias
#
# Each expert gets an independent sigmoid score. A per-expert `correction_bias` is added
# **for the choice only**; the weights stay the unbiased scores (renormalized, then scaled by
# `routed_scaling_factor`). DeepSeek-V3 learns the bias without gradients: after each batch it
# nudges the bias up for underloaded experts and down for overloaded ones. We run that update
# for a few rounds on our batch and watch the load even out.
#
# With no bias, sigmoid picks the same experts as softmax: both are monotone in the logits.
# Only the weights differ.


# %%
def sigmoid_route(bias):
    return jpa.moe_topk(
        jnp.asarray(router_logits),
        TOP_K,
        scoring="sigmoid",
        correction_bias=jnp.asarray(bias),
        renormalize=True,
        routed_scaling_factor=2.5,
    )


bias = np.zeros(NUM_EXPERTS, np.float32)
ids_unbiased = sigmoid_route(bias)[1]
np.testing.assert_array_equal(ids_unbiased, ids_sm)  # same choice as softmax
load_unbiased = load(ids_unbiased)
for _ in range(30):  # aux-loss-free balancing
    counts = load(sigmoid_route(bias)[1])
    bias += 0.01 * np.sign(counts.mean() - counts)
weights_sg, ids_sg = sigmoid_route(bias)
load_balanced = load(ids_sg)

scores = 1.0 / (1.0 + np.exp(-router_logits))
ids_ref = top_k_np(scores + bias, TOP_K)  # chosen with the bias ...
weights_ref = np.take_along_axis(scores, ids_ref, -1)  # ... weighted without it
weights_ref = 2.5 * weights_ref / weights_ref.sum(-1, keepdims=True)
np.testing.assert_array_equal(ids_sg, ids_ref)
np.testing.assert_allclose(weights_sg, weights_ref, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(np.asarray(weights_sg).sum(-1), 2.5, rtol=1e-5)


def imbalance(counts):
    return counts.max() / counts.mean()


assert imbalance(load_balanced) < imbalance(load_unbiased)
print("bias:", [f"{b:+.2f}" for b in bias])
print(
    f"sigmoid load {load_unbiased.tolist()} (max/mean {imbalance(load_unbiased):.2f}) -> "
    f"with bias {load_balanced.tolist()} (max/mean {imbalance(load_balanced):.2f})"
)

# %% [markdown]
# DeepSeek-V3 also routes by **groups**: the experts form `num_expert_group` groups, and each
# token keeps only its best `topk_group` groups, scored by the sum of each group's top-2
# scores. This bounds how many devices a token's experts live on.

# %%
GROUPS, KEEP_GROUPS, GROUP_SIZE = 4, 2, NUM_EXPERTS // 4
_, ids_grouped = jpa.moe_topk(
    jnp.asarray(router_logits),
    3,
    scoring="sigmoid",
    correction_bias=jnp.asarray(bias),
    num_expert_group=GROUPS,
    topk_group=KEEP_GROUPS,
)

select = (scores + bias).reshape(NUM_TOKENS, GROUPS, GROUP_SIZE)
group_score = np.sort(select, axis=-1)[..., -2:].sum(-1)  # sum of each group's top-2
kept = top_k_np(group_score, KEEP_GROUPS)  # [tokens, 2] group ids
allowed = np.zeros((NUM_TOKENS, GROUPS), bool)
np.put_along_axis(allowed, kept, True, axis=-1)
masked = np.where(np.repeat(allowed, GROUP_SIZE, axis=-1), scores + bias, -np.inf)
np.testing.assert_array_equal(ids_grouped, top_k_np(masked, 3))


def groups_used(ids):
    return np.array([len(set(row)) for row in (np.asarray(ids) // GROUP_SIZE).tolist()])


ungrouped = top_k_np(scores + bias, 3)
print(
    f"top-3 of {GROUPS} groups of {GROUP_SIZE}: tokens spread over 3 groups: "
    f"{(groups_used(ungrouped) == 3).sum()} without grouping, "
    f"{(groups_used(ids_grouped) == 3).sum()} with topk_group={KEEP_GROUPS}"
)
assert groups_used(ids_grouped).max() <= KEEP_GROUPS

# %% [markdown]
# ## Load per expert

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
experts = np.arange(NUM_EXPERTS)
for i, (label, counts) in enumerate(
    [
        ("softmax", load(ids_sm)),
        ("sigmoid", load_unbiased),
        ("sigmoid + balancing bias", load_balanced),
    ]
):
    ax.bar(experts + (i - 1) * 0.27, counts, width=0.27, label=label)
ax.axhline(
    NUM_TOKENS * TOP_K / NUM_EXPERTS,
    color="black",
    linestyle="--",
    linewidth=1,
    label="perfect balance",
)
ax.set(
    xlabel="expert",
    ylabel="tokens routed",
    xticks=experts,
    title=f"{NUM_TOKENS} tokens, top-{TOP_K} of {NUM_EXPERTS} experts",
)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## `fused_moe` against a dense layer
#
# The reference runs **every** expert on **every** token, in float64, and combines the outputs
# with a `[tokens, experts]` matrix that holds each token's routing weights (zero for the
# experts it did not choose). That costs `E / top_k` times more FLOPs than needed. `fused_moe`
# computes only the chosen pairs.


# %%
def dense_moe(x, w_gate_up, w_down, weights, ids):
    x, w_gate_up, w_down = (a.astype(np.float64) for a in (x, w_gate_up, w_down))
    h = np.einsum("td,edf->tef", x, w_gate_up)  # [tokens, experts, 2I]
    gate, up = h[..., :INTER], h[..., INTER:]
    y = np.einsum("tef,efd->ted", gate / (1 + np.exp(-gate)) * up, w_down)  # silu(gate) * up
    combine = np.zeros((len(x), NUM_EXPERTS))
    for j in range(ids.shape[1]):  # ids outside [0, E): none
        inside = (ids[:, j] >= 0) & (ids[:, j] < NUM_EXPERTS)
        combine[np.arange(len(x))[inside], ids[inside, j]] += weights[inside, j]
    return np.einsum("te,ted->td", combine, y)


fused = jax.jit(jpa.fused_moe, static_argnames=("activation", "backend"))
for name, (weights, ids) in [("softmax", (weights_sm, ids_sm)), ("sigmoid", (weights_sg, ids_sg))]:
    y = np.asarray(
        fused(
            jnp.asarray(x),
            jnp.asarray(w_gate_up),
            jnp.asarray(w_down),
            weights,
            ids,
            backend=BACKEND,
        )
    )
    expected = dense_moe(x, w_gate_up, w_down, np.asarray(weights), np.asarray(ids))
    np.testing.assert_allclose(y, expected, atol=2e-3, rtol=2e-3)
    rel = np.linalg.norm(y - expected) / np.linalg.norm(expected)
    print(f"fused_moe ({name} routing): y {y.shape}, relative error vs dense {rel:.1e}")

# %% [markdown]
# ## Expert parallelism
#
# With the experts spread over devices, each device holds `E / n` of them and receives
# *global* ids. Shifted by its first expert, ids outside `[0, E/n)` belong to another device,
# and `fused_moe` gives them zero. The devices' partial outputs sum to the full layer. On real
# devices that sum is a `psum` inside `shard_map`; here the two "devices" are two calls.

# %%
half = NUM_EXPERTS // 2
partial = []
for device in range(2):
    own = slice(device * half, (device + 1) * half)
    local_ids = ids_sm - device * half  # ids of the other device fall outside
    partial.append(
        np.asarray(
            fused(
                jnp.asarray(x),
                jnp.asarray(w_gate_up[own]),
                jnp.asarray(w_down[own]),
                weights_sm,
                local_ids,
                backend=BACKEND,
            )
        )
    )
full = dense_moe(x, w_gate_up, w_down, np.asarray(weights_sm), np.asarray(ids_sm))
np.testing.assert_allclose(partial[0] + partial[1], full, atol=2e-3, rtol=2e-3)
print(
    f"2 devices x {half} experts: sum of partial outputs == full layer "
    f"(max error {np.max(np.abs(partial[0] + partial[1] - full)):.1e})"
)
