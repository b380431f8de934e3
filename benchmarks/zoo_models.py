"""The model zoo's table: attention layers of real models, the batch points, and the plan.

A :class:`Layer` is one attention configuration (query heads, KV heads, head dim, softcap,
sliding window, sinks); a model with alternating layers (Gemma 2, gpt-oss) has two. A
:class:`Case` is one layer at one batch point and block size, for one entry point:

- ``decode``: one token per sequence, ``B x L`` (timed through ``paged_decode`` and through
  ``paged_attention`` given the same decode-only batch);
- ``serving``: one prefill chunk plus decode rows of ragged contexts, one step (timed as one
  ``paged_attention`` call, and split into a chunk call plus a ``paged_decode`` call);
- ``chunked``: prefill chunks at the tail of longer contexts;
- ``prefill``: one causal prompt (peers on contiguous KV: cuDNN, torch SDPA).

:func:`plan` orders the cases by priority (the budget of a run cuts the tail); the default
selection is sized for one ~420 s device call, ``full=True`` appends every other point, serving
mix, chunked prefill and block size of every layer (run it over several calls with
``--resume``).

Counting (``../shared/PERF.md``): a query at position ``p`` sees ``min(p + 1, window)`` keys;
decode bytes are K and V of every visible context token read once; attention FLOPs are
``4 * visible pairs * D * H``.

>>> visible_pairs(((0, 8192),), None) == 8192 * 8193 // 2
True
>>> visible_pairs(((0, 4),), 2)   # keys seen: 1, 2, 2, 2
7
>>> LAYERS["gemma2_9b_local"].tiny().window, LAYERS["qwen2.5_7b"].tiny().describe()
(24, '7/1/128')
"""

from __future__ import annotations

import dataclasses

import numpy as np

ITEMSIZE = 2  # bfloat16 q and KV


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str  # the --models name
    model: str  # display name
    num_heads: int
    num_kv_heads: int
    head_dim: int
    softcap: float | None = None
    window: int | None = None  # sliding window (keys t > p - window)
    sinks: bool = False  # one learned logit per query head in the softmax denominator
    same_as: str | None = None  # an earlier layer with the identical attention configuration
    tiny_window: int | None = None

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, self

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def describe(self) -> str:
        s = f"{self.num_heads}/{self.num_kv_heads}/{self.head_dim}"
        if self.softcap:
            s += f" softcap {self.softcap:g}"
        if self.window:
            s += f" window {self.window}"
        if self.sinks:
            s += " sinks"
        return s

    def tiny(self) -> Layer:
        """A CPU-sized twin: the same query heads per KV head, head dim, softcap and sinks;
        one KV head; a window that still cuts the tiny contexts."""
        return dataclasses.replace(
            self,
            num_heads=self.group,
            num_kv_heads=1,
            window=self.tiny_window if self.window else None,
        )


# The zoo, in priority order (the most distinctive layouts first: a budget cuts the tail).
# fmt: off
_LAYERS = (
    Layer("llama3_8b", "Llama 3 8B", 32, 8, 128),
    Layer("qwen2.5_7b", "Qwen2.5-7B", 28, 4, 128),
    Layer("gpt_oss_120b_local", "gpt-oss-120b (window layers)", 64, 8, 64, window=128,
          sinks=True, tiny_window=8),
    Layer("gpt_oss_120b_global", "gpt-oss-120b (full layers)", 64, 8, 64, sinks=True),
    Layer("gemma2_9b_local", "Gemma 2 9B (window layers)", 16, 8, 256, softcap=50.0,
          window=4096, tiny_window=24),
    Layer("gemma2_9b_global", "Gemma 2 9B (global layers)", 16, 8, 256, softcap=50.0),
    Layer("phi3_mini", "Phi-3-mini", 32, 32, 96),
    Layer("mistral_7b", "Mistral 7B", 32, 8, 128, window=4096, tiny_window=24),
    Layer("llama3_70b", "Llama 3 70B", 64, 8, 128),
    Layer("llama3_70b_tp8", "Llama 3 70B, 1/8 tensor-parallel shard", 8, 1, 128),
    Layer("qwen3_30b_a3b", "Qwen3-30B-A3B", 32, 4, 128),
    Layer("phi3_medium", "Phi-3-medium", 40, 10, 128),
    Layer("qwen3_8b", "Qwen3-8B", 32, 8, 128, same_as="llama3_8b"),
)
# fmt: on
LAYERS = {layer.name: layer for layer in _LAYERS}
REFERENCE_LAYER = "llama3_8b"  # gets every entry point, the points and the block sweep
BLOCK_SWEEP_LAYERS = ("llama3_8b", "gpt_oss_120b_global")  # the second only with full=True
# Layers whose prefill the default run measures (the distinct layouts: 7 query heads per KV
# head, head dim 64 with sinks and a 128 window, head dim 256 with softcap, head dim 96).
CORE_PREFILL = ("llama3_8b", "qwen2.5_7b", "gpt_oss_120b_local", "gemma2_9b_global", "phi3_mini")

# Batch x context of the decode points; the headline point first.
DECODE_POINTS = ((64, 4096), (1, 131072), (8, 32768), (32, 8192), (256, 2048))
TINY_DECODE_POINTS = ((3, 40), (1, 300), (2, 130), (3, 70), (6, 20))
BLOCK_SIZES = (32, 64, 128)  # the sweep (16 everywhere else)
TINY_BLOCK_SIZES = (32,)


@dataclasses.dataclass(frozen=True)
class Serving:
    """One serving step: a chunk of ``chunk`` tokens ending at ``context``, and
    ``decode_rows`` decode rows with contexts drawn from ``[ctx / 2, 3 ctx / 2)``."""

    chunk: int
    context: int
    decode_rows: int
    decode_ctx: int

    @property
    def label(self) -> str:
        return f"c{self.chunk}@{self.context}+{self.decode_rows}d"

    def seqs(self, seed: int = 0) -> tuple[tuple[int, int], ...]:
        rng = np.random.default_rng(seed)
        c = self.decode_ctx
        lens = rng.integers(c // 2, c + c // 2, self.decode_rows)
        return ((self.context - self.chunk, self.chunk),) + tuple((int(L) - 1, 1) for L in lens)


SERVING = (Serving(512, 4096, 255, 4096), Serving(2048, 16384, 64, 4096))
TINY_SERVING = (Serving(16, 48, 3, 40), Serving(28, 128, 3, 40))
CHUNKED = ((6144, 2048),) * 4  # 4 x 2048-token chunks at 8k context
TINY_CHUNKED = ((32, 16),) * 2
PREFILL = 8192
TINY_PREFILL = 48


@dataclasses.dataclass(frozen=True)
class Case:
    layer: Layer
    entry: str  # decode | serving | chunked | prefill
    seqs: tuple[tuple[int, int], ...]  # (cached, new) per sequence
    block_size: int
    point: str  # label of the batch point

    @property
    def name(self) -> str:
        return f"{self.layer.name}/{self.point}/b{self.block_size}"

    @property
    def key(self) -> str:
        return f"{self.entry}:{self.name}"

    @property
    def context_lens(self) -> tuple[int, ...]:
        return tuple(c + n for c, n in self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.seqs)

    @property
    def window(self) -> int | None:
        return self.layer.window

    def flops(self, seqs=None) -> int:
        L = self.layer
        return (
            4
            * visible_pairs(self.seqs if seqs is None else seqs, L.window)
            * L.head_dim
            * (L.num_heads)
        )

    def kv_bytes(self, seqs=None) -> int:
        """K and V of every key some query of the batch sees, read once."""
        L = self.layer
        keys = sum(keys_touched(c, n, L.window) for c, n in (self.seqs if seqs is None else seqs))
        return 2 * keys * L.num_kv_heads * L.head_dim * ITEMSIZE

    def cache_bytes(self) -> int:
        L = self.layer
        return 2 * sum(self.context_lens) * L.num_kv_heads * L.head_dim * ITEMSIZE

    def q_bytes(self) -> int:
        return self.num_tokens * self.layer.num_heads * self.layer.head_dim * ITEMSIZE


def visible_pairs(seqs, window: int | None) -> int:
    """sum over the queries of the keys each sees: positions ``p = c .. c + n - 1`` see
    ``min(p + 1, window)`` keys."""
    total = 0
    for c, n in seqs:
        a, b = c + 1, c + n  # keys seen without a window: a .. b
        if window is None or b <= window:
            total += (a + b) * n // 2
        elif a > window:
            total += window * n
        else:  # a .. window, then window for the rest
            total += (a + window) * (window - a + 1) // 2 + window * (b - window)
    return total


def keys_touched(cached: int, new: int, window: int | None) -> int:
    """Distinct keys the ``new`` queries of a sequence see."""
    ctx = cached + new
    return ctx if window is None else min(ctx, window + new - 1)


def select_layers(spec: str | None, tiny: bool) -> list[Layer]:
    """Layers named in ``spec`` (comma-separated names or prefixes: ``gemma2_9b`` is both of
    its layers); default all. A ``same_as`` layer is kept only when named exactly."""
    if not spec:
        chosen = [x for x in _LAYERS if x.same_as is None]
    else:
        chosen = []
        for tok in (t.strip() for t in spec.split(",") if t.strip()):
            hits = [x for x in _LAYERS if x.name == tok] or [
                x for x in _LAYERS if x.name.startswith(tok) and x.same_as is None
            ]
            if not hits:
                raise ValueError(f"unknown model {tok!r}; choose from {sorted(LAYERS)}")
            chosen += [x for x in hits if x not in chosen]
        chosen.sort(key=_LAYERS.index)
    return [x.tiny() if tiny else x for x in chosen]


def plan(layers, *, tiny: bool = False, full: bool = False, named: bool = False) -> list[Case]:
    """The cases of ``layers`` in priority order (see the module doc).

    The default (``named=False``: no ``--models``) is sized for one ~420 s device call: the
    reference layer's decode, serving step and prefill; every layer's headline decode; prefill
    of the layers in :data:`CORE_PREFILL`; two more decode points and the block sweep of the
    decode on the reference layer; its chunked prefill. With ``named`` every chosen layer gets
    its decode and prefill first. ``full`` appends the rest: every layer's prefill, points,
    serving mixes and chunked prefill, the prefill block sweep, the second sweep layer.
    """
    points = TINY_DECODE_POINTS if tiny else DECODE_POINTS
    serving = TINY_SERVING if tiny else SERVING
    chunked = TINY_CHUNKED if tiny else CHUNKED
    prefill = TINY_PREFILL if tiny else PREFILL
    sweep = TINY_BLOCK_SIZES if tiny else BLOCK_SIZES

    def decode(layer, point, bs=16):
        b, ctx = point
        return Case(layer, "decode", ((ctx - 1, 1),) * b, bs, f"{b}x{ctx}")

    def serve(layer, s, bs=16):
        return Case(layer, "serving", s.seqs(), bs, s.label)

    def chunks(layer, bs=16):
        c, n = chunked[0]
        return Case(layer, "chunked", chunked, bs, f"{len(chunked)}x{n}@{c + n}")

    def causal(layer, bs=16):
        return Case(layer, "prefill", ((0, prefill),), bs, f"1x{prefill}")

    out = []
    ref = [x for x in layers if x.name == REFERENCE_LAYER]
    for layer in ref:
        out += [decode(layer, points[0]), serve(layer, serving[0]), causal(layer)]
    for layer in layers:
        if layer.name != REFERENCE_LAYER:
            out.append(decode(layer, points[0]))
            if named:
                out.append(causal(layer))
    if not named:
        out += [causal(x) for x in layers if x.name in CORE_PREFILL[1:]]
    for layer in ref:
        if not tiny:  # the smoke run keeps to the headline point and block size
            out += [decode(layer, points[1]), decode(layer, points[4])]
            out += [decode(layer, points[0], bs) for bs in sweep]
        out.append(chunks(layer))
    if full:
        if tiny:
            out += [decode(x, p) for x in ref for p in (points[1], points[4])]
            out += [decode(x, points[0], bs) for x in ref for bs in sweep]
        if not named:
            out += [causal(x) for x in layers if x.name not in CORE_PREFILL]
        for layer in ref:
            out += [decode(layer, points[2]), decode(layer, points[3])]
            out += [causal(layer, bs) for bs in sweep]
        for layer in layers:
            if layer.name != REFERENCE_LAYER:
                out += [serve(layer, serving[0]), chunks(layer)]
                out += [decode(layer, p) for p in points[1:]]
            out.append(serve(layer, serving[1]))
            if layer.name in BLOCK_SWEEP_LAYERS[1:]:
                out += [decode(layer, points[0], bs) for bs in sweep]
    return out
