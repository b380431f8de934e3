"""Shared case builders and the tolerance table of the conformance suite.

Every backend runs the same tests: ``pytest --backends=xla,triton`` (default: the
``JPA_BACKENDS`` environment variable, else ``xla``). On a machine without the backend's
hardware, kernel backends run under their interpreter (``interpret=True``): Pallas's for
triton/mosaic, the C++ emulator for metal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

# Several pytest-xdist workers share one GPU: none may grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa

# 8 host devices for the shard_map tests (set before the CPU backend starts; a GPU machine
# keeps its GPUs as the default devices).
jax.config.update("jax_num_cpu_devices", 8)

FP8 = jnp.float8_e4m3fn

# Tolerances by the query/activation dtype: |out - ref| <= atol + rtol * |ref| elementwise and
# ||out - ref|| / ||ref|| <= rel. float32 admits TF32-class matmuls on GPUs (~3e-4).
TOLERANCE = {
    jnp.dtype(jnp.float32): dict(atol=2e-3, rtol=2e-3, rel=1e-3),
    jnp.dtype(jnp.float16): dict(atol=6e-3, rtol=6e-3, rel=4e-3),
    jnp.dtype(jnp.bfloat16): dict(atol=3e-2, rtol=3e-2, rel=2e-2),
}


def pytest_addoption(parser):
    parser.addoption(
        "--backends",
        default=os.environ.get("JPA_BACKENDS", "xla"),
        help="comma-separated backends the conformance suite runs",
    )


def selected_backends(config) -> list[str]:
    names = [b.strip() for b in config.getoption("--backends").split(",") if b.strip()]
    for name in names:
        if name not in jpa.BACKENDS or name == "auto":
            raise pytest.UsageError(f"--backends: unknown backend {name!r}")
    return names


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", selected_backends(metafunc.config))


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


# The query dtype the suite runs a backend in by default: Mosaic GPU kernels take bf16/f16
# only (wgmma), so its conformance runs in bf16 with the bf16 tolerances.
SUITE_DTYPE = {"mosaic": jnp.bfloat16}


def suite_dtype(backend: str):
    return SUITE_DTYPE.get(backend, jnp.float32)


def supports(backend: str, *, head_dim, block_size, q_dtype, kv_dtype) -> bool:
    """Whether the backend's kernels run this configuration (else they must raise
    NotImplementedError naming what they support)."""
    if backend == "xla":
        return True
    from jax_paged_attn import backends

    try:
        backends.module(backend, "attention").check_supported(
            head_dim=head_dim,
            block_size=block_size,
            q_dtype=jnp.dtype(q_dtype),
            kv_dtype=jnp.dtype(kv_dtype),
        )
    except NotImplementedError:
        return False
    return True


def run_kw(backend: str) -> dict:
    """Keyword arguments that run ``backend`` here: interpreted kernels on a CPU."""
    return dict(backend=backend, interpret=backend != "xla" and on_cpu())


def assert_close(out, ref, dtype, what=""):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), (
        f"{what}: non-finite values at {np.argwhere(~np.isfinite(out))[:5].tolist()}"
    )
    tol = TOLERANCE[jnp.dtype(dtype)]
    err = np.abs(out - ref)
    bad = err > tol["atol"] + tol["rtol"] * np.abs(ref)
    assert not bad.any(), (
        f"{what}: {bad.sum()} elements off, worst {err.max():.3g} at "
        f"{np.unravel_index(err.argmax(), err.shape)}"
    )
    norm = np.linalg.norm(ref)
    if norm > 0:
        rel = np.linalg.norm(out - ref) / norm
        assert rel <= tol["rel"], f"{what}: relative error {rel:.3g} > {tol['rel']}"


def stored_values(x, dtype, scale=None):
    """float64 values a cache of ``dtype`` holds after writing ``x`` (float8: per-head scale)."""
    x = jnp.asarray(x, jnp.float32)
    if jnp.dtype(dtype) == FP8:
        s = jnp.asarray(scale, jnp.float32)[:, None]
        q = jnp.clip(x / s, -448.0, 448.0).astype(FP8)
        return np.asarray(q.astype(jnp.float32), np.float64) * np.asarray(s, np.float64)
    return np.asarray(x.astype(dtype).astype(jnp.float32), np.float64)


@dataclasses.dataclass
class Case:
    q: jax.Array
    cache: jpa.KVCache
    meta: jpa.AttentionMetadata
    k_seqs: list  # float64 [L_i, Hkv, D]: what the cache holds, dequantised
    v_seqs: list
    context_lens: np.ndarray
    cu_seqlens_q: np.ndarray
    new_k: np.ndarray  # the step's new tokens [T, Hkv, D] (float32), for layer tests
    new_v: np.ndarray

    def reference(self, **opts):
        from tests import oracle

        opts = {
            k: (None if v is None else np.asarray(v, np.float64) if hasattr(v, "shape") else v)
            for k, v in opts.items()
        }
        return oracle.attention(
            self.q.astype(jnp.float32),
            self.k_seqs,
            self.v_seqs,
            self.context_lens,
            self.cu_seqlens_q,
            **opts,
        )


def nan_cache(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, scale=None):
    """A cache from the API whose every slot holds NaN until written."""
    kw = {}
    if jnp.dtype(kv_dtype) == FP8:
        kw = dict(k_scale=scale, v_scale=scale)
    cache = jpa.KVCache.init(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, **kw)
    nan = jnp.full(cache.k.shape, jnp.nan, cache.dtype)
    return dataclasses.replace(cache, k=nan, v=nan + 0)


def build_case(
    rng,
    seqs,
    *,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    block_size=16,
    dtype=jnp.float32,
    kv_dtype=None,
    pad_rows=0,
    spare_blocks=3,
    write_new_only=False,
) -> Case:
    """A batch of sequences ``[(q_len, kv_len), ...]`` over a cache built through the API.

    Blocks are a random permutation of the cache; block-table entries past each context and
    every unused page and slot hold NaN pages, so any read out of range shows up as NaN.
    Query rows past the last sequence (``pad_rows``) are NaN too. With ``write_new_only`` the
    cache holds only the context *before* this step (for the layer, which writes the rest).
    """
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    num_seqs = len(seqs)
    nblk = [math.ceil(kv / block_size) for _, kv in seqs]
    max_blocks = max(nblk + [1]) + 1
    num_blocks = sum(nblk) + spare_blocks
    perm = rng.permutation(num_blocks)
    used, spare = perm[: sum(nblk)], perm[sum(nblk) :]
    tables = rng.choice(spare, size=(num_seqs, max_blocks)).astype(np.int32)
    offset = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = used[offset : offset + n]
        offset += n
    scale = None
    if jnp.dtype(kv_dtype) == FP8:
        scale = rng.uniform(0.004, 0.02, size=num_kv_heads).astype(np.float32)
    cache = nan_cache(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, scale)

    q_lens = np.array([n for n, _ in seqs], np.int32)
    context_lens = np.array([kv for _, kv in seqs], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(cu[-1]) + pad_rows
    k_seqs, v_seqs, slots, ks, vs = [], [], [], [], []
    new_k = np.zeros((num_tokens, num_kv_heads, head_dim), np.float32)
    new_v = np.zeros_like(new_k)
    step_slots = np.full((num_tokens,), -1, np.int32)
    for i, (n, ctx) in enumerate(seqs):
        k = rng.standard_normal((ctx, num_kv_heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((ctx, num_kv_heads, head_dim)).astype(np.float32)
        pos = np.arange(ctx)
        seq_slots = tables[i, pos // block_size] * block_size + pos % block_size
        k_seqs.append(stored_values(k, kv_dtype, scale))
        v_seqs.append(stored_values(v, kv_dtype, scale))
        first_new = max(ctx - n, 0)
        keep = slice(0, first_new) if write_new_only else slice(0, ctx)
        slots.append(seq_slots[keep])
        ks.append(k[keep])
        vs.append(v[keep])
        rows = slice(cu[i] + (n - (ctx - first_new)), cu[i + 1])
        new_k[rows], new_v[rows] = k[first_new:], v[first_new:]
        step_slots[rows] = seq_slots[first_new:]
    if slots and sum(len(s) for s in slots):
        cache = jpa.write_kv(
            cache,
            jnp.asarray(np.concatenate(ks)),
            jnp.asarray(np.concatenate(vs)),
            jnp.asarray(np.concatenate(slots)),
            backend="xla",
        )
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
    q[int(cu[-1]) :] = np.nan
    meta = jpa.AttentionMetadata(
        jnp.asarray(tables), jnp.asarray(context_lens), jnp.asarray(cu), jnp.asarray(step_slots)
    )
    return Case(jnp.asarray(q, dtype), cache, meta, k_seqs, v_seqs, context_lens, cu, new_k, new_v)


# Fresh inputs on every run; JPA_SEED=<n> replays a run (the seed is in the report header).
SEED = int(os.environ.get("JPA_SEED", np.random.SeedSequence().entropy % (2**31)))


def pytest_report_header(config):
    return [
        f"jax {jax.__version__} on {jax.default_backend()}; backends: "
        f"{','.join(selected_backends(config))}; JPA_SEED={SEED}"
    ]


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])
