"""The ``kv_write`` group: ``write_kv`` per backend through the public API, timed in place.

Each backend runs as ``jax.jit(write_kv, donate_argnums=0)`` with the cache threaded from call
to call; ``in_place`` in the JSON is true when the donated input was consumed and the output
lives at the same device address. Check: every element of the written cache (written or not)
equals the xla backend's, exactly. The xla backend (an XLA scatter) is the named peer.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import shapes as S
from benchmarks import timing
from benchmarks.harness import NAMED_PEER, Ctx, api_kw, err_line, jpa, new_row, run_row


def write_inputs(key, shape: S.KVWriteShape, seed: int):
    """``(k, v, slot_mapping)`` of ``shape.num_tokens`` new tokens into whole blocks picked at
    random (a permutation of the cache's blocks)."""
    T, BS = shape.num_tokens, shape.block_size
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(shape.num_blocks)[: -(-T // BS)]
    slots = (blocks[np.arange(T) // BS] * BS + np.arange(T) % BS).astype(np.int32)
    k1, k2 = jax.random.split(key)
    dt = jnp.dtype(shape.dtype)
    new = (T, shape.num_kv_heads, shape.head_dim)
    return jax.random.normal(k1, new, dt), jax.random.normal(k2, new, dt), jnp.asarray(slots)


def in_place(f, cache0, args) -> dict:
    """``{"in_place": bool}``: whether ``f`` (donating its cache) consumed its input and wrote
    the output at the same device address (``in_place_error`` when that cannot be told)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = jax.tree_util.tree_map(jnp.copy, cache0)
            ptr = c.k.unsafe_buffer_pointer()
            out = f(c, *args)
            jax.block_until_ready(out)
            return {"in_place": bool(c.k.is_deleted() and out.k.unsafe_buffer_pointer() == ptr)}
    except Exception as e:
        return {"in_place": None, "in_place_error": err_line(e)}


class Threaded:
    """``f(cache, k, v, slots)`` called as ``step(k, v, slots)``: each call writes into the
    cache the previous call returned (donated, so the write is in place)."""

    def __init__(self, f, cache0):
        self.f = f
        self.cache = jax.tree_util.tree_map(jnp.copy, cache0)

    def __call__(self, k, v, slots):
        self.cache = self.f(self.cache, k, v, slots)
        return self.cache


def bench_kv_write(ctx: Ctx, shape: S.KVWriteShape) -> None:
    api = jpa()
    dt = jnp.dtype(shape.dtype)
    T, Hkv, D, BS, NB = (
        shape.num_tokens,
        shape.num_kv_heads,
        shape.head_dim,
        shape.block_size,
        shape.num_blocks,
    )
    work = {"bytes": shape.bytes}
    nsets = timing.num_sets(shape.bytes)
    ctx.log(f"kv_write {shape.name}: {T} tokens into {NB} blocks, {nsets} input set(s)")
    kc1, kc2 = jax.random.split(jax.random.key(700))
    cache0 = api.KVCache(
        jax.random.normal(kc1, (NB, Hkv, BS, D), dt), jax.random.normal(kc2, (NB, Hkv, BS, D), dt)
    )
    sets = [write_inputs(jax.random.key(900 + i), shape, 800 + i) for i in range(nsets)]
    ref = {}
    try:
        r = jax.jit(functools.partial(api.write_kv, backend="xla"))(cache0, *sets[0])
        ref["k"], ref["v"] = r.k, r.v
        del r
    except Exception as e:
        ref["error"] = err_line(e)

    def check(out):
        """Every element of the cache, written or not, equals the xla backend's (on device)."""
        if "k" not in ref:
            return {"ok": None, "error": "no reference: " + ref["error"]}
        bad = int(jnp.sum(out.k != ref["k"]) + jnp.sum(out.v != ref["v"]))
        return {
            "ok": bad == 0,
            "mismatched_elements": bad,
            "rel_err": bad / (2 * ref["k"].size),
            "ref": "xla backend, exact",
        }

    for b in ctx.args.backends:
        config = dict(api_kw(ctx, b), donate_argnums=0)
        row = new_row(
            "kv_write",
            shape,
            b,
            "ours",
            "TB/s",
            peer=NAMED_PEER["kv_write"],
            work=work,
            config=config,
        )
        f = jax.jit(functools.partial(api.write_kv, **api_kw(ctx, b)), donate_argnums=0)
        row.update(in_place(f, cache0, sets[0]))
        step = Threaded(f, cache0)
        run_row(ctx, row, step, sets, check=None if b == "xla" else check, work_key="bytes")
        del step
    del cache0, sets
