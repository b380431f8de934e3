"""Block-size sweep of the Triton paged-attention kernels on PERF.md shapes (GPU)."""
import sys, time, jax, jax.numpy as jnp, numpy as np
from pallas_kernels.paged_attention import triton as pa
from pallas_kernels.paged_attention.tuning import BlockSizes as B
I = jax.default_backend() != "gpu"; SM = 1 if I else 1
def tm(f, *a, n=3 if I else 30):
  f(*a).block_until_ready(); ts = []
  for _ in range(n):
    t = time.perf_counter(); f(*a).block_until_ready(); ts.append(time.perf_counter() - t)
  return float(np.median(ts))
def cache(S, ctx, Hkv, D, BS):
  nb = S * ctx // BS; ks = jax.random.split(jax.random.key(0), 3)
  k, v = (jax.random.normal(x, (nb, Hkv, BS, D), jnp.bfloat16) for x in ks[:2])
  bt = jax.random.permutation(ks[2], nb).reshape(S, ctx // BS).astype(jnp.int32)
  return k, v, bt
kw = dict(softcap=None, sliding_window=None, alibi_slopes=None, sinks=None, k_scale=None, v_scale=None, interpret=I)
def decode(S, ctx, H=32, Hkv=8, D=128, BS=16, b=None):
  k, v, bt = cache(S, ctx, Hkv, D, BS); q = jax.random.normal(jax.random.key(7), (S, H, D), jnp.bfloat16); L = jnp.full((S,), ctx, jnp.int32)
  f = jax.jit(lambda *a: pa.paged_decode(*a, scale=D**-.5, block_sizes=b, **kw))
  t = tm(f, q, k, v, bt, L); print(f"decode S={S} ctx={ctx} {b}: {t*1e6:.0f} us {4*S*ctx*Hkv*D/t/1e12:.2f} TB/s", flush=True)
def prefill(S, n, ctx, H=32, Hkv=8, D=128, BS=16, b=None):
  k, v, bt = cache(S, ctx, Hkv, D, BS); q = jax.random.normal(jax.random.key(7), (S * n, H, D), jnp.bfloat16)
  L = jnp.full((S,), ctx, jnp.int32); cu = jnp.arange(S + 1, dtype=jnp.int32) * n
  f = jax.jit(lambda *a: pa.paged_attention(*a, scale=D**-.5, block_sizes=b, **kw))
  pairs = S * sum(min(ctx, ctx - n + j + 1) for j in range(n))
  t = tm(f, q, k, v, bt, L, cu); print(f"prefill S={S} n={n} ctx={ctx} {b}: {t*1e3:.2f} ms {4*pairs*D*H/t/1e12:.0f} TFLOP/s", flush=True)
x = jnp.ones((1 << (20 if I else 29),), jnp.bfloat16); t = tm(jax.jit(lambda x: x * 1.5), x); print(f"copy {4*x.size/t/1e12:.2f} TB/s")
if I:
  decode(2, 64, 8, 2, 64); prefill(1, 64, 64, 8, 2, 64); sys.exit()
for b in [None, B(block_k=32, num_stages=4), B(block_k=128, num_stages=2), B(block_k=64, num_warps=8, num_stages=4)]:
  decode(64, 4096, b=b); decode(8, 32768, b=b)
for b in [None, B(block_m=128, block_k=128, num_warps=8, num_stages=3), B(block_m=64, block_k=64, num_warps=4, num_stages=3), B(block_m=128, block_k=32, num_warps=4, num_stages=4)]:
  prefill(1, 8192, 8192, b=b); prefill(4, 2048, 4096, b=b)
