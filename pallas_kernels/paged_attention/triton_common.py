"""Pieces shared by the Triton paged-attention kernels (``triton.py``: prefill / mixed batches,
``triton_decode.py``: decode): supported shapes, the gathered K/V loop and one online-softmax
step.

Softmax domains (base 2: a logit ``x`` weighs ``2^x``), fixed per call:

* raw (no softcap, no ALiBi): the running max ``m`` and the tile ``s`` stay in units of the
  q.k products as the dot returns them, and ``c = scale * log2(e)`` (times ``k_scale`` for a
  float8 cache; scales are positive) is applied after the subtraction: ``p = exp2((s - m) *
  c)``. The largest logit gets exactly ``exp2(0) = 1`` however large ``s * c`` is. A folded
  ``exp2(s * c - m * c)`` (one FMA per logit, the compiler's contraction of the scale multiply
  and the max subtraction) instead compares the unrounded product with a rounded ``m * c``:
  off by up to half an ulp of ``m * c``, which overflows ``exp2`` (inf, then NaN) once
  ``|m * c| >~ 2^31``. The price: one more FP32 op per logit than that FMA (a subtraction and
  a multiply), on the ALU while the tensor cores run the next dot.
* log2 (softcap or ALiBi): logits are scaled (``c * tanh``, ``+ slope * (t - p)``) into log2
  units before the max, so the value ``m`` is taken from is the value that is subtracted.

Integer math on Python ints goes through :func:`idiv` / :func:`irem`: under
``jax_enable_x64`` a Python int would be int64, and ``lax.div`` refuses mixed dtypes.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plgpu

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 80, 96, 128, 192, 256)
SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
SUPPORTED_Q_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_KV_DTYPES = SUPPORTED_Q_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite, not -inf: a row that has seen no visible key yet has m == MASK_VALUE, and
# exp2(MASK_VALUE - MASK_VALUE) = 1 where (-inf) - (-inf) would be NaN. Masked probabilities
# are additionally zeroed with `where`, so such rows keep l == 0 and come out as exact zeros.
# Its negation bounds a sink from above: a +inf sink starts the row at -MASK_VALUE, so every
# key weighs exp2(-huge) = 0 and the row is exactly 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def check_supported(
    *, head_dim, block_size, q_dtype, kv_dtype, return_lse=False, num_groups=1
) -> None:
    """Raises NotImplementedError for a configuration these kernels cannot run (every kernel
    writes the lse when asked: ``return_lse`` is always supported; any GQA ratio)."""
    del return_lse, num_groups
    hint = '; use backend="xla" for other configurations'
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"triton paged attention: {head_dim=} must be one of {SUPPORTED_HEAD_DIMS}{hint}"
        )
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise NotImplementedError(
            f"triton paged attention: {block_size=} must be one of {SUPPORTED_BLOCK_SIZES}{hint}"
        )
    if jnp.dtype(q_dtype) not in SUPPORTED_Q_DTYPES:
        raise NotImplementedError(
            f"triton paged attention: q dtype {jnp.dtype(q_dtype)} must be one "
            f"of {[str(d) for d in SUPPORTED_Q_DTYPES]}{hint}"
        )
    if jnp.dtype(kv_dtype) not in SUPPORTED_KV_DTYPES:
        raise NotImplementedError(
            f"triton paged attention: kv dtype {jnp.dtype(kv_dtype)} must be "
            f"one of {[str(d) for d in SUPPORTED_KV_DTYPES]}{hint}"
        )


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def idiv(a, b):
    """Truncating int32 division (operands >= 0 wherever it is used)."""
    return lax.div(_i32(a), _i32(b))


def irem(a, b):
    return lax.rem(_i32(a), _i32(b))


def cdiv(a, b: int):
    return idiv(a + (b - 1), b)


def bind_optional(kernel, num_fixed: int, present: tuple[bool, ...]):
    """Adapts ``kernel(fixed..., optional..., outputs...)`` to the refs pallas_call passes, which
    omit the optional inputs that are None."""

    def wrapped(*refs):
        fixed, rest = refs[:num_fixed], iter(refs[num_fixed:])
        optional = [next(rest) if p else None for p in present]
        return kernel(*fixed, *optional, *rest)

    return wrapped


def split_range(b0, b1, f0, f1):
    """[b0, b1) -> masked [b0, c0), unmasked [c0, c1), masked [c1, b1) with [c0, c1) = [f0, f1)
    clamped into [b0, b1)."""
    c0 = jnp.minimum(jnp.maximum(f0, b0), b1)
    c1 = jnp.minimum(jnp.maximum(f1, c0), b1)
    return c0, c1


def context_len(lens_ref, seq, max_blocks: int, block_size: int):
    """Context of ``seq``, at most what its block-table row holds (MB * BS): a longer one (bad
    metadata; its result is unspecified) must not make the kernel read past the row."""
    return jnp.minimum(lens_ref[seq], max_blocks * block_size)


def page_rows(bt_ref, seq, h_kv, t, key_ok, *, block_size, num_kv_heads, num_blocks):
    """Rows of key positions ``t`` [BK] of sequence ``seq`` in the [NB * Hkv * BS, D] view.

    Page ids come from the block table per key, so a tile may span several pages or part of one.
    Keys with ``key_ok == False`` read no block-table entry (row of page 0: never loaded). Ids
    outside [0, NB) are clamped into the cache (bad metadata reads a real page, never memory
    past the cache): two integer ops per key, on the [BK] id vector, not per element.
    """
    blk, off = idiv(t, block_size), irem(t, block_size)
    if key_ok is None:
        page = plgpu.load(bt_ref.at[seq, blk])
    else:
        page = plgpu.load(bt_ref.at[seq, blk], mask=key_ok, other=0)
    page = jnp.clip(page, 0, num_blocks - 1)
    return (page * num_kv_heads + h_kv) * block_size + off  # [BK]


def load_rows(k_ref, v_ref, row, key_ok, d_ok, *, dp):
    """K and V rows ``row`` [BK]: [BK, dp] each. Row offsets are computed on [BK] vectors, and
    only ``row * D + d`` on the full tile. Keys with ``key_ok == False`` (past the context: NaN in
    unused slots) and padded head-dim columns load as 0 and are never read from memory."""
    d = jnp.arange(dp, dtype=jnp.int32)
    idx = (row[:, None], d[None, :])
    mask = d_ok if key_ok is None else (key_ok[:, None] if d_ok is None else key_ok[:, None] & d_ok)
    if mask is None:
        return plgpu.load(k_ref.at[idx]), plgpu.load(v_ref.at[idx])
    return (
        plgpu.load(k_ref.at[idx], mask=mask, other=0.0),
        plgpu.load(v_ref.at[idx], mask=mask, other=0.0),
    )


def kv_loop(
    bt_ref,
    k_ref,
    v_ref,
    seq,
    h_kv,
    ctx,
    ranges,
    carry,
    step,
    *,
    block_k,
    block_size,
    num_kv_heads,
    num_blocks,
    d_ok,
    dp,
    key_ok_fn,
    prefetch,
):
    """Runs ``step(j, carry, k, v, t, masked)`` over the KV tiles of ``ranges``: a list of
    (start, stop, masked) fori_loops run in order, contiguous. ``key_ok_fn(t)`` masks the keys of
    masked tiles. With ``prefetch`` the page rows of tile j + 1 are loaded in iteration j (masked
    by ``t < ctx``) and carried."""
    geo = dict(block_size=block_size, num_kv_heads=num_kv_heads, num_blocks=num_blocks)
    keys = lambda j: j * block_k + jnp.arange(block_k, dtype=jnp.int32)

    if not prefetch:

        def body(j, carry, masked):
            t = keys(j)
            key_ok = key_ok_fn(t) if masked else None
            row = page_rows(bt_ref, seq, h_kv, t, key_ok, **geo)
            k, v = load_rows(k_ref, v_ref, row, key_ok, d_ok, dp=dp)
            return step(j, carry, k, v, t, masked)

        for start, stop, masked in ranges:
            carry = lax.fori_loop(start, stop, functools.partial(body, masked=masked), carry)
        return carry

    def body(j, carry_row, masked):
        carry, row = carry_row
        t = keys(j)
        t_next = t + block_k
        row_next = page_rows(bt_ref, seq, h_kv, t_next, t_next < ctx, **geo)
        key_ok = key_ok_fn(t) if masked else None
        k, v = load_rows(k_ref, v_ref, row, key_ok, d_ok, dp=dp)
        return step(j, carry, k, v, t, masked), row_next

    t0 = keys(ranges[0][0])
    row = page_rows(bt_ref, seq, h_kv, t0, t0 < ctx, **geo)
    for start, stop, masked in ranges:
        carry, row = lax.fori_loop(
            start, stop, functools.partial(body, masked=masked), (carry, row)
        )
    return carry


def attend_tile(carry, q, k, v, t, pos, vis, c, slope2, *, softcap, cdt, raw):
    """One online-softmax step of a q tile [M, dp] against a KV tile [BK, dp] (base 2).

    ``raw`` (static; needs softcap and slope2 None): the raw domain of the module docstring,
    ``c`` the q.k -> log2 factor. Otherwise ``c`` is the factor applied before the softcap's
    tanh or the ALiBi bias, and the step runs in log2 units."""
    acc, m, l = carry
    precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    s = plgpu.dot(q, k.astype(cdt), trans_b=True, precision=precision)  # [M, BK] f32
    if not raw:
        if softcap is None:
            s = s * c
        else:  # softcap * tanh(logit / softcap), in log2 units
            s = (softcap * LOG2E) * jnp.tanh(s * c)
        if slope2 is not None:
            s = s + slope2[:, None] * (t[None, :] - pos[:, None]).astype(jnp.float32)
    if vis is not None:
        s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    if raw:
        alpha = jnp.exp2((m - m_new) * c)
        p = jnp.exp2((s - m_new[:, None]) * c)
    else:
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
    if vis is not None:  # rows that have seen no visible key: exp2(0) = 1 must not count
        p = jnp.where(vis, p, 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(cdt), v.astype(cdt), precision=precision)
    return acc, m_new, l


def logit_factor(h_kv, k_scale_ref, *, scale, softcap, raw):
    """``c`` of :func:`attend_tile`: scale (* k_scale) in log2 units, or / softcap before tanh
    (raw: scale * log2(e) * k_scale, applied after the max subtraction)."""
    c = scale * LOG2E if softcap is None else scale / softcap
    if k_scale_ref is not None:
        c = c * k_scale_ref[h_kv]
    return c


def sink_start(sink, c, raw):
    """The running max a sink (a logit in natural units, one per row) starts a row at, in the
    loop's units; finite (see MASK_VALUE), so -inf is no sink and +inf zeroes the row."""
    m0 = sink * LOG2E
    if raw:
        m0 = m0 / c
    return jnp.clip(m0, MASK_VALUE, -MASK_VALUE)


def lse_epilogue(m, l, c, raw, sink):
    """The natural-log softmax denominator of rows from the loop's final ``(m, l)`` (once per
    row, after the KV loop): ``m`` in the loop's units (``c`` its factor to log2 units when
    ``raw``), ``sink`` the rows' natural-unit sinks or None. ``-inf`` where nothing was seen
    (``l == 0``, or only a -inf sink: ``m`` stayed at MASK_VALUE), ``+inf`` under a +inf sink."""
    m2 = m * c if raw else m
    lse = (m2 + jnp.log2(jnp.where(l > 0.0, l, 1.0))) * LN2
    lse = jnp.where((l == 0.0) | (m <= MASK_VALUE), -jnp.inf, lse)
    if sink is not None:
        lse = jnp.where(sink == jnp.inf, jnp.inf, lse)
    return lse


def pages_as_rows(pages):
    """[NB, Hkv, BS, D] -> [NB * Hkv * BS, D]: a free (row-major) view for 1-D row offsets."""
    return pages.reshape(-1, pages.shape[-1])


def compute_dtype(q_dtype, kv_dtype):
    if jnp.dtype(kv_dtype) == jnp.float8_e4m3fn:
        return jnp.dtype(q_dtype)
    return jnp.promote_types(q_dtype, kv_dtype)


def optional_inputs(alibi_slopes, sinks, k_scale, v_scale):
    ops = (alibi_slopes, sinks, k_scale, v_scale)
    present = tuple(x is not None for x in ops)
    return [x.astype(jnp.float32) for x in ops if x is not None], present
