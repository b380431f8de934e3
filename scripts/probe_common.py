"""What the probe scripts share: the wall-clock timing loop and a paged bf16 KV cache.

Imported by the scripts beside it (run as ``python3 scripts/NAME.py``: this folder is on
``sys.path``). benchmarks/run.py keeps its own, fuller harness.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

CPU = jax.default_backend() != "gpu"


def median_time(f, *a, iters, min_sample_s=3e-3):
  """(median seconds per call, last output): after 2 warm-up calls, ``iters`` samples of
  ``reps`` back-to-back calls (a sample lasts >= ``min_sample_s`` on a GPU), each followed by
  ``block_until_ready``."""
  jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
  t = time.perf_counter(); jax.block_until_ready(f(*a)); one = time.perf_counter() - t
  reps = 1 if CPU else max(1, int(min_sample_s / max(one, 1e-6)))
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(*a)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t) / reps)
  return float(np.median(ts)), out


def paged_cache(num_seqs, ctx, num_kv_heads, head_dim, block_size, *, identity=False, seed=0):
  """Random bf16 K/V pages [NB, Hkv, BS, D] holding ``num_seqs`` contexts of ``ctx`` tokens
  and their block table: a random permutation of the pages, or in order (``identity``)."""
  nb = num_seqs * ctx // block_size
  ks = jax.random.split(jax.random.key(seed), 3)
  k, v = (jax.random.normal(x, (nb, num_kv_heads, block_size, head_dim), jnp.bfloat16)
          for x in ks[:2])
  order = jnp.arange(nb) if identity else jax.random.permutation(ks[2], nb)
  return k, v, order.reshape(num_seqs, ctx // block_size).astype(jnp.int32)


def rel_err(a, b):
  """Relative L2 error of ``a`` against ``b`` (f32)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
