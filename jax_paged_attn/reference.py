"""The ``xla`` backend: pure JAX, runs on every platform, and the readable oracle.

Attention walks the KV cache in chunks of whole blocks with an online softmax, so it never
materialises logits of size ``[T, H, max_context]``. Queries are processed in *q-tiles*: a
tile is up to ``q_tile`` consecutive query rows of one sequence, so each KV block is gathered
once per tile, not once per row. The tiles are enumerated on the device from
``cu_seqlens_q`` (a prefix sum of ``ceil(n_i / q_tile)``) under a static bound, so nothing
syncs with the host and a new batch composition does not recompile.

The fused MoE sorts the (token, expert) pairs by expert and cuts each expert's run into tiles of
``block`` rows; a loop over the tiles in use runs the two matmuls of one expert per tile. Each
token meets only the experts it was routed to, so an expert no token selects is never read
(NaN or Inf in its weights cannot reach an output), and the memory is the ``T * k`` routed rows
plus one tile, never ``E x T`` (a dense-over-experts ``lax.ragged_dot`` lowering needs that).
float32 matmuls run at ``Precision.HIGHEST`` (not TF32 on GPUs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def _tiles(cu_seqlens_q, context_lens, num_tokens: int, q_tile: int):
    """Enumerates q-tiles: for tile ``i`` its sequence, first row and row count.

    Returns (seq [NT], rows [NT, q_tile] (row index, ``T`` where invalid), pos [NT, q_tile]
    (absolute position of each row in its context, -1 where invalid)).
    """
    num_seqs = context_lens.shape[0]
    n_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [S]
    tiles_per_seq = (n_q + q_tile - 1) // q_tile
    tile_end = jnp.cumsum(tiles_per_seq)  # [S]
    # Each non-empty tile holds >= 1 row and each sequence adds at most one partial tile.
    num_tiles = min(num_tokens, -(-num_tokens // q_tile) + num_seqs)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    # compare_all: one fused op (the default binary search is a while loop on a GPU)
    seq = jnp.searchsorted(tile_end, tile, side="right", method="compare_all").astype(jnp.int32)
    live = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    first_tile = tile_end[seq] - tiles_per_seq[seq]
    j = (tile - first_tile)[:, None] * q_tile + jnp.arange(q_tile, dtype=jnp.int32)[None, :]
    valid = live[:, None] & (j < n_q[seq][:, None])
    rows = jnp.where(valid, cu_seqlens_q[seq][:, None] + j, num_tokens)
    pos = jnp.where(valid, (context_lens[seq] - n_q[seq])[:, None] + j, -1)
    return seq, rows, pos


def _varying_like(xs, tree):
    """Inside ``shard_map`` (check_vma), loop carries must vary over the axes the inputs ``xs``
    (an array or a tuple of arrays) vary over."""
    vma = set()
    for x in xs if isinstance(xs, tuple) else (xs,):
        aval = jax.typeof(x)
        axis_type = getattr(aval, "manual_axis_type", None)  # jax 0.11; older: aval.vma
        vma.update(axis_type.varying if axis_type is not None else getattr(aval, "vma", ()))
    if not vma:
        return tree
    return jax.tree.map(lambda a: lax.pcast(a, tuple(sorted(vma)), to="varying"), tree)


def paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    scale: float,
    softcap: float | None,
    sliding_window: int | None,
    alibi_slopes,
    sinks,
    k_scale,
    v_scale,
    q_tile: int | None = None,
    kv_chunk: int | None = None,
    interpret: bool = False,
    static_loop: bool = False,
    return_lse: bool = False,
):
    """Attention over a paged cache (``interfaces.AttentionKernels``; ``interpret`` is accepted
    for the common signature and ignored: this path runs on every platform). With
    ``return_lse`` it returns ``(out, lse)``, ``lse`` f32 ``[T, H]`` the log of the softmax
    denominator (sink included; ``-inf`` for rows that see nothing, ``+inf`` under a +inf sink).

    ``q_tile`` query rows share each KV gather; ``kv_chunk`` keys are processed per step
    (rounded to whole blocks). ``static_loop`` runs the KV loop over every block of the block
    table (a trip count known at trace time, which reverse-mode autodiff needs) and zeroes K as
    well as V outside the visible keys (so cotangents never meet NaN in unused cache slots);
    by default the loop covers only the blocks some row sees.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_tables, context_lens, cu_seqlens_q = (
        x.astype(jnp.int32) for x in (block_tables, context_lens, cu_seqlens_q)
    )
    num_blocks, num_kv_heads, block_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    if q_tile is None:  # one row per tile when the batch looks like decode
        q_tile = 1 if num_tokens <= 2 * context_lens.shape[0] else 16
    if kv_chunk is None:
        # Few, large steps: each gathers about 2^24 K elements (64 MiB in f32), at least 128
        # and at most 4096 keys, so a loop step's fixed cost stays small against its bytes.
        tiles = min(num_tokens, -(-num_tokens // q_tile) + context_lens.shape[0])
        per_key = tiles * num_kv_heads * head_dim
        kv_chunk = max(128, min(4096, max_blocks * block_size, (1 << 24) // per_key))
    blocks_per_step = max(1, min(max_blocks, kv_chunk // block_size))

    seq, rows, pos = _tiles(cu_seqlens_q, context_lens, num_tokens, q_tile)
    num_tiles = seq.shape[0]
    lo = jnp.zeros_like(pos) if sliding_window is None else pos - sliding_window + 1
    lo = jnp.maximum(lo, 0)

    # Half-precision q and pages stay in their dtype for the two matmuls (exact products, f32
    # accumulation); float32 and float8 (scaled) caches compute in float32.
    half = q.dtype == k_pages.dtype and q.dtype != jnp.float32
    compute = q.dtype if half else jnp.float32
    q_rows = jnp.take(q, rows, axis=0, mode="fill", fill_value=0)  # [NT, QT, H, D]
    qt = q_rows.astype(compute).reshape(num_tiles, q_tile, num_kv_heads, group, head_dim)
    slopes = None if alibi_slopes is None else alibi_slopes.reshape(num_kv_heads, group)

    # The KV loop covers the union of what the tiles see, in whole steps of blocks.
    any_row = pos >= 0
    first_block = jnp.min(jnp.where(any_row, lo // block_size, max_blocks))
    last_block = jnp.max(jnp.where(any_row, pos // block_size + 1, 0))
    num_steps = jnp.maximum(last_block - first_block + blocks_per_step - 1, 0) // blocks_per_step

    def dequant(pages, scale_vec):
        x = pages.astype(compute)  # [NT, BPS, Hkv, BS, D]
        if scale_vec is not None:
            x = x * scale_vec[None, None, :, None, None]
        x = jnp.swapaxes(x, 1, 2)  # [NT, Hkv, BPS, BS, D]
        return x.reshape(num_tiles, num_kv_heads, blocks_per_step * block_size, head_dim)

    def visible_keys(blk):  # [NT, QT, K]: which keys of these blocks each row sees
        key = (blk[:, None] * block_size + jnp.arange(block_size)).reshape(-1)
        return (
            (key[None, None, :] <= pos[:, :, None])
            & (key[None, None, :] >= lo[:, :, None])
            & (blk[:, None] < max_blocks).repeat(block_size, 1).reshape(-1)
        )

    def step(i, carry):
        m, l, acc = carry  # [NT, Hkv, G, QT](,D)
        blk = first_block + i * blocks_per_step + jnp.arange(blocks_per_step)
        ids = block_tables[seq][:, jnp.minimum(blk, max_blocks - 1)]  # [NT, BPS]
        ids = jnp.clip(ids, 0, num_blocks - 1)  # ids outside the cache read a real page
        k = dequant(k_pages[ids], k_scale)  # [NT, Hkv, K, D]
        v = dequant(v_pages[ids], v_scale)
        key = (blk[:, None] * block_size + jnp.arange(block_size)).reshape(-1)  # [K]
        visible = visible_keys(blk)  # [NT, QT, K]
        seen = jnp.any(visible, axis=1)[:, None, :, None]  # keys some row of the tile sees
        if static_loop:
            k = jnp.where(seen, k, jnp.zeros((), k.dtype))
        s = (
            jnp.einsum(
                "nqkgd,nksd->nkgqs", qt, k, precision=_HI, preferred_element_type=jnp.float32
            )
            * scale
        )
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        if slopes is not None:
            rel = (key[None, None, :] - pos[:, :, None]).astype(jnp.float32)  # [NT, QT, K]
            s = s + slopes[None, :, :, None, None] * rel[:, None, None, :, :]
        vis = visible[:, None, None, :, :]
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: avoid inf - inf
        p = jnp.exp(s - m_safe[..., None])  # masked logits give exactly 0
        alpha = jnp.exp(m - m_safe)
        # Masked keys may be NaN in the cache (unused slots): zero them, as 0 * NaN = NaN.
        v = jnp.where(seen, v, jnp.zeros((), v.dtype))
        pv = jnp.einsum(
            "nkgqs,nksd->nkgqd",
            p.astype(compute),
            v,
            precision=_HI,
            preferred_element_type=jnp.float32,
        )
        return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    shape = (num_tiles, num_kv_heads, group, q_tile)
    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (head_dim,), jnp.float32),
    )
    init = _varying_like(q, init)
    if static_loop:
        num_steps = -(-max_blocks // blocks_per_step)
    m, l, acc = lax.fori_loop(0, num_steps, step, init)
    if return_lse:  # keys only, then the sink: logaddexp keeps -inf / +inf sinks exact
        seen = l > 0
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        if sinks is not None:
            lse = jnp.logaddexp(lse, sinks.reshape(num_kv_heads, group)[None, :, :, None])
        lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(num_tiles * q_tile, num_heads)
        lse = jnp.full((num_tokens, num_heads), -jnp.inf).at[rows.reshape(-1)].set(lse, mode="drop")
    if sinks is not None:
        # Finite: a +inf sink takes the whole weight (rows exactly 0), -inf none (no sink),
        # without inf - inf.
        fmax = float(jnp.finfo(jnp.float32).max)
        sink = jnp.clip(sinks.reshape(num_kv_heads, group), -fmax, fmax)[None, :, :, None]
        m_fin = jnp.maximum(m, sink)
        l = l * jnp.exp(m - m_fin) + jnp.exp(sink - m_fin)
        acc = acc * jnp.exp(m - m_fin)[..., None]
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(num_tiles * q_tile, num_heads, head_dim)
    result = jnp.zeros((num_tokens, num_heads, head_dim), q.dtype)
    result = result.at[rows.reshape(-1)].set(out.astype(q.dtype), mode="drop")
    return (result, lse) if return_lse else result


def paged_decode(q, k_pages, v_pages, block_tables, context_lens, **kwargs):
    num_seqs = q.shape[0]
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    return paged_attention(q, k_pages, v_pages, block_tables, context_lens, cu, q_tile=1, **kwargs)


def check_supported(**config) -> None:
    """The xla path runs every configuration the API accepts."""
    del config


FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; stores saturate to +-448


def quantize(x, scale, dtype):
    """Value as stored in a cache of ``dtype`` (float8: ``saturate(x / scale)`` in e4m3)."""
    if dtype == FP8:
        x = x.astype(jnp.float32) / scale[:, None]
        return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)
    return x.astype(dtype)


def _write_pages(pages, x, scale, slot_mapping):
    nb, _, bs, _ = pages.shape
    # Padding slots (< 0) go to block index NB, which mode="drop" discards: a negative index
    # would wrap around instead.
    block = jnp.where(slot_mapping < 0, nb, slot_mapping // bs)
    offset = jnp.where(slot_mapping < 0, 0, slot_mapping % bs)
    return pages.at[block, :, offset].set(quantize(x, scale, pages.dtype), mode="drop")


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, k_scale, v_scale, interpret=False):
    """KV write by slot mapping (``interfaces.KVWriteKernels``) as one XLA scatter per tensor."""
    del interpret
    slot_mapping = slot_mapping.astype(jnp.int32)
    return (
        _write_pages(k_pages, k, k_scale, slot_mapping),
        _write_pages(v_pages, v, v_scale, slot_mapping),
    )


ACTIVATIONS = {  # unary activations of the gate: h = act(gate) * up
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
# Every fused_moe activation: the unary ones and gpt-oss's clamped SwiGLU.
MOE_ACTIVATIONS = (*ACTIVATIONS, "swigluoai")


def moe_glu(gate, up, activation: str, alpha: float, limit: float):
    """h from the f32 gate and up halves: ``act(gate) * up``, or for ``swigluoai``
    ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""
    if activation == "swigluoai":
        g = jnp.minimum(gate, limit)
        return (jnp.clip(up, -limit, limit) + 1.0) * g * jax.nn.sigmoid(alpha * g)
    return ACTIVATIONS[activation](gate) * up


def _moe_block(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: twice the mean rows per selected expert, so most experts fit one tile
    (their weights are read about once), a power of two in [8, 256]."""
    mean = -(-num_pairs // max(1, min(num_experts, num_pairs)))
    return min(256, max(8, 1 << max(0, 2 * mean - 1).bit_length()))


def _moe_tiles(topk_ids, num_experts: int, block: int):
    """The pairs ``s = t * k + j`` in expert order, cut into tiles of ``block`` rows of one expert.

    Returns ``order`` i32[N] (pairs sorted by expert; ids outside [0, E) last), per tile
    ``expert``, ``first`` (its first position in ``order``) and ``rows`` (i32[NT] each), and the
    number of tiles in use (the tiles past it are never run). ``NT`` is a static bound:
    ``sum_e ceil(n_e / block) <= ceil(N / block) + min(E, N)``.
    """
    num_pairs = topk_ids.size
    flat = topk_ids.reshape(-1)
    key = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    tiles = (counts + block - 1) // block
    tile_end = jnp.cumsum(tiles)
    num_tiles = -(-num_pairs // block) + min(num_experts, num_pairs)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    expert = jnp.searchsorted(tile_end, i, side="right", method="compare_all").astype(jnp.int32)
    expert = jnp.minimum(expert, num_experts - 1)
    offset = (i - (tile_end[expert] - tiles[expert])) * block  # rank of the tile's first row
    rows = jnp.clip(counts[expert] - offset, 0, block)
    return order, expert, starts[expert] + offset, rows, tile_end[-1]


def _moe_tile_fn(act, dtype):
    """y0 = glu(xs @ Wgu + bgu) @ Wd + bd for one tile, f32 accumulation; the intermediate
    passes through ``dtype`` as in the kernels. ``act``: (activation, alpha, limit); absent
    biases are ``None``."""
    precision = _HI if jnp.dtype(dtype) == jnp.float32 else None
    dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=jnp.float32)

    def tile(xs, w_gate_up, w_down, b_gate_up, b_down):
        h = dot(xs, w_gate_up)
        if b_gate_up is not None:
            h = h + b_gate_up.astype(jnp.float32)
        inter = w_down.shape[0]
        a = moe_glu(h[:, :inter], h[:, inter:], *act)
        y = dot(a.astype(dtype), w_down)
        return y if b_down is None else y + b_down.astype(jnp.float32)

    return tile


def _moe_loop(x, params, topk_weights, topk_ids, act, body, init):
    """Runs ``carry = body(carry, tile, xs, expert_params, w, rows_ok, token, pair, e)`` over
    the tiles in use, from ``init``: ``xs`` the tile's rows of x (0 past its rows),
    ``expert_params`` expert e's (Wgu, Wd, bgu, bd) (absent biases: None), ``w`` the rows'
    routing weights, ``tile`` the tile's math (``_moe_tile_fn``)."""
    num_tokens, _ = x.shape
    num_experts = params[0].shape[0]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    block = _moe_block(num_pairs, num_experts)
    order, expert, first, rows, used = _moe_tiles(topk_ids, num_experts, block)
    weights = topk_weights.reshape(-1).astype(jnp.float32)
    tile = _moe_tile_fn(act, x.dtype)
    r = jnp.arange(block, dtype=jnp.int32)

    def step(i, carry):
        ok = r < rows[i]
        pair = order[jnp.minimum(first[i] + r, num_pairs - 1)]
        token = pair // top_k
        xs = jnp.where(ok[:, None], x[token], jnp.zeros((), x.dtype))
        e = expert[i]
        w = jnp.where(ok, weights[pair], 0.0)
        expert_params = tuple(None if p is None else p[e] for p in params)
        return body(carry, tile, xs, expert_params, w, ok, token, pair, e)

    init = _varying_like((x, params[0], params[1], topk_weights), init)
    return lax.fori_loop(0, used, step, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_moe(x, params, topk_weights, topk_ids, act):
    num_tokens, hidden = x.shape

    def body(out, tile, xs, expert_params, w, ok, token, pair, e):
        y = tile(xs, *expert_params) * w[:, None]
        return out.at[jnp.where(ok, token, num_tokens)].add(y, mode="drop")

    init = jnp.zeros((num_tokens, hidden), jnp.float32)
    out = _moe_loop(x, params, topk_weights, topk_ids, act, body, init)
    return out.astype(x.dtype)


def _fused_moe_fwd(x, params, topk_weights, topk_ids, act):
    out = _fused_moe(x, params, topk_weights, topk_ids, act)
    return out, (x, params, topk_weights, topk_ids)


def _fused_moe_bwd(act, residuals, cotangent):
    """The same tile loop, each tile's VJP: an expert no token selects gets a zero gradient
    (biases included)."""
    x, params, topk_weights, topk_ids = residuals
    num_tokens, _ = x.shape
    num_pairs = topk_ids.size
    dy = jnp.asarray(cotangent, jnp.float32)

    def body(grads, tile, xs, expert_params, w, ok, token, pair, e):
        dx, dparams, dw = grads
        y0, vjp = jax.vjp(tile, xs, *expert_params)
        dy_rows = jnp.where(ok[:, None], dy[token], 0.0)
        dxs, *dparams_e = vjp(dy_rows * w[:, None])
        dx = dx.at[jnp.where(ok, token, num_tokens)].add(dxs.astype(jnp.float32), mode="drop")
        dparams = tuple(
            None if d is None else d.at[e].add(d_e.astype(jnp.float32))
            for d, d_e in zip(dparams, dparams_e)
        )
        dw = dw.at[jnp.where(ok, pair, num_pairs)].add(jnp.sum(y0 * dy_rows, axis=1), mode="drop")
        return dx, dparams, dw

    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)
    zeros = tuple(None if p is None else f32(p.shape) for p in params)
    init = (f32(x.shape), zeros, f32((num_pairs,)))
    dx, dparams, dw = _moe_loop(x, params, topk_weights, topk_ids, act, body, init)
    return (
        dx.astype(x.dtype),
        tuple(None if p is None else d.astype(p.dtype) for p, d in zip(params, dparams)),
        dw.reshape(topk_weights.shape).astype(topk_weights.dtype),
        None,
    )


_fused_moe.defvjp(_fused_moe_fwd, _fused_moe_bwd)


def fused_moe(
    x,
    w_gate_up,
    w_down,
    topk_weights,
    topk_ids,
    *,
    activation: str,
    b_gate_up=None,
    b_down=None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    interpret=False,
):
    """Fused MoE (``interfaces.MoEKernels``): a loop over expert-sorted tiles of routed rows;
    the biases are added to each tile's f32 accumulators."""
    del interpret
    if x.shape[0] == 0 or topk_ids.shape[1] == 0:
        return jnp.zeros(x.shape, x.dtype)
    topk_ids = topk_ids.astype(jnp.int32)
    params = (w_gate_up, w_down, b_gate_up, b_down)
    act = (activation, float(swiglu_alpha), float(swiglu_limit))
    return _fused_moe(x, params, topk_weights, topk_ids, act)
