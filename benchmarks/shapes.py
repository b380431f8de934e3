"""Named real-model benchmark shapes, shared by the benchmark groups and the tests.

Each shape is a frozen (hashable) dataclass that knows how much work it is: the bytes or FLOPs
that the benchmarks divide by the measured time. The counting rules:

- decode: bytes = K and V of every context token read once
  (``2 * sum(context_lens) * Hkv * D * itemsize``);
- attention (prefill / mixed): FLOPs = ``4 * sum(visible q.k pairs) * D * H`` (causal: a query at
  position ``p`` sees ``p + 1`` keys, so a full causal prompt counts about half of ``L^2``);
- MoE: FLOPs = ``2 * T * k * (Hd * 2I + I * Hd)``; bytes of expert weights touched =
  ``(number of distinct routed experts) * (Hd * 2I + I * Hd) * itemsize`` (depends on routing,
  so it is counted by ``benchmarks/moe.py`` from the actual ``topk_ids``);
- KV write: bytes = new K and V read once + written once (``4 * T * Hkv * D * itemsize``).

Every shape has a ``tiny`` twin (same structure, CPU-sized) for the smoke test:
``suite(tiny=True)``.

>>> DECODE.kv_bytes / 2**30      # 64 seqs x 4096 tokens x 8 heads x 128 x bf16, K and V
1.0
>>> round(PREFILL_8K.flops / 1e12, 4)   # 4 * (8192 * 8193 / 2) * 128 * 32, in TFLOP
0.5498
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize if dtype != "bfloat16" else 2


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """One query token per sequence over a paged cache (``paged_decode``)."""

    name: str
    num_seqs: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_len: int  # every sequence, including this step's token
    block_size: int = 16
    dtype: str = "bfloat16"
    model: str = ""

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, self

    @property
    def context_lens(self) -> tuple[int, ...]:
        return (self.context_len,) * self.num_seqs

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V of every context token, read once."""
        return 2 * sum(self.context_lens) * self.num_kv_heads * self.head_dim * itemsize(self.dtype)

    @property
    def flops(self) -> int:
        return 4 * sum(self.context_lens) * self.head_dim * self.num_heads


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """A batch of sequences, each ``(cached, new)`` tokens; the ``new`` queries are the tail of
    the context and attend causally (a query at position ``p`` sees keys ``0..p``).
    ``cached == 0`` everywhere is a plain prefill."""

    name: str
    seqs: tuple[tuple[int, int], ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: str = "bfloat16"
    model: str = ""

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, self
        assert all(c >= 0 and n > 0 for c, n in self.seqs), self

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.seqs)

    @property
    def context_lens(self) -> tuple[int, ...]:
        return tuple(c + n for c, n in self.seqs)

    @property
    def is_prefill(self) -> bool:
        """A single plain causal prompt: peers on contiguous KV compute exactly this."""
        return len(self.seqs) == 1 and self.seqs[0][0] == 0

    @property
    def seq_len(self) -> int:
        return max(self.context_lens)

    @property
    def visible_pairs(self) -> int:
        # query j of n sits at p = c + j and sees p + 1 keys: sum_{j<n} (c + j + 1)
        return sum(n * (c + 1) + n * (n - 1) // 2 for c, n in self.seqs)

    @property
    def flops(self) -> int:
        return 4 * self.visible_pairs * self.head_dim * self.num_heads

    @property
    def kv_bytes(self) -> int:
        return 2 * sum(self.context_lens) * self.num_kv_heads * self.head_dim * itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class KVWriteShape:
    """``write_kv`` of ``num_tokens`` new tokens into a cache of ``num_blocks`` blocks."""

    name: str
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: str = "bfloat16"
    cache_factor: int = 2  # the cache holds cache_factor x the blocks written
    model: str = ""

    @property
    def num_blocks(self) -> int:
        return self.cache_factor * math.ceil(self.num_tokens / self.block_size)

    @property
    def bytes(self) -> int:
        """New K and V read once and written once."""
        return 4 * self.num_tokens * self.num_kv_heads * self.head_dim * itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    num_tokens: int
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    dtype: str = "bfloat16"
    activation: str = "silu"
    decode: bool = False  # decode-shaped: judged by TB/s of expert weights touched
    model: str = ""
    bias: bool = False  # expert biases b_gate_up [E, 2I] and b_down [E, Hd] (gpt-oss)
    label: str = ""  # short model name for plots ("DeepSeek-V3")

    @property
    def flops(self) -> int:
        return (
            2
            * self.num_tokens
            * self.top_k
            * (self.hidden * 2 * self.inter + self.inter * self.hidden)
        )

    @property
    def gemm_flops(self) -> dict[str, int]:
        tk = self.num_tokens * self.top_k
        return {
            "gate_up": 2 * tk * self.hidden * 2 * self.inter,
            "down": 2 * tk * self.inter * self.hidden,
        }

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate/up and down)."""
        return 3 * self.hidden * self.inter * itemsize(self.dtype)

    def weight_bytes(self, touched_experts: int) -> int:
        return touched_experts * self.expert_bytes


# ---------------------------------------------------------------------------------------------
# The named shapes (Llama-3-8B attention: 32 query heads, 8 KV heads, head dim 128).

DECODE = DecodeShape(
    "decode_llama3_8b",
    num_seqs=64,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    context_len=4096,
    model="Llama-3-8B, batch 64, 4k context",
)
DECODE_LONG = DecodeShape(
    "decode_long_32k",
    num_seqs=8,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    context_len=32768,
    model="Llama-3-8B, batch 8, 32k context",
)


def prefill(
    seq_len: int,
    *,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    block_size=16,
    name: str | None = None,
) -> AttentionShape:
    if name is None:
        name = f"prefill_{seq_len // 1024}k" if seq_len % 1024 == 0 else f"prefill_{seq_len}"
    return AttentionShape(
        name,
        ((0, seq_len),),
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        model="Llama-3-8B, one causal prompt",
    )


PREFILL_8K = prefill(8192)
MIXED = AttentionShape(
    "mixed_4x2k_2k",
    ((2048, 2048),) * 4,
    32,
    8,
    128,
    model="Llama-3-8B, 4 x (2048 cached + 2048 new)",
)
PREFILL_SWEEP = tuple(prefill(n) for n in (1024, 2048, 4096, 8192, 16384))

KV_WRITE = KVWriteShape(
    "kv_write_64k",
    num_tokens=65536,
    num_kv_heads=8,
    head_dim=128,
    model="Llama-3-8B layer, 65536 new tokens",
)

MOE_MIXTRAL = MoEShape(
    "moe_mixtral",
    num_tokens=4096,
    num_experts=8,
    top_k=2,
    hidden=4096,
    inter=14336,
    model="Mixtral-8x7B, 4096 tokens",
)
MOE_MIXTRAL_DECODE = MoEShape(
    "moe_mixtral_decode",
    num_tokens=64,
    num_experts=8,
    top_k=2,
    hidden=4096,
    inter=14336,
    decode=True,
    model="Mixtral-8x7B, 64 decode tokens",
)
MOE_SMALL_EXPERTS = MoEShape(
    "moe_deepseek_v2_lite",
    num_tokens=4096,
    num_experts=64,
    top_k=6,
    hidden=2048,
    inter=1408,
    model="DeepSeek-V2-Lite routed experts, 4096 tokens",
)

# The MoE model zoo (``--only moe_zoo``): the routed experts of real models, each at 4096 and
# 512 tokens (TFLOP/s) and at 64 decode tokens (TB/s of the expert weights touched).
# name: (label, experts, top-k, hidden, intermediate, activation, expert biases)
MOE_MODELS = {
    "mixtral": ("Mixtral-8x7B", 8, 2, 4096, 14336, "silu", False),
    "qwen3_30b_a3b": ("Qwen3-30B-A3B", 128, 8, 2048, 768, "silu", False),
    "qwen3_235b_a22b": ("Qwen3-235B-A22B", 128, 8, 4096, 1536, "silu", False),
    "gpt_oss_120b": ("gpt-oss-120b", 128, 4, 2880, 2880, "swigluoai", True),
    "deepseek_v3": ("DeepSeek-V3", 256, 8, 7168, 2048, "silu", False),
    "llama4_scout": ("Llama-4-Scout", 16, 1, 5120, 8192, "silu", False),
    "llama4_maverick": ("Llama-4-Maverick", 128, 1, 5120, 8192, "silu", False),
}
ZOO_TOKENS = (4096, 512, 64)
DECODE_TOKENS = 64  # this many tokens or fewer: decode-shaped (TB/s)


def moe_model_shape(model: str, num_tokens: int, *, tiny: bool = False) -> MoEShape:
    """The zoo shape of ``model`` (a :data:`MOE_MODELS` key) at ``num_tokens``; ``tiny``: the
    same routing (experts, top-k, activation, biases) with CPU-sized matrices."""
    label, experts, top_k, hidden, inter, activation, bias = MOE_MODELS[model]
    if tiny:
        experts, hidden, inter = min(experts, 16), 64, 32
    return MoEShape(
        f"{'tiny_' if tiny else ''}zoo_{model}_{num_tokens}",
        num_tokens=num_tokens,
        num_experts=experts,
        top_k=top_k,
        hidden=hidden,
        inter=inter,
        activation=activation,
        decode=num_tokens <= (4 if tiny else DECODE_TOKENS),
        model=f"{label} routed experts, {num_tokens} tokens",
        bias=bias,
        label=label,
    )


def moe_zoo(tiny: bool = False) -> tuple[MoEShape, ...]:
    """Every model of :data:`MOE_MODELS` at each of :data:`ZOO_TOKENS` (model-major);
    ``tiny``: three CPU-sized twins (many experts, gpt-oss's biased SwiGLU, top-1 decode)."""
    if tiny:
        picks = (("qwen3_30b_a3b", 32), ("gpt_oss_120b", 16), ("llama4_maverick", 4))
        return tuple(moe_model_shape(m, t, tiny=True) for m, t in picks)
    return tuple(moe_model_shape(m, t) for m in MOE_MODELS for t in ZOO_TOKENS)


# ---------------------------------------------------------------------------------------------
# CPU-sized twins: same structure (GQA, partial last page, mixed batch, ragged routing).

TINY_DECODE = DecodeShape(
    "tiny_decode", num_seqs=3, num_heads=4, num_kv_heads=2, head_dim=64, context_len=40
)
TINY_DECODE_LONG = DecodeShape(
    "tiny_decode_long", num_seqs=2, num_heads=4, num_kv_heads=2, head_dim=64, context_len=200
)
TINY_PREFILL = prefill(64, num_heads=4, num_kv_heads=2, head_dim=64, name="tiny_prefill_64")
TINY_MIXED = AttentionShape("tiny_mixed", ((24, 20), (16, 16)), 4, 2, 64)
TINY_PREFILL_SWEEP = (
    prefill(32, num_heads=4, num_kv_heads=2, head_dim=64, name="tiny_prefill_32"),
    TINY_PREFILL,
)
TINY_KV_WRITE = KVWriteShape("tiny_kv_write", num_tokens=64, num_kv_heads=2, head_dim=64)
TINY_MOE = MoEShape("tiny_moe", num_tokens=16, num_experts=4, top_k=2, hidden=64, inter=128)
TINY_MOE_DECODE = MoEShape(
    "tiny_moe_decode", num_tokens=4, num_experts=4, top_k=2, hidden=64, inter=128, decode=True
)
TINY_MOE_SMALL = MoEShape(
    "tiny_moe_small_experts", num_tokens=16, num_experts=8, top_k=3, hidden=64, inter=64
)

GROUPS = ("ceilings", "decode", "prefill", "sweep", "moe", "kv_write", "moe_zoo")
# What ``benchmarks.run`` runs without ``--only``: every group but the MoE zoo (21 shapes).
DEFAULT_GROUPS = tuple(g for g in GROUPS if g != "moe_zoo")


def suite(tiny: bool = False) -> dict[str, tuple]:
    """The shapes of each benchmark group (``ceilings`` has none: it sizes its own arrays)."""
    if tiny:
        return {
            "ceilings": (),
            "decode": (TINY_DECODE, TINY_DECODE_LONG),
            "prefill": (TINY_PREFILL, TINY_MIXED),
            "sweep": TINY_PREFILL_SWEEP,
            "moe": (TINY_MOE, TINY_MOE_DECODE, TINY_MOE_SMALL),
            "kv_write": (TINY_KV_WRITE,),
            "moe_zoo": moe_zoo(tiny=True),
        }
    return {
        "ceilings": (),
        "decode": (DECODE, DECODE_LONG),
        "prefill": (PREFILL_8K, MIXED),
        "sweep": PREFILL_SWEEP,
        "moe": (MOE_MIXTRAL, MOE_MIXTRAL_DECODE, MOE_SMALL_EXPERTS),
        "kv_write": (KV_WRITE,),
        "moe_zoo": moe_zoo(),
    }


def to_dict(shape) -> dict:
    d = dataclasses.asdict(shape)
    d["type"] = type(shape).__name__
    return d
