"""The work items of the Mosaic GPU paged-attention kernel and the loop of a CTA over them.

An item is what a CTA's compute warpgroups do in one go: prefill, one 64-row q tile (from the
``plan_tiles`` table) for ``num_wgs`` query heads; decode, one (sequence, KV head) pair, or a
share of its KV tiles (stream-K). ``for_each_item`` walks a CTA's items in the same order on the
compute and the memory warpgroups. Scalar index math only (int32 under ``jax_enable_x64`` too).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.paged_attention.mosaic_plan import (
    Info,
    Static,
    decode_rows,
    idiv,
    irem,
    kv_steps,
    num_items,
    stream_ctas,
)


@dataclasses.dataclass(frozen=True)
class Item:
    """One unit of a CTA's work: a 64-row q tile against one KV head's tiles [begin, end)."""

    seq: jax.Array
    kv_head: jax.Array
    kv_len: jax.Array
    begin: jax.Array
    end: jax.Array
    full_lo: jax.Array
    full_hi: jax.Array
    kv_end: jax.Array
    row0: jax.Array  # first q row of the tile (a multiple of 8; load_q tells Mosaic)
    pos0: jax.Array  # position of tile row 0 (decode: of every row)
    # prefill: rows [lo, hi) are the tile's, head0 its first query head
    lo: jax.Array | None = None
    hi: jax.Array | None = None
    head0: jax.Array | None = None
    # decode: rows [r_off, r_off + G) are the group's, q_start = its first flat q row
    split: jax.Array | None = None
    r_off: jax.Array | None = None
    q_start: jax.Array | None = None
    tile: jax.Array | None = None  # prefill: the plan_tiles row


def prefill_item(st: Static, info_ref, k) -> Item:
    """Item k = tile * (H / num_wgs) + hp: the tiles come heaviest first (``plan_tiles``)."""
    heads_per_cta = st.num_groups * st.num_kv_heads // st.bs.num_wgs
    tile, hp = idiv(k, heads_per_cta), irem(k, heads_per_cta)
    per_kv = st.num_groups // st.bs.num_wgs
    kv_head = idiv(hp, per_kv)
    row = lambda c: info_ref[tile, c]
    return Item(
        seq=row(Info.SEQ),
        kv_head=kv_head,
        kv_len=row(Info.LEN),
        begin=row(Info.BEGIN),
        end=row(Info.END),
        full_lo=row(Info.FULL_LO),
        full_hi=row(Info.FULL_HI),
        kv_end=row(Info.KV_END),
        row0=row(Info.ROW0),
        pos0=row(Info.POS0),
        lo=row(Info.LO),
        hi=row(Info.HI),
        head0=kv_head * st.num_groups + irem(hp, per_kv) * st.bs.num_wgs,
        tile=tile,
    )


def decode_item(st: Static, lens_ref, pair, split=0, share=None) -> Item:
    """Tiles [begin + share[0], begin + share[1]) of pair = seq * Hkv + kv_head (all: share None),
    whose partial goes to slot ``split``."""
    kv_head, seq = irem(pair, st.num_kv_heads), idiv(pair, st.num_kv_heads)
    # At most what the block-table row holds: a longer context (bad metadata, its result
    # unspecified) must not make the memory warpgroup read past the row.
    kv_len = jnp.minimum(lens_ref[seq], st.max_blocks * st.block_size)
    p_row = kv_len - 1  # every row (a query head) sits at L - 1
    begin, end, full_lo, full_hi, kv_end = kv_steps(p_row, p_row, kv_len, st.window, st.bs.block_kv)
    if share is not None:
        begin, end = jnp.minimum(begin + share[0], end), jnp.minimum(begin + share[1], end)
    row0, r_off, q_start = decode_rows(seq, kv_head, st.num_kv_heads, st.num_groups, st.q_rows)
    return Item(
        seq=seq,
        kv_head=kv_head,
        kv_len=kv_len,
        begin=begin,
        end=end,
        full_lo=full_lo,
        full_hi=full_hi,
        kv_end=kv_end,
        row0=row0,
        pos0=p_row,
        split=split,
        r_off=r_off,
        q_start=q_start,
    )


def for_each_item(st: Static, info_ref, body, with_next=False):
    """Runs ``body(item, g) -> g`` over this CTA's items (``with_next``: ``body(j, item,
    next_item, has_next, g)``, ``next_item()`` building the next item where it is called), g
    counting the KV tiles streamed so far (the ring slot of a tile is g % stages). CTAs are
    persistent: the K/V stream of one item follows the last one's without a pipeline refill.
    Items: ``snake_items`` order, or (stream-K decode) the pairs that overlap the CTA's share of
    the flat tiles. Returns the CTA's tile count."""
    cta = lax.axis_index("cta").astype(jnp.int32)  # int64 in the interpreter under x64
    if st.stream_tiles:
        t, num_pairs = st.stream_tiles, info_ref.shape[0] * st.num_kv_heads
        lo = idiv(cta * (num_pairs * t), st.num_ctas)
        hi = idiv((cta + 1) * (num_pairs * t), st.num_ctas)
        p0 = idiv(lo, t)
        count = idiv(hi - 1, t) - p0 + 1

        def item(j):
            pair = p0 + j
            first, _ = stream_ctas(pair, t, num_pairs, st.num_ctas, idiv)
            share = (jnp.maximum(lo - pair * t, 0), jnp.minimum(hi - pair * t, t))
            return decode_item(st, info_ref, pair, cta - first, share)
    else:
        items = num_items(st, info_ref.shape[0])
        make = decode_item if st.decode else prefill_item
        if st.num_ctas == items:  # one item per CTA: straight-line code, the hardware schedules
            it = make(st, info_ref, cta)
            return body(it, 0) if not with_next else body(0, it, None, False, 0)
        rounds = -(-items // st.num_ctas)
        last_pos = cta if (rounds - 1) % 2 == 0 else st.num_ctas - 1 - cta
        count = (rounds - 1) + (last_pos < items - (rounds - 1) * st.num_ctas).astype(jnp.int32)

        def item(j):
            pos = jnp.where(irem(j, 2) == 0, cta, st.num_ctas - 1 - cta)
            return make(st, info_ref, jnp.minimum(j * st.num_ctas + pos, items - 1))

    def step(j, g):
        if not with_next:
            return body(item(j), g)
        return body(j, item(j), lambda: item(j + 1), j + 1 < count, g)

    return lax.fori_loop(0, count, step, jnp.int32(0))
