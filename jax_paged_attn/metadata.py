"""Attention metadata: which query rows belong to which sequence, and where its KV lives.

All fields are array leaves of a registered pytree, so a new batch composition (other
lengths, other blocks) never recompiles while the shapes stay the same.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
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
    if num_seqs == 0:
        raise ValueError("meta.block_tables must have at least one row (sequence)")
    if block_tables.shape[1] == 0:
        raise ValueError("meta.block_tables must have at least one column (block)")
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
    """The value checks of :func:`check_metadata` as ``checkify.check`` calls.

    Call it inside a function you transform with ``checkify.checkify`` (jit-compatible).
    """
    meta = validated(meta)
    nb, bs = cache.num_blocks, cache.block_size
    cu, lens, tables = meta.cu_seqlens_q, meta.context_lens, meta.block_tables
    max_blocks = tables.shape[1]
    checkify.check(cu[0] == 0, "meta.cu_seqlens_q[0] must be 0, got {}", cu[0])
    checkify.check(jnp.all(cu[1:] >= cu[:-1]), "meta.cu_seqlens_q must be non-decreasing")
    if num_tokens is not None:
        checkify.check(
            cu[-1] <= num_tokens,
            "meta.cu_seqlens_q[-1] = {} exceeds the number of query rows T = {}",
            cu[-1],
            jnp.int32(num_tokens),
        )
    checkify.check(jnp.all(lens >= 0), "meta.context_lens must be >= 0")
    checkify.check(
        jnp.all(lens <= max_blocks * bs),
        "meta.context_lens: a context of {} tokens is longer than its block-table "
        "row holds ({} blocks of {})",
        jnp.max(lens),
        jnp.int32(max_blocks),
        jnp.int32(bs),
    )
    n_q = cu[1:] - cu[:-1]
    checkify.check(
        jnp.all((n_q <= lens) | (lens == 0) | (n_q == 0)),
        "meta: a sequence has more query rows than context tokens "
        "(context_lens[i] < cu_seqlens_q[i+1] - cu_seqlens_q[i]); its first rows "
        "see no key",
    )
    used = jnp.arange(max_blocks)[None, :] < ((lens + bs - 1) // bs)[:, None]
    in_range = (tables >= 0) & (tables < nb)
    checkify.check(
        jnp.all(in_range | ~used),
        "meta.block_tables: a block id in use is outside [0, {})",
        jnp.int32(nb),
    )
    if meta.slot_mapping is not None:
        slots = meta.slot_mapping
        checkify.check(
            jnp.all(slots < nb * bs),
            "meta.slot_mapping: a slot is >= num_blocks * block_size = {}",
            jnp.int32(nb * bs),
        )


@functools.partial(jax.jit, static_argnums=2)
def _checked(cache, meta, num_tokens):
    def run(cache, meta):
        metadata_checks(cache, meta, num_tokens)

    return checkify.checkify(run)(cache, meta)[0]


def check_metadata(cache, meta: AttentionMetadata, *, num_tokens: int | None = None) -> None:
    """Debug check of what cannot be checked at trace time; raises on the first violation.

    Checks: block ids in use within ``[0, num_blocks)``; ``cu_seqlens_q`` starting at 0 and
    non-decreasing; ``cu_seqlens_q[-1] <= T`` (``T`` from ``num_tokens``, else from
    ``meta.slot_mapping``); no context longer than its block-table row holds; no sequence with
    more query rows than context tokens; slots within the cache. It runs as one jitted
    ``checkify`` program; inside your own jitted code use :func:`metadata_checks` under
    ``checkify.checkify``. Raises ``checkify.JaxRuntimeError`` naming the field.
    """
    meta = validated(meta)
    if num_tokens is None and meta.slot_mapping is not None:
        num_tokens = meta.slot_mapping.shape[0]
    err = _checked(cache, meta, num_tokens)
    err.throw()
