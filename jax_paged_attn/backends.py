"""The registry: which implementation of each op every backend provides, and where it runs.

``TABLE`` is the one table. Each entry maps an op name (``interfaces.OPS``: attention, decode,
kv_write, moe, mla; mla: xla only so far) to the object that implements it, a module satisfying that op's ``Protocol``.
The ``xla`` path (``reference.py``) implements every op and is what everything falls back to.

``backend="auto"`` resolves per op and per call shape (``AUTO_GPU``, from measurements); a
kernel backend whose ``check_supported`` rejects a configuration makes ``auto`` try the next
choice and, in the end, ``xla``. Asking explicitly for a backend that cannot run raises
``NotImplementedError`` naming what would.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

import jax

import metal_plugin
from jax_paged_attn import interfaces, reference

# jaxlib builds without the Triton and Mosaic GPU MLIR dialects (e.g. some macOS or Windows
# wheels) cannot import the Pallas GPU kernels; the rest of the library works there, and asking
# for those backends explicitly raises with this error.
try:
    from pallas_kernels.kv_write import triton as triton_kv_write
    from pallas_kernels.moe import mosaic as mosaic_moe
    from pallas_kernels.moe import triton as triton_moe
    from pallas_kernels.paged_attention import mosaic as mosaic_attention
    from pallas_kernels.paged_attention import mosaic_decode
    from pallas_kernels.paged_attention import triton as triton_attention

    PALLAS_IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # pragma: no cover - depends on the jaxlib build
    PALLAS_IMPORT_ERROR = e
    triton_kv_write = triton_moe = mosaic_moe = None
    triton_attention = mosaic_attention = mosaic_decode = None

BACKENDS = ("auto", "xla", "triton", "mosaic", "metal")
_NVIDIA = ("gpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    platforms: tuple[str, ...]  # JAX platforms it compiles for (interpret mode: any)
    interpretable: bool  # runs on the CPU with interpret=True
    ops: Mapping[str, object]  # op -> implementation (see interfaces.OPS)
    min_capability: float = 0.0  # NVIDIA compute capability it needs (Hopper: 9.0)


def _ops(**ops) -> Mapping[str, object]:
    return types.MappingProxyType({op: impl for op, impl in ops.items() if impl is not None})


# fmt: off
TABLE: Mapping[str, Backend] = types.MappingProxyType({
    "xla": Backend("xla", ("cpu", "gpu", "cuda", "rocm", "tpu", "mps", "METAL"), False, _ops(
        attention=reference, decode=reference, kv_write=reference, moe=reference,
        mla=reference)),
    "triton": Backend("triton", _NVIDIA, True, _ops(
        attention=triton_attention, decode=triton_attention, kv_write=triton_kv_write,
        moe=triton_moe)),
    "mosaic": Backend("mosaic", _NVIDIA, True, _ops(
        attention=mosaic_attention, decode=mosaic_decode, moe=mosaic_moe),
        min_capability=9.0),
    "metal": Backend("metal", ("mps",), True, _ops(
        attention=metal_plugin, decode=metal_plugin, kv_write=metal_plugin, moe=metal_plugin)),
})
# fmt: on

# What ``auto`` tries on an NVIDIA GPU, per op and case, fastest first; a backend that cannot
# run the configuration is skipped, and xla is always the last resort. ``moe`` cases:
# "decode" when tokens x top_k <= 256, else "prefill". Measured on an H100
# (benchmarks/NOTES.md, sessions 2 to 4, device time):
#   prefill 8k causal bf16: mosaic 601 TFLOP/s, triton 328;  decode 64x4096: mosaic 3.005 TB/s,
#   triton 3.008, 8x32768: mosaic 2.98, triton 2.97 (parity within 0.5% both ways across runs,
#   so triton, which also reads float8 caches, stays first);  KV write 64k tokens: triton
#   2.82 TB/s, XLA scatter 0.45;  MoE Mixtral: triton 542 TFLOP/s, mosaic 550 (parity);
#   MoE decode (64 tokens): triton 2.91 vs xla 2.88 (parity on Mixtral, lax.ragged_dot). On an
#   H200 (2026-12-02, benchmarks/NOTES.md Session 6, `--only moe_zoo`, first three models) the
#   xla path's capacity form ran 64-token decodes at 4.11 / 3.50 TB/s (Mixtral / Qwen3-30B)
#   against triton's 4.17 / 3.69, so triton. At 4096 tokens it beat the kernels under the
#   benchmark's uniform routing (Mixtral 643 TFLOP/s vs triton 552, mosaic 564), but its
#   overflow rows take a slow loop under skewed routing, so the kernels stay first there.
AUTO_GPU: Mapping[tuple[str, str | None], tuple[str, ...]] = types.MappingProxyType(
    {
        ("decode", None): ("triton", "mosaic"),
        ("attention", None): ("mosaic", "triton"),
        ("kv_write", None): ("triton",),
        ("moe", "prefill"): ("triton", "mosaic"),
        ("moe", "decode"): ("triton",),
    }
)


def platform() -> str:
    return jax.default_backend()


def _capability() -> float:
    try:
        return float(getattr(jax.devices()[0], "compute_capability", "0"))
    except (ValueError, RuntimeError):
        return 0.0


def _runs_here(backend: str) -> bool:
    need = TABLE[backend].min_capability
    return need == 0.0 or _capability() >= need


def available(op: str) -> tuple[str, ...]:
    """Backends that implement ``op`` in this installation (xla first)."""
    return tuple(name for name, b in TABLE.items() if op in b.ops)


def supports(backend: str, op: str, **config) -> bool:
    """Whether ``backend`` implements ``op`` and its kernels accept ``config`` (the keywords of
    that op's ``check_supported``), regardless of the platform JAX runs on."""
    impl = TABLE[backend].ops.get(op)
    if impl is None:
        return False
    try:
        impl.check_supported(**config)
    except NotImplementedError:
        return False
    return True


def _check_op(op: str) -> None:
    if op not in interfaces.OPS:
        raise ValueError(f"op must be one of {tuple(interfaces.OPS)}, got {op!r}")


def implementation(
    op: str, backend: str, *, interpret: bool, case: str | None = None, config=None
) -> object:
    """The object that runs ``op`` for ``backend`` here (``interfaces.OPS[op]``'s protocol).

    ``config``: the keywords of the op's ``check_supported`` (head dim, block size, dtypes...);
    ``auto`` skips a backend that rejects it, an explicit backend raises its error.
    """
    _check_op(op)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}")
    config = config or {}
    here = platform()
    if backend == "auto":
        if here in _NVIDIA:
            choices = AUTO_GPU.get((op, case), AUTO_GPU.get((op, None), ()))
        elif here == "mps":
            choices = ("metal",)
        else:
            choices = ()
        for name in choices:
            impl = TABLE[name].ops.get(op)
            if impl is None or not _runs_here(name):
                continue
            if name == "metal" and not metal_plugin.dispatch_available():
                continue
            if supports(name, op, **config):
                return impl
        return reference
    impl = TABLE[backend].ops.get(op)
    if impl is None:
        why = ""
        if backend in ("triton", "mosaic") and PALLAS_IMPORT_ERROR is not None:
            why = f" (importing the Pallas GPU kernels failed: {PALLAS_IMPORT_ERROR})"
        raise NotImplementedError(
            f"backend={backend!r} has no {op} kernels in this build{why}; backends that "
            f"implement {op}: {available(op)}. Use backend='xla' (runs everywhere) or "
            f"backend='auto'."
        )
    if backend == "xla":
        return impl
    if backend == "metal" and not interpret and here == "mps":
        if not metal_plugin.dispatch_available():  # it says why, once
            return reference
    if interpret:
        if not TABLE[backend].interpretable:
            raise NotImplementedError(f"backend={backend!r} has no interpret mode")
    elif here not in TABLE[backend].platforms:
        raise NotImplementedError(
            f"backend={backend!r} runs on {TABLE[backend].platforms}, but JAX runs on {here!r}. "
            f"Pass interpret=True to run its kernels on the CPU (tests), or use backend='xla'."
        )
    elif not _runs_here(backend):
        raise NotImplementedError(
            f"backend={backend!r} needs compute capability >= {TABLE[backend].min_capability} "
            f"(this GPU: {_capability()}); use backend='triton' or 'xla'."
        )
    impl.check_supported(**config)
    return impl


def name_of(impl: object) -> str:
    """The backend name an implementation belongs to (for messages and tests)."""
    for name, b in TABLE.items():
        if impl in b.ops.values():
            return name
    raise ValueError(f"{impl!r} is not in the registry")
