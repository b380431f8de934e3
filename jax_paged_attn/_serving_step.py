"""One serving step on the kernels that suit each row: decode rows on the decode kernel, prefill
chunks on the prefill kernel, inside one ``paged_attention`` call.

A serving engine hands ``paged_attention`` a whole step: sequences with one query row (decode)
and sequences with many (prefill chunks), in any order, and the mix changes every step under
one compiled program. The prefill kernels cut rows into 64-row tiles that never cross a
sequence, so a decode row costs a whole tile there, for each group of query heads: the KV of a
decode sequence is read several times over and the pipeline never fills (0.12-0.6x of
``paged_decode`` on the same decode-only batch, H200, issue #18). So, decided on the device
from ``cu_seqlens_q`` (static shapes say nothing about the mix):

* every sequence has at most one row (a decode-only step): only the decode kernel runs, on the
  row of each sequence that has one (``context_lens`` 0 for the others, which read nothing);
  when sequence ``i``'s row is row ``i`` (``cu_seqlens_q == arange(S + 1)``, what engines send)
  straight on ``q[:S]``, with no gather of q and no scatter of the output;
* otherwise both run: the prefill kernel on the sequences with two rows or more (the decode
  sequences get ``context_lens`` 0 there: their tiles read no KV and store rows that the
  decode results then overwrite), and the decode kernel on the one-row sequences.

Rows outside ``cu_seqlens_q[0]:cu_seqlens_q[S]`` stay zeros (lse ``-inf``), as the contract
says. The branch is a ``lax.switch`` on device-side predicates under ``jax.jit`` (an eager
call with concrete metadata runs the one branch it needs). Exact: each row is computed by
a kernel that implements the same contract for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def zero_rows(q, return_lse):
    """The result of rows that see no key: zeros (and lse ``-inf``), shaped as ``q``'s rows."""
    out = jnp.zeros(q.shape, q.dtype)
    return (out, jnp.full(q.shape[:2], -jnp.inf, jnp.float32)) if return_lse else out


def _pad_rows(res, num_rows):
    """``res`` (``out`` or ``(out, lse)``) with zero rows (lse ``-inf``) up to ``num_rows``."""
    pad = lambda x, fill: jnp.pad(  # noqa: E731
        x, [(0, num_rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=fill
    )
    return (pad(res[0], 0), pad(res[1], -jnp.inf)) if isinstance(res, tuple) else pad(res, 0)


def _put_rows(base, part, rows):
    """``base`` with ``part[i]`` in row ``rows[i]`` (rows >= T are dropped); works on
    ``out`` or on ``(out, lse)``."""
    return jax.tree.map(lambda b, p: b.at[rows].set(p, mode="drop"), base, part)


def serving_step(
    prefill, decode, q, k, v, block_tables, context_lens, cu_seqlens_q, *, return_lse, **kw
):
    """``prefill``: the backend's ``paged_attention``; ``decode``: its ``paged_decode`` (both
    take the interfaces' arguments; ``kw`` the keywords they share). Same result as
    ``prefill(q, ..., cu_seqlens_q)`` alone."""
    num_rows = q.shape[0]
    first = cu_seqlens_q[:-1]
    q_lens = cu_seqlens_q[1:] - first
    one_row = q_lens == 1
    # The row of each one-row sequence; other sequences point past the end (dropped).
    rows = jnp.where(one_row, first, num_rows)

    def decode_rows():
        q_dec = q[jnp.clip(first, 0, num_rows - 1)]
        lens = jnp.where(one_row, context_lens, 0)
        return decode(q_dec, k, v, block_tables, lens, return_lse=return_lse, **kw)

    def decode_only():
        return _put_rows(zero_rows(q, return_lse), decode_rows(), rows)

    def mixed():
        lens = jnp.where(one_row, 0, context_lens)
        base = prefill(q, k, v, block_tables, lens, cu_seqlens_q, return_lse=return_lse, **kw)
        return _put_rows(base, decode_rows(), rows)

    branches = [decode_only, mixed]
    which = jnp.where(jnp.all(q_lens <= 1), 0, 1)
    num_seqs = block_tables.shape[0]
    if num_seqs <= num_rows:  # sequence i's one row is row i: no gather, no scatter

        def in_order():
            res = decode(
                q[:num_seqs], k, v, block_tables, context_lens, return_lse=return_lse, **kw
            )
            return _pad_rows(res, num_rows)

        in_order_step = jnp.all(cu_seqlens_q == jnp.arange(num_seqs + 1))
        branches.append(in_order)
        which = jnp.where(in_order_step, 2, which)
    if not isinstance(which, jax.core.Tracer):  # an eager call: the metadata is known here
        return branches[int(which)]()
    return lax.switch(which, branches)
