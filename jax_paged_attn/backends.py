"""One table: which backend runs which op, where.

``backend="auto"`` resolves per op from the platform JAX runs on and from a dispatch table
built from measurements (``AUTO_GPU``); a kernel backend that cannot run a configuration
(``check_supported`` raises) makes ``auto`` fall back to the next choice and, in the end, to
``xla``. Asking explicitly for a backend that cannot run raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import importlib
import types

import jax

BACKENDS = ("auto", "xla", "triton", "mosaic", "metal")
OPS = ("attention", "kv_write", "moe")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    platforms: tuple[str, ...]  # JAX platforms it compiles for (interpret mode: any)
    modules: dict  # op -> module path holding the kernel entry points
    interpretable: bool  # can run on the CPU with interpret=True
    min_capability: float = 0.0  # NVIDIA compute capability it needs (Hopper: 9.0)


TABLE = {
    "xla": Backend("xla", ("cpu", "gpu", "cuda", "rocm", "tpu", "mps", "METAL"), {}, False),
    "triton": Backend(
        "triton",
        ("gpu", "cuda"),
        {
            "attention": "pallas_kernels.paged_attention.triton",
            "kv_write": "pallas_kernels.kv_write.triton",
            "moe": "pallas_kernels.moe.triton",
        },
        True,
    ),
    "mosaic": Backend(
        "mosaic",
        ("gpu", "cuda"),
        {"attention": "pallas_kernels.paged_attention.mosaic", "moe": "pallas_kernels.moe.mosaic"},
        True,
        min_capability=9.0,
    ),
    "metal": Backend(
        "metal",
        ("mps",),
        {"attention": "metal_plugin", "kv_write": "metal_plugin", "moe": "metal_plugin"},
        True,
    ),
}

# What ``auto`` tries on an NVIDIA GPU, per op and case, fastest first; a backend that cannot
# run the configuration (check_supported) is skipped, and xla is always the last resort.
# "decode" is paged_decode; "prefill" is paged_attention (prefill chunks, decode tokens or any
# mix). Measured on an H100 (benchmarks/NOTES.md, sessions 2 to 4, device time):
#   prefill 8k causal bf16: mosaic 601 TFLOP/s, triton 328;  decode 64x4096: mosaic 3.005 TB/s,
#   triton 3.008, 8x32768: mosaic 2.98, triton 2.97 (parity within 0.5% both ways across runs,
#   so triton, which also reads float8 caches, stays first);  KV write 64k
#   tokens: triton 2.82 TB/s, XLA scatter 0.45;  MoE Mixtral: triton 542 TFLOP/s, mosaic 550
#   (parity);  MoE decode (64 tokens): triton 2.91 vs xla 2.88 (parity), so xla
#   (lax.ragged_dot, one kernel fewer to maintain) stays.
AUTO_GPU = {
    ("attention", "decode"): ("triton", "mosaic"),
    ("attention", "prefill"): ("mosaic", "triton"),
    ("kv_write", None): ("triton",),
    ("moe", "prefill"): ("triton", "mosaic"),
    ("moe", "decode"): ("xla",),
}


def platform() -> str:
    return jax.default_backend()


def _is_nvidia(p: str) -> bool:
    return p in ("gpu", "cuda")


def _capability() -> float:
    try:
        return float(getattr(jax.devices()[0], "compute_capability", "0"))
    except (ValueError, RuntimeError):
        return 0.0


def _runs_here(backend: str) -> bool:
    need = TABLE[backend].min_capability
    return need == 0.0 or _capability() >= need


def built(backend: str, op: str) -> bool:
    """Whether the kernel module of ``backend`` for ``op`` exists in this installation."""
    path = TABLE[backend].modules.get(op)
    if path is None:
        return False
    try:
        importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name is not None and path.startswith(e.name):
            return False
        raise
    return True


def available(op: str) -> tuple[str, ...]:
    """Backends (besides xla) that implement ``op`` here."""
    return ("xla",) + tuple(b for b in ("triton", "mosaic", "metal") if built(b, op))


def module(backend: str, op: str) -> types.ModuleType:
    return importlib.import_module(TABLE[backend].modules[op])


def resolve(
    backend: str, op: str, *, interpret: bool, case: str | None = None, supported=None
) -> str:
    """Name of the backend that runs ``op``.

    ``supported(name)`` raises NotImplementedError when a kernel backend cannot run this
    configuration (head dim, block size, dtype); ``auto`` then tries the next one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}")
    p = platform()
    if backend == "auto":
        if _is_nvidia(p):
            choices = AUTO_GPU.get((op, case), AUTO_GPU.get((op, None), ()))
        elif p == "mps":
            choices = ("metal",)
        else:
            choices = ()
        for name in choices:
            if name == "xla" or not built(name, op) or not _runs_here(name):
                continue
            if name == "metal":
                import metal_plugin

                if not metal_plugin.dispatch_available():
                    continue
            try:
                if supported is not None:
                    supported(name)
            except NotImplementedError:
                continue
            return name
        return "xla"
    if backend == "xla":
        return "xla"
    if not built(backend, op):
        raise NotImplementedError(
            f"backend={backend!r} has no {op} kernels in this build; backends that implement "
            f"{op}: {available(op)}. Use backend='xla' (runs everywhere) or backend='auto'."
        )
    if backend == "metal" and not interpret and p == "mps":
        import metal_plugin

        if not metal_plugin.dispatch_available():  # it says why, once
            return "xla"
    if interpret:
        if not TABLE[backend].interpretable:
            raise NotImplementedError(f"backend={backend!r} has no interpret mode")
    elif p not in TABLE[backend].platforms:
        raise NotImplementedError(
            f"backend={backend!r} runs on {TABLE[backend].platforms}, but JAX runs on {p!r}. "
            f"Pass interpret=True to run its kernels on the CPU (tests), or use backend='xla'."
        )
    elif not _runs_here(backend):
        raise NotImplementedError(
            f"backend={backend!r} needs compute capability >= {TABLE[backend].min_capability} "
            f"(this GPU: {_capability()}); use backend='triton' or 'xla'."
        )
    if supported is not None:
        supported(backend)
    return backend
