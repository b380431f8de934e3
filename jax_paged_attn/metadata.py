"""Attention metadata: which query rows belong to which sequence, and where its KV lives.

All fields are array leaves of a registered pytree, so a new batch composition (other
lengths, other blocks) never recompiles while the shapes stay the same.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jax_paged_attn import _checks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step metadata of a batch of sequences over a paged KV cache.

    Attributes:
      block_tables: ``i32[S, MB]``; ``block_tables[i, b]`` is the cache block holding tokens
        ``b*BS : (b+1)*BS`` of sequence ``i``. Entries past ``ceil(context_lens[i] / BS)`` are
        never read and may hold anything.
      context_lens: ``i32[S]``; KV tokens of sequence ``i`` *including* this step's (vLLM's
        ``seq_lens``). ``0`` marks an inactive (padding) sequence.
      cu_seqlens_q: ``i32[S+1]``; the queries of sequence ``i`` are rows
        ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``. Rows past ``cu_seqlens_q[S]`` are padding.
      slot_mapping: ``i32[T]`` or None; cache slot of each new token (``block * BS + offset``,
        ``< 0`` for padding), used by ``write_kv`` and the ``PagedAttention`` layer.

    >>> import jax.numpy as jnp
    >>> # 2 sequences, block size 16: a 45-token prompt chunk (45 tokens -> 3 blocks, the last
    >>> # holds 13) and one decode token of a sequence now 17 tokens long (2 blocks).
    >>> meta = AttentionMetadata(
    ...     block_tables=jnp.array([[4, 0, 7], [2, 5, 0]], jnp.int32),
    ...     context_lens=jnp.array([45, 17], jnp.int32),
    ...     cu_seqlens_q=jnp.array([0, 45, 46], jnp.int32))
    >>> meta.num_seqs
    2
    """

    block_tables: jax.Array
    context_lens: jax.Array
    cu_seqlens_q: jax.Array
    slot_mapping: jax.Array | None = None

    @classmethod
    def decode(cls, block_tables, context_lens, slot_mapping=None) -> AttentionMetadata:
        """Metadata for one query per sequence: ``cu_seqlens_q = arange(S + 1)``.

        >>> import jax.numpy as jnp
        >>> meta = AttentionMetadata.decode(jnp.zeros((3, 4), jnp.int32),
        ...                                 jnp.array([5, 0, 9], jnp.int32))
        >>> meta.cu_seqlens_q.tolist()
        [0, 1, 2, 3]
        """
        block_tables = _checks.int_array("block_tables", block_tables, ndim=2)
        num_seqs = block_tables.shape[0]
        return cls(
            block_tables, context_lens, jnp.arange(num_seqs + 1, dtype=jnp.int32), slot_mapping
        )

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]


def validated(
    meta: AttentionMetadata, *, num_tokens: int | None = None, need_slots: bool = False
) -> AttentionMetadata:
    """Shape/dtype checks of ``meta`` (trace time); returns it with int32 leaves."""
    if not isinstance(meta, AttentionMetadata):
        raise ValueError(f"meta must be an AttentionMetadata, got {type(meta).__name__}")
    block_tables = _checks.int_array("meta.block_tables", meta.block_tables, ndim=2)
    num_seqs = block_tables.shape[0]
    context_lens = _checks.int_array(
        "meta.context_lens", meta.context_lens, ndim=1, shape=(num_seqs,)
    )
    cu_seqlens_q = _checks.int_array(
        "meta.cu_seqlens_q", meta.cu_seqlens_q, ndim=1, shape=(num_seqs + 1,)
    )
    slot_mapping = meta.slot_mapping
    if slot_mapping is not None:
        shape = None if num_tokens is None else (num_tokens,)
        slot_mapping = _checks.int_array("meta.slot_mapping", slot_mapping, ndim=1, shape=shape)
    elif need_slots:
        raise ValueError(
            "meta.slot_mapping must be set: the layer writes this step's k, v through it"
        )
    return AttentionMetadata(block_tables, context_lens, cu_seqlens_q, slot_mapping)


def metadata_checks(cache, meta: AttentionMetadata, num_tokens: int | None = None) -> None:
    """The value checks of :func:`check_metadata` as ``checkify.check`` calls (the same
    conditions, from the same masks); a checkified function reports the first that fails.

    Call it inside a function you transform with ``checkify.checkify`` (jit-compatible).
    """
    meta = validated(meta)
    v = _violations(cache, meta)
    cu = meta.cu_seqlens_q
    checkify.check(~jnp.any(v["bad_ids"]), "meta.block_tables: a block id in use is outside "
                   "[0, {})", jnp.int32(cache.num_blocks))  # fmt: skip
    checkify.check(cu[0] == 0, "meta.cu_seqlens_q[0] must be 0, got {}", cu[0])
    checkify.check(~jnp.any(v["decreasing_cu"]), "meta.cu_seqlens_q must be non-decreasing")
    if num_tokens is not None:
        checkify.check(
            cu[-1] <= num_tokens,
            "meta.cu_seqlens_q[-1] = {} exceeds the number of query rows T = {}",
            cu[-1],
            jnp.int32(num_tokens),
        )
    checkify.check(~jnp.any(v["negative_lens"]), "meta.context_lens must be >= 0")
    checkify.check(
        ~jnp.any(v["long_lens"]),
        "meta.context_lens: a context is longer than its block-table row holds ({} tokens)",
        jnp.int32(meta.block_tables.shape[1] * cache.block_size),
    )
    checkify.check(
        ~jnp.any(v["rows_without_keys"]),
        "meta.cu_seqlens_q: a sequence has more query rows than context tokens "
        "(its first rows see no key)",
    )
    if meta.slot_mapping is not None:
        checkify.check(
            ~jnp.any(v["big_slots"]),
            "meta.slot_mapping: a slot is >= num_blocks * block_size = {}",
            jnp.int32(cache.num_blocks * cache.block_size),
        )
        checkify.check(~jnp.any(v["dup_slots"]), "meta.slot_mapping: duplicate slots")


@jax.jit
def _violations(cache, meta):
    """Masks of every metadata value that breaks the contract (see :func:`check_metadata`)."""
    nb, bs = cache.num_blocks, cache.block_size
    cu, lens, tables = meta.cu_seqlens_q, meta.context_lens, meta.block_tables
    used = jnp.arange(tables.shape[1])[None, :] < ((jnp.maximum(lens, 0) + bs - 1) // bs)[:, None]
    n_q = cu[1:] - cu[:-1]
    out = dict(
        bad_ids=used & ((tables < 0) | (tables >= nb)),  # [S, MB]
        negative_lens=lens < 0,
        long_lens=lens > tables.shape[1] * bs,
        decreasing_cu=n_q < 0,
        rows_without_keys=(n_q > lens) & (lens > 0),
    )
    if meta.slot_mapping is not None:
        slots = meta.slot_mapping
        order = jnp.argsort(slots)
        ordered = slots[order]
        again = (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)
        dup = jnp.zeros(slots.shape, bool).at[order[1:]].set(again)  # 2nd, 3rd.. of a value
        out["dup_slots"] = dup
        out["big_slots"] = slots >= nb * bs
    return out


def _where(mask) -> list:
    return [tuple(int(i) for i in ix) if len(ix) > 1 else int(ix[0]) for ix in np.argwhere(mask)]


def check_metadata(cache, meta: AttentionMetadata, *, num_tokens: int | None = None) -> None:
    """Debug check of what cannot be checked at trace time; raises one ``ValueError`` that
    lists every violation, each line naming the field (call it outside ``jax.jit``).

    Reports: block ids of used blocks outside ``[0, num_blocks)`` (with their positions);
    ``cu_seqlens_q[0] != 0``, decreasing ``cu_seqlens_q``, ``cu_seqlens_q[-1] > T``; negative
    ``context_lens`` and contexts longer than their block-table row (``MB * BS`` tokens);
    sequences with more query rows than context tokens; slots past the cache and duplicate
    non-negative slots. ``T`` is ``num_tokens`` (the rows of ``q``), else the length of
    ``meta.slot_mapping``; with neither, this raises, since the row count cannot be checked.
    Inside your own jitted code use :func:`metadata_checks` under ``checkify.checkify``.

    >>> import jax.numpy as jnp
    >>> from jax_paged_attn import KVCache
    >>> cache = KVCache.init(4, 16, 1, 8, jnp.float32)
    >>> meta = AttentionMetadata(jnp.array([[1, 9]], jnp.int32), jnp.array([20], jnp.int32),
    ...                          jnp.array([0, 1], jnp.int32))
    >>> check_metadata(cache, meta, num_tokens=1)
    Traceback (most recent call last):
    ...
    ValueError: meta.block_tables: block ids in use outside [0, 4): [9] at (seq, block) [(0, 1)]
    """
    meta = validated(meta)
    if num_tokens is None:
        if meta.slot_mapping is None:
            raise ValueError(
                "num_tokens must be given (the rows of q) when meta has no slot_mapping: "
                "cu_seqlens_q[-1] <= T cannot be checked otherwise"
            )
        num_tokens = meta.slot_mapping.shape[0]
    v = jax.tree.map(np.asarray, _violations(cache, meta))
    tables = np.asarray(meta.block_tables)
    lens = np.asarray(meta.context_lens)
    cu = np.asarray(meta.cu_seqlens_q)
    nb, bs, mb = cache.num_blocks, cache.block_size, tables.shape[1]
    problems = []
    if v["bad_ids"].any():
        at = _where(v["bad_ids"])
        ids = [int(tables[i, j]) for i, j in at]
        problems.append(
            f"meta.block_tables: block ids in use outside [0, {nb}): {ids} at (seq, block) {at}"
        )
    if cu[0] != 0:
        problems.append(f"meta.cu_seqlens_q[0] must be 0, got {int(cu[0])}")
    if v["decreasing_cu"].any():
        problems.append(
            f"meta.cu_seqlens_q must be non-decreasing; it decreases after index "
            f"{_where(v['decreasing_cu'])}"
        )
    if cu[-1] > num_tokens:
        problems.append(
            f"meta.cu_seqlens_q[-1] = {int(cu[-1])} exceeds the number of query rows "
            f"T = {num_tokens}"
        )
    if v["negative_lens"].any():
        problems.append(
            f"meta.context_lens must be >= 0; negative at sequences {_where(v['negative_lens'])}"
        )
    if v["long_lens"].any():
        seqs = _where(v["long_lens"])
        problems.append(
            f"meta.context_lens: sequences {seqs} have contexts {[int(lens[i]) for i in seqs]} "
            f"longer than a block-table row holds ({mb} blocks of {bs} = {mb * bs} tokens)"
        )
    if v["rows_without_keys"].any():
        problems.append(
            f"meta.cu_seqlens_q: sequences {_where(v['rows_without_keys'])} have more query "
            "rows than context tokens (their first rows see no key)"
        )
    if "big_slots" in v and v["big_slots"].any():
        problems.append(
            f"meta.slot_mapping: slots at rows {_where(v['big_slots'])} are >= "
            f"num_blocks * block_size = {nb * bs}"
        )
    if "dup_slots" in v and v["dup_slots"].any():
        rows = _where(v["dup_slots"])
        slots = np.asarray(meta.slot_mapping)
        problems.append(
            f"meta.slot_mapping: duplicate slots {sorted({int(slots[r]) for r in rows})} "
            f"(rows {rows} repeat an earlier row's slot)"
        )
    if problems:
        raise ValueError("\n".join(problems))
