"""Static configuration and work planning of the Mosaic GPU paged-attention kernel.

What ``mosaic.py`` needs before it traces a kernel: the supported shapes
(``check_supported``), block sizes per head dim and GQA group (``block_sizes_for``), the shared
memory budget, the static configuration (``Static`` via ``make_static``), the prefill tile plan
(``plan_tiles``: 64-row q tiles that never cross a sequence, heaviest first), the decode row
placement (``decode_rows``) and the persistent-grid orders (``snake_items``, ``stream_ctas``).
Plain arrays and Python ints in and out; no kernel code.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_Q = 64  # rows per compute warpgroup = the wgmma M
# The running max starts below every finite logit (any units): finite, so a row that has seen
# nothing has exp2(MASK - MASK) = 1, not NaN. Its negation bounds a sink from above (+inf: the
# row is exactly 0).
MASK = -float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
SMEM_BYTES = 232448  # H100 dynamic shared memory per CTA (227 KiB)
_H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """KV tile, pipeline depth and compute warpgroups per CTA (prefill: query heads per CTA)."""

    block_kv: int = 128
    num_stages: int = 2
    num_wgs: int = 2
    # How the softmax exponent is formed without softcap and ALiBi (see ``logit_factor``):
    # "fold": exp2(min(s * c - m, 0)), one FMA and a min per logit, m rounded down per row;
    # "raw": exp2((s - m) * c), m in q.k units, a subtraction and a multiply per logit.
    softmax: str = "fold"

    def __post_init__(self):
        if self.softmax not in ("fold", "raw"):
            raise ValueError(f"{self.softmax=} must be 'fold' or 'raw'")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"{self.block_kv=} must be 64, 128, 192 or 256")
        if self.num_stages < 2:
            raise ValueError(f"{self.num_stages=} must be at least 2")
        if self.num_wgs not in (1, 2):
            raise ValueError(f"{self.num_wgs=} must be 1 or 2")


# head_dim -> (prefill, decode); shared memory of each is checked by smem_bytes.
_TABLE = {
    64: (BlockSizes(128, 3, 2), BlockSizes(128, 4, 1)),
    128: (BlockSizes(128, 2, 2), BlockSizes(64, 3, 1)),
    256: (BlockSizes(64, 2, 1), BlockSizes(64, 2, 1)),
}


def block_sizes_for(head_dim: int, num_groups: int, decode: bool) -> BlockSizes:
    bs = _TABLE[head_dim][int(decode)]
    if not decode and num_groups % bs.num_wgs:  # odd GQA ratio: one query head per CTA
        bs = dataclasses.replace(bs, num_wgs=1)
    return bs


def partial_dtype(head_dim: int, q_dtype):
    """Decode partial outputs: f32, except at head_dim 256 where f32 staging does not fit."""
    return jnp.dtype(jnp.float32) if head_dim <= 128 else jnp.dtype(q_dtype)


def smem_bytes(bs: BlockSizes, head_dim: int, q_dtype, decode: bool) -> int:
    itemsize = jnp.dtype(q_dtype).itemsize
    q = bs.num_wgs * BLOCK_Q * head_dim * itemsize
    kv = 2 * bs.num_stages * bs.block_kv * head_dim * itemsize
    o_item = partial_dtype(head_dim, q_dtype).itemsize if decode else itemsize
    o = bs.num_wgs * BLOCK_Q * head_dim * o_item
    ml = 3 * BLOCK_Q * 4 if decode else 0  # m, l, ALiBi slopes
    return q + kv + o + ml + 1024  # + barriers


def num_sms() -> int:
    """SMs of the default GPU (132 on an H100 SXM; also when there is no GPU: interpreter)."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or _H100_SMS) if dev.platform == "gpu" else _H100_SMS


def ctas_per_sm(bs: BlockSizes, head_dim: int, q_dtype, decode: bool) -> int:
    """CTAs that fit on one SM by shared memory (228 KiB per SM, 1 KiB reserved per CTA)."""
    return max(1, (SMEM_BYTES + 1024) // (smem_bytes(bs, head_dim, q_dtype, decode) + 1024))


def check_supported(
    *, head_dim, block_size, q_dtype, kv_dtype, return_lse=False, num_groups=1
) -> None:
    del return_lse  # the epilogues write m and l for the lse whenever asked
    del num_groups  # prefill takes any GQA ratio (decode: ``mosaic_decode.check_supported``)
    hint = 'use backend="triton" or backend="xla" for this configuration'
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"mosaic paged attention: {head_dim=} must be one of {SUPPORTED_HEAD_DIMS}; {hint}"
        )
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise NotImplementedError(
            f"mosaic paged attention: {block_size=} must be one of {SUPPORTED_BLOCK_SIZES}; {hint}"
        )
    if jnp.dtype(q_dtype) not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"mosaic paged attention: {q_dtype=} must be bfloat16 or float16; {hint}"
        )
    if jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        raise NotImplementedError(
            f"mosaic paged attention: the KV cache dtype ({jnp.dtype(kv_dtype)}) must equal "
            f"q.dtype ({jnp.dtype(q_dtype)}) (float8 caches are not covered); {hint}"
        )


@dataclasses.dataclass(frozen=True)
class Static:
    decode: bool
    num_groups: int  # G = H // Hkv
    num_kv_heads: int  # Hkv
    head_dim: int
    block_size: int
    max_blocks: int  # MB
    num_pages: int  # NB
    bs: BlockSizes
    scale: float
    softcap: float | None
    window: int | None
    has_alibi: bool
    has_sinks: bool
    num_splits: int  # decode: partial slots per (seq, KV head) (stream-K), else 1
    interpret: bool
    fused: bool = False  # decode, whole pairs: normalised q.dtype output, no merge, no m/l
    num_ctas: int = 1  # persistent CTAs (the grid)
    stream_tiles: int = 0  # decode: 0, or stream-K over (seq, KV head) x stream_tiles KV tiles
    q_rows: int = BLOCK_Q  # decode: rows of the flat q [S * H (padded), D]
    lse: bool = False  # prefill: the epilogue also writes each tile's m and l (for the lse)


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def idiv(a, b):
    """Truncating int32 division; Python ints become int32 constants (under jax_enable_x64 they
    would be int64, which ``lax.div`` refuses next to int32)."""
    return lax.div(_i32(a), _i32(b))


def irem(a, b):
    return lax.rem(_i32(a), _i32(b))


def cdiv(a, b):
    return idiv(a + (b - 1), b)  # a >= 0 everywhere it is used


def logit_factor(st: Static) -> float | None:
    """``c = scale * log2(e)`` when it can stay out of the logits (no softcap, no ALiBi), else
    None (logits are taken to log2 units first).

    With ``c``, either softmax form keeps the largest logit at weight exactly 1 and every
    weight finite however large the logits. A plain folded ``exp2(s * c - m)`` (one FMA per
    logit, ``m = max(s) * c`` rounded) compares the unrounded product with the rounded max, off
    by up to half an ulp of ``m``, which overflows ``exp2`` (inf, then NaN) once ``|m| >~ 2^31``
    (scale 1e6 with |q.k| ~ 1e4). "fold" (``BlockSizes.softmax``) rounds ``m`` down per row
    (``fold_max``), so the row max's exponent is >= 0, and clamps exponents at 0: the max
    weighs 1, near-ties at that magnitude 1 too. "raw" keeps ``m`` in q.k units and computes
    ``exp2((s - m) * c)``, exact for the max by Sterbenz. Both cost one more op per logit than
    the plain fold."""
    if st.softcap is None and not st.has_alibi and st.scale > 0:
        return st.scale * LOG2E
    return None


def raw_factor(st: Static) -> float | None:
    """The factor from the kernel's units for the running max and the partials' ``m`` to log2
    units: ``c`` with the "raw" softmax (q.k units), else None (log2 units)."""
    return logit_factor(st) if st.bs.softmax == "raw" else None


def fold_max(x):
    """``x`` (a row max in log2 units, rounded to nearest) moved down past the exact value it
    rounds: ``x - |x| 2^-22`` is below ``x·(1 - 2^-24)``, so ``s * c - fold_max(max(s) * c) >= 0``
    for the row's largest ``s``, however large."""
    return x - jnp.abs(x) * (2.0**-22)


def sink_start(sinks, c: float | None):
    """The running max a sink (natural units) starts a row at, in the kernel's units (``c``:
    raw q.k units, see ``logit_factor``; None: log2 units), clamped finite: -inf is no sink,
    +inf zeroes the row."""
    m0 = sinks * LOG2E
    if c is not None:
        m0 = m0 / c
    return jnp.clip(m0, MASK, -MASK)


def kv_steps(p_first, p_last, kv_len, window, block_kv):
    """KV tile range of rows at positions [p_first, p_last] (jnp scalars or arrays).

    Returns (begin, end, full_lo, full_hi, kv_end): tiles [begin, end) hold visible keys, tiles
    in [full_lo, full_hi) need no mask, keys >= kv_end are never visible.
    """
    kv_end = jnp.clip(p_last + 1, 0, kv_len)
    first_key = jnp.zeros_like(kv_end) if window is None else jnp.maximum(p_first - window + 1, 0)
    first_key = jnp.minimum(first_key, kv_end)
    begin = idiv(first_key, block_kv)
    end = jnp.maximum(cdiv(kv_end, block_kv), begin)
    full_lo = begin if window is None else cdiv(jnp.maximum(p_last - window + 1, 0), block_kv)
    full_lo = jnp.clip(full_lo, begin, end)
    full_hi = jnp.clip(idiv(jnp.maximum(p_first + 1, 0), block_kv), full_lo, end)
    return begin, end, full_lo, full_hi, kv_end


# Columns of the per-tile table built by plan_tiles.
class Info:
    """Columns of a prefill tile's row in the plan (``plan_tiles``)."""

    SEQ, LEN, ROW0, LO, HI, POS0, BEGIN, END, FULL_LO, FULL_HI, KV_END = range(11)


def plan_tiles(cu_seqlens_q, context_lens, num_rows, window, block_kv, max_context=None):
    """i32[NT, 11]: the 64-row query tiles of every sequence (heaviest first).

    Tile rows are q rows [row0, row0 + 64) with valid rows [row0 + lo, row0 + hi); row r sits
    at position pos0 + r. row0 is a multiple of 8 (a TMA into the (8, 64)-tiled q buffer must
    start on a tile row) and at most num_rows - 64 (num_rows is a multiple of 8 and >= 64), so
    loads never leave q. Tiles of a segment start at its first row rounded down to 8. The rows
    are S + 2 segments: the rows before cu[0] and those past cu[S] are two pseudo-sequences of
    context 0 (their rows come out as zeros), the S sequences in between. ``max_context``
    (MB * BS) bounds each context: a longer one (bad metadata, result unspecified) must not
    make the kernel read past its block-table row.
    """
    num_seqs = context_lens.shape[0]
    num_tiles = -(-(num_rows + 70 * (num_seqs + 2)) // BLOCK_Q)  # >= sum cdiv(n_s + 7, 64)
    zero, end = jnp.zeros((1,), jnp.int32), jnp.full((1,), num_rows, jnp.int32)
    cu = jnp.clip(cu_seqlens_q.astype(jnp.int32), 0, num_rows)
    cu = jnp.concatenate([zero, cu, end])  # + the segments before cu[0] and past cu[S]
    cu = jnp.maximum(cu, lax.cummax(cu))  # non-decreasing
    lens = context_lens.astype(jnp.int32)
    if max_context is not None:
        lens = jnp.minimum(lens, max_context)
    lens = jnp.concatenate([zero, lens, zero])
    n = cu[1:] - cu[:-1]
    first = cu[:-1] - cu[:-1] % 8
    tiles = jnp.where(n > 0, (cu[1:] - first + BLOCK_Q - 1) // BLOCK_Q, 0)
    tile_end = jnp.cumsum(tiles)
    b = jnp.arange(num_tiles, dtype=jnp.int32)
    # compare_all is one fused reduction; the default binary search is a while loop, kernel
    # launches per step on a GPU (15-18 us per call on an H100, NOTES.md Session 4).
    seg = jnp.searchsorted(tile_end, b, side="right", method="compare_all")
    seg = jnp.minimum(seg, num_seqs + 1).astype(jnp.int32)
    real = b < tile_end[-1]
    r_tile = first[seg] + (b - (tile_end[seg] - tiles[seg])) * BLOCK_Q
    row0 = jnp.clip(r_tile, 0, num_rows - BLOCK_Q)
    lo = jnp.where(real, jnp.maximum(r_tile, cu[seg]) - row0, 0)
    hi = jnp.where(real, jnp.minimum(r_tile + BLOCK_Q, cu[seg + 1]) - row0, 0)
    kv_len = jnp.where(real, lens[seg], 0)
    pos0 = kv_len - n[seg] + (row0 - cu[seg])
    steps = kv_steps(pos0 + lo, pos0 + hi - 1, kv_len, window, block_kv)
    seq = jnp.clip(seg - 1, 0, num_seqs - 1)  # the pseudo-sequences read no page (L = 0)
    info = jnp.stack([seq, kv_len, row0, lo, hi, pos0, *steps], axis=1).astype(jnp.int32)
    return info[::-1]  # causal: the longest KV loops start first


def decode_rows(seq, kv_head, num_kv_heads, num_groups, q_rows):
    """Flat q rows of a decode group: (row0, r_off, q_start). The G query heads of (seq, kv_head)
    are flat rows [q_start, q_start + G) of q [S * H, D]; the kernel loads the 64 rows from row0
    (a multiple of 8, for the tiled q buffer; at most q_rows - 64), so they sit at r_off."""
    q_start = (seq * num_kv_heads + kv_head) * num_groups
    row0 = jnp.minimum(q_start - irem(q_start, 8), q_rows - BLOCK_Q)
    return row0, q_start - row0, q_start


def stream_ctas(pair, tiles, num_pairs, num_ctas, div=lambda a, b: a // b):
    """Stream-K decode: CTA c takes the flat tiles [c T / C, (c + 1) T / C) of T = num_pairs x
    tiles (pair-major). Returns the first and last CTA that take tiles of ``pair`` (ints or
    jnp scalars; ``div`` is floor division, ``idiv`` in the kernel); all values >= 0."""
    total = num_pairs * tiles
    containing = lambda x: div((x + 1) * num_ctas + total - 1, total) - 1  # CTA of flat tile x
    return containing(pair * tiles), containing(pair * tiles + tiles - 1)


def num_items(st: Static, info_rows: int) -> int:
    """Items of a call: prefill (H / num_wgs) x tiles; decode (whole items) S x Hkv."""
    if st.decode:
        return info_rows * st.num_kv_heads
    return info_rows * st.num_groups * st.num_kv_heads // st.bs.num_wgs


def snake_items(num_items: int, num_ctas: int):
    """The items of each persistent CTA, as an int array [rounds, num_ctas] (-1: none).

    Round j gives CTA c item j C + c (j even) or j C + C - 1 - c (j odd): with items ordered
    heaviest first (prefill's causal tiles), the CTAs' totals stay within about one item.
    The kernel computes the same order (``mosaic_items.for_each_item``); the decode planner uses
    this one.
    """
    rounds = -(-num_items // num_ctas)
    k = np.arange(rounds * num_ctas).reshape(rounds, num_ctas)
    k[1::2] = k[1::2, ::-1]
    return np.where(k < num_items, k, -1)


def make_static(
    *,
    decode,
    q_dtype,
    num_heads,
    k_pages,
    max_blocks,
    scale,
    softcap,
    sliding_window,
    alibi_slopes,
    sinks,
    num_splits,
    interpret,
    block_sizes,
):
    num_pages, num_kv_heads, block_size, head_dim = k_pages.shape
    check_supported(
        head_dim=head_dim, block_size=block_size, q_dtype=q_dtype, kv_dtype=k_pages.dtype
    )
    grp = num_heads // num_kv_heads
    if decode and grp > BLOCK_Q:
        raise NotImplementedError(
            f"mosaic paged decode: {grp=} query heads per KV head must be "
            f'<= {BLOCK_Q}; use backend="triton" or backend="xla"'
        )
    bs = block_sizes or block_sizes_for(head_dim, grp, decode)
    if decode and bs.num_wgs != 1:
        raise ValueError(f"{bs.num_wgs=} must be 1 in decode (the GQA group is the wgmma M)")
    if not decode and grp % bs.num_wgs:
        raise ValueError(f"{bs.num_wgs=} must divide the GQA ratio {grp}")
    smem = smem_bytes(bs, head_dim, q_dtype, decode)
    if smem > SMEM_BYTES:
        raise ValueError(f"{bs} needs {smem} bytes of shared memory (> {SMEM_BYTES})")
    return Static(
        decode=decode,
        num_groups=grp,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        max_blocks=max_blocks,
        num_pages=num_pages,
        bs=bs,
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
        window=None if sliding_window is None else int(sliding_window),
        has_alibi=alibi_slopes is not None,
        has_sinks=sinks is not None,
        num_splits=num_splits,
        interpret=bool(interpret),
    )


def lse_of_ml(m, l, c, sinks):
    """The natural-log softmax denominators of rows from their final running max ``m`` (the
    kernel's units; ``c``: the raw factor to log2 units, or None) and sum ``l`` (the sink
    included, when ``sinks`` (f32, broadcast against m) is given): -inf where nothing was seen
    (l == 0, or a -inf sink alone: m stayed at MASK), +inf under a +inf sink."""
    m2 = m if c is None else m * c
    lse = (m2 + jnp.log2(jnp.where(l > 0, l, 1.0))) / LOG2E
    lse = jnp.where((l == 0) | (m <= MASK), -jnp.inf, lse)
    if sinks is not None:
        lse = jnp.where(sinks == jnp.inf, jnp.inf, lse)
    return lse


def tile_lse(tile_ml, info, cu_seqlens_q, sinks, st, num_rows):
    """Rows' lse [num_rows, H] from the tiles' m and l f32[NT, H, 2, 64] (O(T H), no KV)."""
    sink = None if sinks is None else sinks.astype(jnp.float32)[None, :, None]
    lse = lse_of_ml(tile_ml[:, :, 0], tile_ml[:, :, 1], raw_factor(st), sink)  # [NT, H, 64]
    r = jnp.arange(BLOCK_Q, dtype=jnp.int32)[None, :]
    ok = (r >= info[:, Info.LO, None]) & (r < info[:, Info.HI, None])
    rows = jnp.where(ok, info[:, Info.ROW0, None] + r, num_rows).reshape(-1)
    vals = jnp.swapaxes(lse, 1, 2).reshape(rows.shape[0], -1)
    out = jnp.full((num_rows, lse.shape[1]), -jnp.inf).at[rows].set(vals, mode="drop")
    cu = cu_seqlens_q.astype(jnp.int32)
    row = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
    return jnp.where((row >= cu[0]) & (row < cu[-1]), out, -jnp.inf)  # outside every sequence
