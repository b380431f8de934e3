"""A serving loop: continuous batching with chunked prefill over the paged KV cache.

Each :meth:`Engine.step` builds ONE flat batch: a decode row for every running request that has
finished its prompt, then prefill chunks of the others (oldest first) until the token budget is
spent. New requests join between steps while others decode. The batch has a few fixed shapes
(``max_seqs`` sequences, ``max_blocks_per_seq`` blocks each, and ``T`` rows: the step's rows
rounded up to ``max_seqs * 2^k``, at most the token budget), so the jitted step compiles once
per row bucket and a decode-only step computes ``max_seqs`` rows, not the whole budget; each
layer makes one ``write_kv`` + ``paged_attention`` call per step. Full
prompt blocks are shared through the prefix cache (:mod:`.allocator`). Sampling runs on the
device (:mod:`.sampling`); tokens stream to a per-request callback and out of
:meth:`Engine.stream`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import jax_paged_attn as jpa
from jax_paged_attn.models import model as M
from jax_paged_attn.models.allocator import BlockAllocator, block_hashes
from jax_paged_attn.models.loader import Model
from jax_paged_attn.models.sampling import SamplingParams, sample


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress (``output``: the generated token ids)."""

    request_id: object
    prompt: list[int]
    sampling: SamplingParams
    on_token: Callable | None = None  # on_token(request, token) after each generated token
    output: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "length" or "stop"
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    logits: dict = dataclasses.field(default_factory=dict)  # position -> logits (keep_logits)
    # scheduler state
    slot: int = -1
    blocks: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose KV is in the cache
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    registered: int = 0  # prompt blocks published to the prefix cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request: Request
    token: int
    finished: bool


def _step(cfg, backend, keep_all, params, caches, batch):
    hidden, caches = M.paged_forward(
        cfg, params, caches, batch["tokens"], batch["positions"], batch["meta"], backend=backend
    )
    if keep_all:
        everything = M.lm_logits(cfg, params, hidden)
        last = everything[batch["last_rows"]]
    else:
        everything, last = None, M.lm_logits(cfg, params, hidden[batch["last_rows"]])
    tokens = sample(last, batch["temperature"], batch["top_p"], batch["seeds"], batch["counters"])
    return tokens, everything, caches


class Engine:
    """Serves a :class:`~jax_paged_attn.models.loader.Model`; see the module docstring.

    Args:
      block_size: tokens per KV-cache block.
      max_seqs: sequences in one batch (``S``).
      token_budget: most rows per step: decode tokens + prefill chunks; ``>= max_seqs`` (a step
        compiles for the smallest ``max_seqs * 2^k`` that holds its rows, see ``rows_for``).
      max_model_len: longest prompt + generation (sets ``max_blocks_per_seq``).
      num_blocks: cache blocks per layer (default: enough for ``max_seqs`` full sequences).
      prefill_chunk: most prompt tokens of one request per step (default: the budget).
      keep_logits: record every row's logits in ``Request.logits`` (for checks).
    """

    def __init__(
        self,
        model: Model,
        *,
        block_size: int = 16,
        max_seqs: int = 8,
        token_budget: int = 256,
        max_model_len: int | None = None,
        num_blocks: int | None = None,
        prefill_chunk: int | None = None,
        prefix_caching: bool = True,
        backend: str = "auto",
        cache_dtype=None,
        keep_logits: bool = False,
    ):
        cfg = model.config
        if token_budget < max_seqs:
            raise ValueError(
                f"token_budget ({token_budget}) must be >= max_seqs ({max_seqs}): every running "
                "sequence needs a row to decode"
            )
        self.model, self.cfg = model, cfg
        self.block_size, self.max_seqs, self.token_budget = block_size, max_seqs, token_budget
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, 4096)
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        num_blocks = num_blocks or max_seqs * self.max_blocks_per_seq
        self.prefill_chunk = prefill_chunk or token_budget
        self.keep_logits = keep_logits
        self.allocator = BlockAllocator(num_blocks, prefix_caching=prefix_caching)
        self.caches = M.init_caches(cfg, num_blocks, block_size, cache_dtype or model.dtype)
        self._step = jax.jit(
            functools.partial(_step, cfg, backend, keep_logits), donate_argnums=(1,)
        )
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * max_seqs
        self._order = itertools.count()
        self._arrival: dict[int, int] = {}
        self.stats = collections.Counter()  # steps, prompt/cached/generated tokens
        self.busy_s = 0.0  # time in steps that did not compile (a row bucket's first step does)
        self.row_buckets: set[int] = set()  # the T of every compiled step

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self, prompt, sampling: SamplingParams | None = None, *, request_id=None, on_token=None
    ) -> Request:
        """Queues a request (it joins the batch at the next step with room for it)."""
        prompt = [int(t) for t in prompt]
        sampling = sampling or SamplingParams()
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside [0, {self.cfg.vocab_size})")
        length = len(prompt) + sampling.max_new_tokens
        if length > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)}) + max_new_tokens ({sampling.max_new_tokens}) = {length} "
                f"exceeds max_model_len {self.max_model_len}"
            )
        if self._blocks_needed(len(prompt), sampling) > self.allocator.num_blocks:
            raise ValueError(f"the request needs more than all {self.allocator.num_blocks} blocks")
        rid = next(self._order) if request_id is None else request_id
        req = Request(rid, prompt, sampling, on_token)
        req.hashes = block_hashes(prompt, self.block_size)
        self._arrival[id(req)] = len(self._arrival)
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def _blocks_needed(self, prompt_len: int, sampling: SamplingParams) -> int:
        # the last generated token is never fed back, so its KV is never written
        return -(-(prompt_len + sampling.max_new_tokens - 1) // self.block_size)

    def _reserved(self) -> int:
        """Blocks the running requests may still take."""
        return sum(
            self._blocks_needed(len(r.prompt), r.sampling) - len(r.blocks)
            for r in self.slots
            if r is not None
        )

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            req = self.waiting[0]
            # Reuse only blocks before the one holding the last prompt token: that token is
            # always computed, so no request ever writes into a shared block.
            reusable = req.hashes[: (len(req.prompt) - 1) // self.block_size]
            cached = self.allocator.lookup(reusable)
            need = self._blocks_needed(len(req.prompt), req.sampling) - len(cached)
            if need > self.allocator.num_available - self._reserved():
                self.allocator.release(cached)
                return
            self.waiting.popleft()
            req.slot = self.slots.index(None)
            self.slots[req.slot] = req
            req.blocks, req.registered = list(cached), len(cached)
            req.computed = req.cached_tokens = len(cached) * self.block_size
            self.stats["cached_tokens"] += req.computed

    # -- one step ---------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[Request, int]]:
        running = [r for r in self.slots if r is not None]
        decoding = [r for r in running if r.computed >= len(r.prompt)]
        prefilling = sorted(
            (r for r in running if r.computed < len(r.prompt)), key=lambda r: self._arrival[id(r)]
        )
        budget, plan = self.token_budget, []
        for req in decoding:
            plan.append((req, 1))
            budget -= 1
        for req in prefilling:
            n = min(len(req.prompt) - req.computed, budget, self.prefill_chunk)
            if n > 0:
                plan.append((req, n))
                budget -= n
        for req, n in plan:
            while len(req.blocks) * self.block_size < req.computed + n:
                req.blocks.append(self.allocator.allocate())
        return sorted(plan, key=lambda p: p[0].slot)

    def rows_for(self, num_rows: int) -> int:
        """The compiled row count ``T`` of a step with ``num_rows`` rows: ``max_seqs * 2^k``
        (the smallest that holds them), at most the token budget."""
        t = self.max_seqs
        while t < num_rows:
            t *= 2
        return min(t, self.token_budget)

    def row_bucket_sizes(self) -> list[int]:
        """Every ``T`` a step can compile for (``rows_for``)."""
        sizes = {self.rows_for(1)}
        while max(sizes) < self.token_budget:
            sizes.add(self.rows_for(max(sizes) + 1))
        return sorted(sizes)

    def warmup(self) -> None:
        """Compiles the step for every row bucket (padding-only batches: nothing is written to
        the cache, no request changes), so no later step pays a compile."""
        for t in self.row_bucket_sizes():
            if t not in self.row_buckets:
                batch = jax.tree.map(jnp.asarray, self._batch([], rows=t))
                tokens, _, self.caches = self._step(self.model.params, self.caches, batch)
                jax.block_until_ready(tokens)
                self.row_buckets.add(t)

    def _batch(self, plan, rows=None):
        t = rows or self.rows_for(sum(n for _, n in plan))
        s, bs = self.max_seqs, self.block_size
        tokens, positions = np.zeros(t, np.int32), np.zeros(t, np.int32)
        slots = np.full(t, -1, np.int32)
        tables = np.zeros((s, self.max_blocks_per_seq), np.int32)
        lens, q_lens = np.zeros(s, np.int32), np.zeros(s, np.int32)
        last_rows, counters = np.zeros(s, np.int32), np.zeros(s, np.uint32)
        temperature, top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
        seeds = np.zeros(s, np.uint32)
        row = 0
        for req, n in plan:
            i, start = req.slot, req.computed
            pos = np.arange(start, start + n)
            blocks = np.asarray(req.blocks, np.int32)
            tokens[row : row + n] = req.tokens[start : start + n]
            positions[row : row + n] = pos
            slots[row : row + n] = blocks[pos // bs] * bs + pos % bs
            tables[i, : len(blocks)] = blocks
            lens[i], q_lens[i], last_rows[i] = start + n, n, row + n - 1
            sp = req.sampling
            temperature[i], top_p[i], seeds[i] = sp.temperature, sp.top_p, sp.seed
            counters[i] = len(req.output)
            row += n
        meta = jpa.AttentionMetadata(
            tables, lens, np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32), slots
        )
        return dict(
            tokens=tokens,
            positions=positions,
            meta=meta,
            last_rows=last_rows,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
            counters=counters,
        )

    def step(self) -> list[TokenEvent]:
        """Admits waiting requests, runs one batch, and returns this step's new tokens."""
        self._admit()
        plan = self._schedule()
        if not plan:
            if self.has_work():  # add_request's checks make this unreachable; never spin
                raise RuntimeError("no request could be scheduled: the KV cache is too small")
            return []
        batch = jax.tree.map(jnp.asarray, self._batch(plan))
        rows = batch["tokens"].shape[0]
        timed = rows in self.row_buckets  # else this step compiles
        self.row_buckets.add(rows)
        start = time.perf_counter()
        tokens, logits, self.caches = self._step(self.model.params, self.caches, batch)
        tokens = np.asarray(tokens)
        if timed:
            self.busy_s += time.perf_counter() - start
        self.stats["steps"] += 1
        logits = None if logits is None else np.asarray(logits)
        events, row = [], 0
        for req, n in plan:
            if logits is not None:
                for j in range(n):
                    req.logits[req.computed + j] = logits[row + j]
            row += n
            req.computed += n
            self.stats["prompt_tokens" if req.computed <= len(req.prompt) else "decode_rows"] += n
            full = min(req.computed, len(req.prompt)) // self.block_size
            while req.registered < full:
                self.allocator.register(req.blocks[req.registered], req.hashes[req.registered])
                req.registered += 1
            if req.computed == len(req.tokens):  # this row's sample is the next token
                events.append(self._emit(req, int(tokens[req.slot])))
        self.stats["timed_tokens"] += len(events) if timed else 0
        return events

    def _emit(self, req: Request, token: int) -> TokenEvent:
        req.output.append(token)
        self.stats["generated_tokens"] += 1
        sp = req.sampling
        stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.cfg.eos_token_ids))
        if token in stops or len(req.output) >= sp.max_new_tokens:
            req.finished = True
            req.finish_reason = "stop" if token in stops else "length"
            self.allocator.release(req.blocks)
            req.blocks = []
            self.slots[req.slot] = None
        if req.on_token is not None:
            req.on_token(req, token)
        return TokenEvent(req, token, req.finished)

    # -- driving loops ----------------------------------------------------------------------

    def stream(self) -> Iterator[TokenEvent]:
        """Steps until no request is left, yielding each new token as it is produced (requests
        added while iterating join the running batch)."""
        while self.has_work():
            yield from self.step()

    def generate(
        self, prompts: Iterable, sampling: SamplingParams | None = None, *, progress: bool = True
    ) -> list[Request]:
        """Runs ``prompts`` (lists of token ids) to completion; returns their requests."""
        requests = [self.add_request(p, sampling) for p in prompts]
        bar = Progress(sum(r.sampling.max_new_tokens for r in requests), enabled=progress)
        for event in self.stream():
            bar.update(event, self)
        bar.close()
        return requests

    def tokens_per_second(self) -> float:
        """Generated tokens per second of step time, the compiling steps left out."""
        return self.stats["timed_tokens"] / self.busy_s if self.busy_s > 0 else 0.0


class Progress:
    """A progress bar over generated tokens: tqdm when installed, else one status line."""

    def __init__(self, total: int, *, enabled: bool = True, stream=None):
        self.total, self.enabled, self.done, self.finished = total, enabled, 0, 0
        self.stream = stream or sys.stderr
        self._last = 0.0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="tok", file=self.stream)

    def update(self, event: TokenEvent, engine: Engine | None = None) -> None:
        step = 1
        if event.finished:
            self.finished += 1
            step += event.request.sampling.max_new_tokens - len(event.request.output)
        self.done += step
        if not self.enabled:
            return
        rate = engine.tokens_per_second() if engine is not None else 0.0
        if self.bar is not None:
            self.bar.update(step)
            self.bar.set_postfix(done=self.finished, tok_s=f"{rate:.1f}")
        elif time.monotonic() - self._last > 0.5 or self.done >= self.total:
            self._last = time.monotonic()
            print(
                f"\r{self.done}/{self.total} tokens, {self.finished} requests done, "
                f"{rate:.1f} tok/s",
                end="",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=self.stream)
