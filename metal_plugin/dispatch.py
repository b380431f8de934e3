"""Whether the Metal kernels can run natively here, and the one-time message when not.

The API layer calls :func:`dispatch_available` before choosing ``backend="metal"`` without
``interpret``: on an Apple GPU (JAX platform ``mps``) whose jax-mps plugin provides the
``mps.metal_kernel_jit`` custom call, the ops lower to it; otherwise the ``xla`` path runs.
``JAX_PAGED_ATTN_METAL=0`` turns the custom call off.
"""

from __future__ import annotations

import importlib
import os
import warnings

import jax

ENV_SWITCH = "JAX_PAGED_ATTN_METAL"
_warned: set[str] = set()


def custom_call_available() -> bool:
    """True when the installed jax-mps plugin exposes ``metal_kernel_jit`` (PR #212)."""
    try:
        ops = importlib.import_module("jax_plugins.mps.ops")
    except Exception:  # not installed, or a plugin that fails to import
        return False
    return callable(getattr(ops, "metal_kernel_jit", None))


def unavailable_reason() -> str | None:
    """Why the custom call cannot be used here, or None when it can."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return f"{ENV_SWITCH}=0 turns the Metal custom call off"
    platform = jax.default_backend()
    if platform != "mps":
        return f"JAX runs on {platform!r}, not on an Apple GPU through jax-mps ('mps')"
    if not custom_call_available():
        return (
            "the installed jax-mps has no mps.metal_kernel_jit custom call "
            "(it arrives with jax-mps PR #212)"
        )
    return None


def dispatch_available(*, warn: bool = True) -> bool:
    """True when ops can lower to ``mps.metal_kernel_jit``; else (once per reason) warns
    that the ``xla`` backend runs instead."""
    reason = unavailable_reason()
    if reason is None:
        return True
    if warn and reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"jax_paged_attn: Metal kernels unavailable ({reason}); "
            "running the xla backend instead.",
            RuntimeWarning,
            stacklevel=2,
        )
    return False
