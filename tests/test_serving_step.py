"""A whole serving step in one ``paged_attention`` call: kernel backends send one-row sequences
to their decode kernel and the rest to the prefill kernel, decided on the device
(``jax_paged_attn/_serving_step.py``). Results must equal the oracle whatever the mix."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from jax_paged_attn.testing import assert_close, build_case
from pallas_kernels.paged_attention import mosaic_decode
from pallas_kernels.paged_attention import triton as triton_attention
from tests.conftest import run_kw, suite_dtype

# (q_len, context) per sequence: decode rows first (as vLLM orders a step), interleaved, only
# decode rows with idle (0, 0) sequences, and a prefill-only step.
MIXES = {
    "decode_first": [(1, 37), (1, 5), (1, 64), (24, 40), (9, 9)],
    "interleaved": [(17, 33), (1, 50), (0, 0), (3, 3), (1, 1), (8, 70)],
    "decode_only": [(1, 20), (0, 0), (1, 49), (1, 1), (0, 7)],
    # sequence i's row is row i (cu_seqlens_q = arange): the decode kernel straight on q[:S]
    "in_order": [(1, 20), (1, 49), (1, 1), (1, 33)],
    "prefill_only": [(20, 40), (2, 2), (33, 33)],
}


def _with_leading_rows(case, n):
    """The same batch with ``n`` NaN query rows before ``cu_seqlens_q[0]`` (they must come out
    as zeros: they belong to no sequence)."""
    pad = jnp.full((n,) + case.q.shape[1:], jnp.nan, case.q.dtype)
    cu = case.cu_seqlens_q + n
    meta = dataclasses.replace(case.meta, cu_seqlens_q=jnp.asarray(cu, jnp.int32))
    return dataclasses.replace(case, q=jnp.concatenate([pad, case.q]), meta=meta, cu_seqlens_q=cu)


def test_jitted_steps_pick_their_branch_on_the_device(backend, rng):
    """Under jit (the branch picked on the device): an in-order decode step and a mixed one,
    padded with NaN rows, against the oracle."""
    step = jax.jit(lambda q, c, m: jpa.paged_attention(q, c, m, **run_kw(backend)))
    cases = [
        build_case(rng, MIXES[m], dtype=suite_dtype(backend), num_blocks=40, max_blocks=6)
        for m in ("in_order", "decode_first")
    ]
    for case in cases:  # NaN rows past cu_seqlens_q[S] must come out as zeros
        q = jnp.concatenate(
            [case.q, jnp.full((40 - case.q.shape[0],) + case.q.shape[1:], jnp.nan, case.q.dtype)]
        )
        out = step(q, case.cache, case.meta)
        ref = case.reference()
        assert_close(out[: case.q.shape[0]], ref, case.q.dtype, what=backend)
        assert np.all(np.asarray(out[case.q.shape[0] :], np.float32) == 0)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("opts", [{}, {"sliding_window": 9, "softcap": 20.0}, {"sinks": True}])
def test_serving_steps_match_the_oracle(backend, rng, mix, opts):
    case = build_case(rng, MIXES[mix], pad_rows=2, dtype=suite_dtype(backend))
    if mix != "in_order":
        case = _with_leading_rows(case, 3)
    if opts.get("sinks"):
        opts = dict(sinks=jnp.asarray(rng.normal(size=case.q.shape[1]), jnp.float32))
    out, lse = jpa.paged_attention(
        case.q, case.cache, case.meta, return_lse=True, **opts, **run_kw(backend)
    )
    ref = case.reference(**opts)
    assert_close(out, ref, case.q.dtype, what=f"{backend} {mix}")
    empty = np.all(ref == 0, axis=(1, 2))
    assert np.all(np.asarray(out, np.float32)[empty] == 0)
    assert not np.any(np.isnan(np.asarray(out, np.float32)))
    # The lse agrees with the xla backend's (same case, oracle-checked in test_lse.py).
    _, lse_xla = jpa.paged_attention(case.q, case.cache, case.meta, return_lse=True, **opts)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_xla), rtol=2e-2, atol=2e-2)


DECODE_MODULES = {"triton": triton_attention, "mosaic": mosaic_decode}


@pytest.mark.parametrize("explicit", [True, False])
def test_one_row_sequences_take_the_decode_kernel(backend, rng, monkeypatch, explicit):
    """The step's decode kernel runs on one query per sequence, and the results are still the
    oracle's (the routing is real, not a fallback)."""
    if backend not in DECODE_MODULES:
        pytest.skip(f"{backend} runs every row on one kernel (only triton and mosaic split)")
    if not explicit and jax.default_backend() == "cpu":
        pytest.skip("backend='auto' on a CPU is the xla path")
    seen = []
    for module in DECODE_MODULES.values():  # auto may pick either backend's decode kernel

        def spy(q, *args, _real=module.paged_decode, **kw):
            seen.append(q.shape)
            return _real(q, *args, **kw)

        monkeypatch.setattr(module, "paged_decode", spy)
    case = build_case(rng, MIXES["interleaved"], dtype=suite_dtype(backend))
    kw = run_kw(backend) if explicit else {}
    # Under jit: the branch is chosen on the device, so every branch is traced.
    out = jax.jit(lambda q, c, m: jpa.paged_attention(q, c, m, **kw))(case.q, case.cache, case.meta)
    # Traced in every branch (decode rows in order, decode-only, mixed), one row per sequence.
    assert seen == [(6,) + case.q.shape[1:]] * 3
    assert_close(out, case.reference(), case.q.dtype, what=backend)


def test_xla_keeps_one_path(rng, monkeypatch):
    """The oracle backend is never split: it computes every row the same way."""
    from jax_paged_attn import reference

    calls = []
    monkeypatch.setattr(reference, "paged_decode", lambda *a, **k: calls.append(1))
    case = build_case(rng, MIXES["decode_only"])
    out = jpa.paged_attention(case.q, case.cache, case.meta, backend="xla")
    assert not calls
    assert_close(out, case.reference(), case.q.dtype, what="xla")


def test_mosaic_decode_rejects_groups_wider_than_its_tile():
    """GQA groups of more than 64 query heads: the mosaic decode kernel says so up front (and
    a mosaic ``paged_attention`` step keeps such rows on its prefill kernel)."""
    cfg = dict(head_dim=128, block_size=16, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16)
    assert jpa.backends.supports("mosaic", "decode", num_groups=64, **cfg)
    assert not jpa.backends.supports("mosaic", "decode", num_groups=65, **cfg)
    assert jpa.backends.supports("mosaic", "attention", num_groups=65, **cfg)
    with pytest.raises(NotImplementedError, match="<= 64"):
        mosaic_decode.check_supported(num_groups=128, **cfg)
