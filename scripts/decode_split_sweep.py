"""Sweep of num_splits x block_k for the Triton paged decode on the PERF.md decode shapes (GPU)."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import triton as pa
from pallas_kernels.paged_attention.tuning import BlockSizes


def median_time(f, *args, n=30):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def decode(S, ctx, blocks, H=32, Hkv=8, D=128, BS=16):
    nb = S * ctx // BS
    ks = jax.random.split(jax.random.key(0), 4)
    k = jax.random.normal(ks[0], (nb, Hkv, BS, D), jnp.bfloat16)
    v = jax.random.normal(ks[1], (nb, Hkv, BS, D), jnp.bfloat16)
    bt = jax.random.permutation(ks[2], nb).reshape(S, ctx // BS).astype(jnp.int32)
    q = jax.random.normal(ks[3], (S, H, D), jnp.bfloat16)
    lens = jnp.full((S,), ctx, jnp.int32)
    f = jax.jit(lambda *a: pa.paged_decode(*a, scale=D ** -0.5, softcap=None, sliding_window=None,
                                           alibi_slopes=None, sinks=None, k_scale=None,
                                           v_scale=None, block_sizes=blocks))
    t = median_time(f, q, k, v, bt, lens)
    print(f"decode S={S:3d} ctx={ctx:6d} {blocks}: {t * 1e6:7.0f} us "
          f"{4 * S * ctx * Hkv * D / t / 1e12:.2f} TB/s", flush=True)


for splits in (1, 2, 4, 8, 16):
    for block_k, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2)):
        b = BlockSizes(block_k=block_k, num_warps=warps, num_stages=stages, num_splits=splits)
        try:
            decode(64, 4096, b)
            decode(8, 32768, BlockSizes(
                block_k=block_k, num_warps=warps, num_stages=stages, num_splits=splits * 8))
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported
            print(f"{b}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
