"""Metadata fuzzer: random serving batches on every backend against the float64 oracle.

Each case is a fresh batch: a random number of sequences mixing decode rows (q_len 1), prefill
chunks (q_len up to the context) and inactive sequences (context 0), contexts on and around
block boundaries, permuted block tables (entries past each sequence: spare pages or random,
mostly out-of-range ids), NaN in every unused page, slot and padding query row.
A quarter of the cases are decode-only batches for ``paged_decode``.

Static shapes are fixed (rows, sequences, table width, cache size), so one compilation per
backend and *configuration* (GQA ratio, KV dtype, sliding window, softcap, whether ALiBi
slopes and sinks are passed: the static choices, drawn at random per run) serves all of its
cases; the metadata, the ALiBi slopes and the sinks are arrays, drawn per case.

Cases per backend: ``--fuzz-cases`` / ``JPA_FUZZ_CASES`` (default 50). A failure prints the
case and the command that replays it (``JPA_SEED``, ``JPA_FUZZ_ONLY=<case>``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn.testing import FP8, assert_close, build_case
from tests.conftest import SEED, run_kw, suite_dtype, supports

HEAD_DIM = 64
BLOCK_SIZE = 16
NUM_SEQS = 8  # sequences per batch (inactive ones fill the rest)
MAX_BLOCKS = 8  # table width: contexts of up to 128 tokens
NUM_ROWS = 128  # query rows per batch (padding rows fill the rest)
NUM_BLOCKS = NUM_SEQS * MAX_BLOCKS + 4  # every sequence at full length, plus NaN spares
DECODE_SHARE = 0.25
ONLY = os.environ.get("JPA_FUZZ_ONLY")  # a case index to replay alone


def num_configs(cases: int) -> int:
    return min(max(1, cases // 12), 16)


def pytest_generate_tests(metafunc):
    if "config_index" in metafunc.fixturenames:
        n = num_configs(metafunc.config.getoption("--fuzz-cases"))
        metafunc.parametrize("config_index", range(n), ids=[f"config{c}" for c in range(n)])


@dataclasses.dataclass(frozen=True)
class Config:
    """The static choices: one compilation each."""

    num_kv_heads: int
    group: int  # query heads per KV head
    kv_dtype: str
    sliding_window: int | None
    softcap: float | None
    alibi: bool
    sinks: bool

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group


def _rng(backend: str, *key: int) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(backend.encode()), *key])


def draw_config(backend: str, index: int) -> Config:
    rng = _rng(backend, 1, index)
    dtype = suite_dtype(backend)
    fp8 = rng.random() < 0.35 and supports(
        backend, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, q_dtype=dtype, kv_dtype=FP8
    )
    return Config(
        num_kv_heads=int(rng.choice([1, 2])),
        group=int(rng.choice([1, 2, 3, 4])),
        kv_dtype=jnp.dtype(FP8 if fp8 else dtype).name,
        sliding_window=int(rng.integers(1, 80)) if rng.random() < 0.4 else None,
        softcap=float(np.round(rng.uniform(2.0, 50.0), 2)) if rng.random() < 0.4 else None,
        alibi=bool(rng.random() < 0.4),
        sinks=bool(rng.random() < 0.4),
    )


def _context(rng) -> int:
    """A context length: half of them on a block boundary or one token either side."""
    top = MAX_BLOCKS * BLOCK_SIZE
    if rng.random() < 0.5:
        blocks = int(rng.integers(1, MAX_BLOCKS + 1))
        return int(np.clip(blocks * BLOCK_SIZE + rng.integers(-1, 2), 1, top))
    return int(rng.integers(1, top + 1))


def draw_batch(rng) -> tuple[str, list[tuple[int, int]]]:
    """``(kind, [(q_len, context_len)] * NUM_SEQS)``; kind is "decode" (one row per sequence,
    for paged_decode) or "mixed" (decode rows, prefill chunks and inactive sequences)."""
    active = int(rng.integers(1, NUM_SEQS + 1))
    if rng.random() < DECODE_SHARE:
        seqs = [(1, _context(rng)) for _ in range(active)]
        seqs += [(1, 0)] * (NUM_SEQS - active)
        return "decode", [seqs[i] for i in rng.permutation(NUM_SEQS)]
    seqs, rows = [], NUM_ROWS
    for _ in range(active):
        kind = rng.choice(["decode", "prefill", "inactive"], p=[0.4, 0.45, 0.15])
        ctx = _context(rng)
        if kind == "inactive" or rows == 0:
            seqs.append((0, 0))
        elif kind == "decode":
            seqs.append((1, ctx))
            rows -= 1
        else:  # a whole prompt or a chunk of one (its tail: the context before it is cached)
            n = ctx if rng.random() < 0.3 else int(rng.integers(1, ctx + 1))
            n = min(n, rows)
            seqs.append((n, ctx))
            rows -= n
    seqs += [(0, 0)] * (NUM_SEQS - active)
    return "mixed", [seqs[i] for i in rng.permutation(NUM_SEQS)]


@dataclasses.dataclass
class FuzzCase:
    index: int
    kind: str
    seqs: list
    opts: dict  # the array options (alibi_slopes, sinks) as float32 NumPy
    junk_tables: bool

    def describe(self, backend: str, config: Config, cases: int) -> str:
        opts = {k: np.round(v.astype(np.float64), 4).tolist() for k, v in self.opts.items()}
        return (
            f"case {self.index} ({self.kind}) on backend={backend}: {config}\n"
            f"  (q_len, context_len) per sequence: {self.seqs}\n"
            f"  rows {NUM_ROWS}, head_dim {HEAD_DIM}, block_size {BLOCK_SIZE}, "
            f"table width {MAX_BLOCKS}, {NUM_BLOCKS} blocks; junk table entries "
            f"{self.junk_tables}; array options {opts}\n"
            f"  replay: JPA_SEED={SEED} JPA_FUZZ_CASES={cases} JPA_FUZZ_ONLY={self.index} "
            f"python -m pytest -q -n 0 tests/test_fuzz.py --backends={backend}"
        )


def draw_case(backend: str, config: Config, index: int):
    rng = _rng(backend, 2, index)
    kind, seqs = draw_batch(rng)
    opts = {}
    if config.alibi:
        opts["alibi_slopes"] = rng.uniform(0.0, 0.5, config.num_heads).astype(np.float32)
    if config.sinks:
        opts["sinks"] = rng.uniform(-2.0, 4.0, config.num_heads).astype(np.float32)
    rows = sum(n for n, _ in seqs)
    junk = bool(rng.random() < 0.5)  # table entries past each sequence: any id, else spare pages
    case = build_case(
        rng,
        seqs,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
        dtype=suite_dtype(backend),
        kv_dtype=jnp.dtype(config.kv_dtype),
        pad_rows=0 if kind == "decode" else NUM_ROWS - rows,
        num_blocks=NUM_BLOCKS,
        max_blocks=MAX_BLOCKS,
        junk_tables=junk,
    )
    if kind == "decode":  # rows of inactive sequences are padding too: NaN
        idle = np.array([ctx == 0 for _, ctx in seqs])
        case.q = case.q.at[np.flatnonzero(idle)].set(jnp.nan)
    return FuzzCase(index, kind, seqs, opts, junk), case


@functools.cache
def _compiled(backend: str, config: Config):
    """The jitted calls of one configuration (shapes fixed: compiled once each)."""
    static = dict(softcap=config.softcap, sliding_window=config.sliding_window, **run_kw(backend))

    @jax.jit
    def attention(q, cache, meta, opts):
        return jpa.paged_attention(q, cache, meta, **opts, **static)

    @jax.jit
    def decode(q, cache, meta, opts):
        return jpa.paged_decode(q, cache, meta.block_tables, meta.context_lens, **opts, **static)

    return attention, decode


def _worst_row(out, ref, case) -> str:
    """Where the largest error (or the first non-finite value) sits: row, sequence, position."""
    err = np.abs(np.asarray(out.astype(jnp.float32), np.float64) - ref)
    err = np.where(np.isfinite(err), err, np.inf).max(axis=(1, 2))
    row = int(err.argmax())
    cu, lens = case.cu_seqlens_q, case.context_lens
    if row >= cu[-1]:
        return f"worst row {row}: a padding row (rows {cu[-1]}: are padding)"
    seq = int(np.searchsorted(cu, row, side="right") - 1)
    n, ctx = int(cu[seq + 1] - cu[seq]), int(lens[seq])
    return (
        f"worst row {row}: sequence {seq} (q_len {n}, context {ctx}), position "
        f"{ctx - n + row - cu[seq]}, block-table row {np.asarray(case.meta.block_tables)[seq]}"
    )


def _check(backend, config, fuzz, case):
    attention, decode = _compiled(backend, config)
    opts = {k: jnp.asarray(v) for k, v in fuzz.opts.items()}
    call = decode if fuzz.kind == "decode" else attention
    out = call(case.q, case.cache, case.meta, opts)
    ref = case.reference(softcap=config.softcap, sliding_window=config.sliding_window, **fuzz.opts)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    try:
        assert_close(out, ref, case.q.dtype, what="output vs float64 oracle")
    except AssertionError as e:
        raise AssertionError(f"{e}\n  {_worst_row(out, ref, case)}") from None
    empty = np.all(ref == 0, axis=(1, 2))  # padding rows, inactive sequences: exact zeros
    bad = np.flatnonzero(np.any(np.asarray(out.astype(jnp.float32))[empty] != 0, axis=(1, 2)))
    assert bad.size == 0, f"rows with no visible key are not zero: {np.flatnonzero(empty)[bad]}"


def test_fuzz_batches(backend, config_index, request):
    cases = request.config.getoption("--fuzz-cases")
    configs = num_configs(cases)
    config = draw_config(backend, config_index)
    if not supports(
        backend,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
        q_dtype=suite_dtype(backend),
        kv_dtype=config.kv_dtype,
    ):
        pytest.fail(f"{backend} cannot run the fuzzer's base configuration {config}")
    mine = [i for i in range(cases) if i % configs == config_index]
    if ONLY is not None:
        if int(ONLY) % configs != config_index:
            pytest.skip(f"replaying case {ONLY} alone (configuration {int(ONLY) % configs})")
        mine = [int(ONLY)]
    failures = []
    for i in mine:
        fuzz, case = draw_case(backend, config, i)
        try:
            _check(backend, config, fuzz, case)
        except AssertionError as e:
            failures.append(f"{fuzz.describe(backend, config, cases)}\n  {e}")
    for fn in _compiled(backend, config):
        assert fn._cache_size() <= 1, "a new batch composition recompiled"
    if failures:
        pytest.fail(f"{len(failures)} of {len(mine)} cases failed:\n\n" + "\n\n".join(failures))
