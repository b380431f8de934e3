"""Token sampling on the device: greedy, or temperature + top-p (nucleus), seeded per request.

Request ``i`` draws its ``n``-th token with the key ``fold_in(key(seed_i), n)``, so a request's
samples depend only on its seed and its own logits, not on which other requests share the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature <= 0`` is greedy (argmax). ``top_p`` keeps the smallest set of most likely
    tokens whose probability reaches ``top_p`` (at least one). Generation stops after
    ``max_new_tokens``, or at an end-of-sequence token (the model's ``eos_token_id`` unless
    ``ignore_eos``, and ``stop_token_ids``), which is included in the output.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")


def _sample_one(logits, temperature, top_p, seed, counter):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    ranked = scaled[order]
    probs = jax.nn.softmax(ranked)
    before = jnp.cumsum(probs) - probs  # mass of the strictly more likely tokens
    ranked = jnp.where(before < top_p, ranked, -jnp.inf)  # the first token is always kept
    key = jax.random.fold_in(jax.random.key(seed), counter)
    return order[jax.random.categorical(key, ranked)]


def sample(logits, temperature, top_p, seeds, counters):
    """Next tokens ``i32[S]`` from float logits ``[S, V]``; ``temperature, top_p: f32[S]``,
    ``seeds, counters: u32[S]`` (counter = tokens the request has generated so far)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):  # sorts the vocabulary: skipped when every request is greedy
        drawn = jax.vmap(_sample_one)(logits, temperature, top_p, seeds, counters)
        return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
