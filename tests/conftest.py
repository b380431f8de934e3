"""pytest plumbing of the conformance suite; cases, oracles and tolerances live in the kit
(``jax_paged_attn.testing``).

Every backend runs the same tests: ``pytest --backends=xla,triton`` (default: the
``JPA_BACKENDS`` environment variable, else ``xla``). On a machine without the backend's
hardware, kernel backends run under their interpreter (``interpret=True``): Pallas's for
triton/mosaic, the C++ emulator for metal.
"""

from __future__ import annotations

import os
import zlib

# Several pytest-xdist workers share one GPU: none may grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax

# jax imports its Pallas interpreter lazily, inside the first trace of an interpreted kernel,
# and that import registers a trace-context option (pallas_fuser_disable_nested_fuse): the jit
# cache entry of that first trace then never matches again, and the next call recompiles.
# Importing the option's module up front keeps the no-recompile checks true from the first call.
import jax.experimental.pallas.fuser  # noqa: F401
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa

# 8 host devices for the shard_map tests (set before the CPU backend starts; a GPU machine
# keeps its GPUs as the default devices).
jax.config.update("jax_num_cpu_devices", 8)


def pytest_addoption(parser):
    parser.addoption(
        "--backends",
        default=os.environ.get("JPA_BACKENDS", "xla"),
        help="comma-separated backends the conformance suite runs",
    )
    parser.addoption(
        "--fuzz-cases",
        type=int,
        default=int(os.environ.get("JPA_FUZZ_CASES", "50")),
        help="random serving batches tests/test_fuzz.py runs per backend (env JPA_FUZZ_CASES)",
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

    return backends.supports(
        backend,
        "attention",
        head_dim=head_dim,
        block_size=block_size,
        q_dtype=jnp.dtype(q_dtype),
        kv_dtype=jnp.dtype(kv_dtype),
    )


def run_kw(backend: str) -> dict:
    """Keyword arguments that run ``backend`` here: interpreted kernels on a CPU."""
    return dict(backend=backend, interpret=backend != "xla" and on_cpu())


# Fresh inputs on every run; JPA_SEED=<n> replays a run (the report header prints its value).
SEED = int(os.environ.get("JPA_SEED", np.random.SeedSequence().entropy % (2**31)))


def pytest_report_header(config):
    return [
        f"jax {jax.__version__} on {jax.default_backend()}; backends: "
        f"{','.join(selected_backends(config))}; JPA_SEED={SEED}"
    ]


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])
