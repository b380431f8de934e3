"""Token-to-expert alignment for the grouped MoE GEMMs, on the device, static shapes.

Given ``topk_ids`` i32[T, k] and ``E`` experts, the ``N = T*k`` (token, slot) pairs are
numbered ``s = t*k + j`` and laid out in expert order, each expert's run padded up to a
multiple of the tile height ``block_m``, so that every ``block_m``-row tile of the layout
belongs to exactly one expert:

    rows:  | e0 e0 e0 pad | e1 e1 e1 e1 | e1 pad pad pad | e3 pad pad pad | -- unused -- |
    tiles: |      0       |      1      |       1        |       3        |  -1  ...  -1  |

The padded total is data dependent, so the arrays have the static bound
``padded_rows(N, E, block_m) = round_up(N + min(E, N)*(block_m - 1), block_m)`` rows; tiles
past the last used one carry expert id -1 (kernels write zeros there and skip the GEMM).
Ids outside ``[0, E)`` (experts on another device) go to no expert: they are not in the
layout and their ``position`` is the out-of-range value ``padded_rows`` (a gather with
``mode="fill"`` then reads zero for them).

Pure jnp: one stable argsort and a few searchsorted/cumsum ops. Jittable, no host round
trip, no data-dependent shapes; ``num_experts`` and ``block_m`` are static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the padded row count (a multiple of ``block_m``).

    >>> padded_rows(num_slots=8192, num_experts=8, block_m=128)  # 8192 + 8*127 -> 9216
    9216
    """
    # Only experts that receive at least one row get padded: at most min(E, N) of them.
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return max(block_m, -(-bound // block_m) * block_m)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Alignment:
    """The expert-sorted, tile-padded layout of the (token, slot) pairs.

    sorted_slots:  i32[P]      slot ``t*k + j`` at each padded row; ``N`` on padding rows.
    tile_experts:  i32[P // block_m]  expert of each tile; -1 for unused tiles.
    positions:     i32[N]      padded row of each slot; ``P`` for ids outside [0, E).
    num_rows:      i32[]       rows actually used (a multiple of block_m), <= P.
    """

    sorted_slots: jax.Array
    tile_experts: jax.Array
    positions: jax.Array
    num_rows: jax.Array


def align_tokens(topk_ids: jax.Array, num_experts: int, block_m: int) -> Alignment:
    """Sorts the (token, slot) pairs by expert and pads each expert to ``block_m`` rows.

    >>> ids = jnp.array([[1, 0], [1, 7]], jnp.int32)   # E=2: id 7 belongs to no expert
    >>> a = align_tokens(ids, num_experts=2, block_m=2)  # P = round_up(4 + 2*1, 2) = 6
    >>> a.sorted_slots.tolist()  # expert 0: slot 1 (+pad); expert 1: slots 0, 2
    [1, 4, 0, 2, 4, 4]
    >>> a.tile_experts.tolist(), a.positions.tolist(), int(a.num_rows)
    ([0, 1, -1], [2, 0, 3, 6], 4)
    """
    if topk_ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {topk_ids.shape}")
    num_slots = topk_ids.size
    num_rows_bound = padded_rows(num_slots, num_experts, block_m)
    num_tiles = num_rows_bound // block_m

    flat = topk_ids.reshape(-1).astype(jnp.int32)
    valid = (flat >= 0) & (flat < num_experts)
    key = jnp.where(valid, flat, num_experts)  # invalid ids sort after every expert

    # Stable: within an expert, slots keep token order (deterministic layout).
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # [N]
    sorted_key = key[order]

    experts = jnp.arange(num_experts + 1, dtype=jnp.int32)
    # Both searches compare all pairs (method="compare_all": one fused reduction): the default
    # binary search is a while loop, a launch per step on a GPU, which a 1 ms decode notices.
    starts = jnp.searchsorted(sorted_key, experts, side="left", method="compare_all").astype(
        jnp.int32
    )  # [E+1]
    counts = starts[1:] - starts[:-1]  # [E]
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = jnp.cumsum(padded_counts).astype(jnp.int32)  # [E]
    padded_starts = padded_ends - padded_counts
    num_rows = padded_ends[-1]

    # Row p belongs to the first expert whose padded run ends after p (E: unused row).
    rows = jnp.arange(num_rows_bound, dtype=jnp.int32)
    row_expert = jnp.searchsorted(padded_ends, rows, side="right", method="compare_all").astype(
        jnp.int32
    )
    e_c = jnp.minimum(row_expert, num_experts - 1)
    rank = rows - padded_starts[e_c]
    row_used = (row_expert < num_experts) & (rank < counts[e_c])
    src = jnp.clip(starts[e_c] + rank, 0, num_slots - 1)
    sorted_slots = jnp.where(row_used, order[src], num_slots).astype(jnp.int32)

    tile_expert = row_expert[::block_m]
    tile_experts = jnp.where(tile_expert < num_experts, tile_expert, -1).astype(jnp.int32)
    assert tile_experts.shape == (num_tiles,)

    # Inverse map, slot -> padded row: the i-th sorted slot sits at
    # padded_starts[e] + (i - starts[e]).
    i = jnp.arange(num_slots, dtype=jnp.int32)
    ke = jnp.minimum(sorted_key, num_experts - 1)
    pos_sorted = jnp.where(
        sorted_key < num_experts, padded_starts[ke] + i - starts[ke], num_rows_bound
    )
    positions = (
        jnp.zeros((num_slots,), jnp.int32)
        .at[order]
        .set(pos_sorted.astype(jnp.int32), unique_indices=True)
    )
    return Alignment(sorted_slots, tile_experts, positions, num_rows)
