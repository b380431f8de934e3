"""Block sizes for the Triton paged-attention kernels, keyed by (padded head dim, dtype kind, mode).

Two kernels share one set of knobs:
- ``prefill`` (chunked prefill and mixed batches): a q tile of ``block_m`` rows (query tokens x the
  query heads of one KV head) against KV tiles of ``block_k`` keys;
- ``decode``: the q tile is the query heads of one KV head (padded to >= 16 rows), KV tiles of
  ``block_k`` keys, the context optionally split across ``num_splits`` programs.

``num_splits=None`` lets :func:`choose_num_splits` pick the split count from the shapes so the
grid fills the GPU (a few waves of programs) without splitting short contexts. Entries are
starting points from the usual Triton flash-attention settings on Hopper; re-tune on the GPU
(benchmarks/NOTES.md) and override per call with ``block_sizes=BlockSizes(...)``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

NUM_SMS_H100 = 132


def _pow2(v: int) -> bool:
    return isinstance(v, int) and v > 0 and (v & (v - 1)) == 0


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch parameters of one kernel call (hashable: a static jit argument).

    block_m:    prefill q-tile rows (tokens x packed query heads); ignored by decode, whose q tile
                is the head group padded to a power of two >= 16.
    block_k:    keys per KV tile; a tile may span several pages (page ids are gathered per key).
    num_warps, num_stages: Triton launch parameters.
    num_splits: decode only: KV splits per (sequence, KV head); None = from shapes.

    Code-shape variants (static, so each is its own compiled kernel; the defaults are the
    measured best on an H100, benchmarks/NOTES.md "Triton attention"):
    {decode,prefill}_prefetch: the block-table ids of tile j + 1 are loaded in iteration j and
        carried, so the K/V gathers depend on a loop-carried value rather than on a load of the
        same iteration (Triton's pipeliner then gives K/V num_stages - 1 buffers).
    {decode,prefill}_fold: without softcap and ALiBi, the softmax runs in units of the raw
        q.k (the scale multiply leaves the max path) and computes exp2((s - m) * c), exact for
        logits of any size (triton_common: "raw" domain). Off: logits are scaled first; on a
        GPU the compiler may then contract the scale multiply and the max subtraction into one
        FMA, which overflows for logits beyond ~2^31 in log2 units. On by default in both.
    heads_inner: prefill grid (Hkv, tiles) instead of (tiles, Hkv).
    """

    block_m: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None
    decode_prefetch: bool = False
    prefill_prefetch: bool = False
    decode_fold: bool = True
    prefill_fold: bool = True
    heads_inner: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_k"):
            v = getattr(self, name)
            if not (_pow2(v) and 16 <= v <= 256):
                raise ValueError(
                    f"{name}={v} must be a power of two in [16, 256] (Triton dot tiles)"
                )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be one of (1, 2, 4, 8, 16)")
        if not (isinstance(self.num_stages, int) and 1 <= self.num_stages <= 8):
            raise ValueError(f"num_stages={self.num_stages} must be an int in [1, 8]")
        if self.num_splits is not None and not (_pow2(self.num_splits) and self.num_splits <= 256):
            raise ValueError(f"num_splits={self.num_splits} must be None or a power of two <= 256")


def dtype_kind(q_dtype, kv_dtype) -> str:
    """'f32' when either side computes in float32, else 'half' (bf16/f16, and float8 KV)."""
    if jnp.dtype(q_dtype) == jnp.float32 or jnp.dtype(kv_dtype) == jnp.float32:
        return "f32"
    return "half"


# (padded head dim, dtype kind, mode) -> BlockSizes.
# Shared memory per stage is about block_k * D * 2 tensors * itemsize (+ q); keep it well under
# the 227 KB of an H100 SM with num_stages in flight, and the f32 accumulator
# [block_m, D] within the register file.
_TABLE: dict[tuple[int, str, str], BlockSizes] = {
    (64, "half", "prefill"): BlockSizes(block_m=128, block_k=64, num_warps=4, num_stages=3),
    # H100 sweeps (benchmarks/NOTES.md, "Triton attention"): with the folded scale and the
    # (Hkv, tiles) grid, 4 warps / 64-key tiles run two programs per SM (98 KB shared, 255
    # registers): 1x8192 causal 285 and 273 TFLOP/s in two runs vs 252-259 for the previous
    # 128 x 128 / 8 warps entry without them (275 and 266 with them: one program per SM).
    (128, "half", "prefill"): BlockSizes(block_m=128, block_k=64, num_warps=4, num_stages=3),
    (256, "half", "prefill"): BlockSizes(block_m=64, block_k=32, num_warps=4, num_stages=2),
    (64, "f32", "prefill"): BlockSizes(block_m=64, block_k=32, num_warps=4, num_stages=2),
    (128, "f32", "prefill"): BlockSizes(block_m=64, block_k=32, num_warps=4, num_stages=2),
    (256, "f32", "prefill"): BlockSizes(block_m=32, block_k=32, num_warps=4, num_stages=2),
    # Decode streams K/V once: deep pipelines of 64-key tiles keep enough bytes in flight.
    (64, "half", "decode"): BlockSizes(block_k=128, num_warps=4, num_stages=3),
    # H100 sweep: 2.03 TB/s on 64 x 4096 vs 1.79 with 64-key tiles and 4 warps. Re-swept
    # (NOTES.md, "Triton attention"): no block_k / warps / stages / prefetch combination beat
    # it outside the run-to-run noise (+-7% between identical rows).
    (128, "half", "decode"): BlockSizes(block_k=128, num_warps=8, num_stages=3),
    (256, "half", "decode"): BlockSizes(block_k=32, num_warps=4, num_stages=3),
    (64, "f32", "decode"): BlockSizes(block_k=64, num_warps=4, num_stages=2),
    (128, "f32", "decode"): BlockSizes(block_k=32, num_warps=4, num_stages=2),
    (256, "f32", "decode"): BlockSizes(block_k=16, num_warps=4, num_stages=2),
}


def get_block_sizes(
    head_dim: int, q_dtype, kv_dtype, mode: str, override: BlockSizes | None = None
) -> BlockSizes:
    """The table entry for these shapes, or ``override`` when given."""
    if mode not in ("prefill", "decode"):
        raise ValueError(f"{mode=} must be 'prefill' or 'decode'")
    if override is not None:
        if not isinstance(override, BlockSizes):
            raise TypeError(f"block_sizes must be a BlockSizes, got {type(override).__name__}")
        return override
    dp = max(64, next_pow2(head_dim))
    return _TABLE[(dp, dtype_kind(q_dtype, kv_dtype), mode)]


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_context: int,
    block_k: int,
    num_sms: int = NUM_SMS_H100,
    min_keys_per_split: int = 512,
) -> int:
    """KV splits for decode: enough programs for ~3 waves of ``num_sms``, from static shapes only.

    Each split keeps at least ``min_keys_per_split`` keys of the largest possible context
    (``max_blocks * block_size``), so short contexts are never split (the merge would cost more
    than it saves). Powers of two, at most 64.
    """
    programs = max(1, num_seqs * num_kv_heads)
    target = 3 * num_sms
    if programs >= target:
        return 1
    want = next_pow2(-(-target // programs))
    cap = max(1, max_context // max(min_keys_per_split, block_k))
    splits = 1
    while splits * 2 <= min(want, cap, 64):
        splits *= 2
    return splits
