"""How a :class:`~metal_plugin.specs.KernelSpec` runs inside a JAX program.

* ``interpret=True``: ``jax.pure_callback`` into the C++ emulator (any platform, under jit).
* otherwise: the ``metal_kernel`` primitive, which lowers on JAX's ``mps`` platform to
  ``stablehlo.custom_call @mps.metal_kernel_jit`` with the JSON ``backend_config`` of
  jax-mps PR #212 (``name, source, header, input_names, output_names, grid,
  threadgroup``); the plugin hands those strings to MLX's ``fast.metal_kernel``. On any
  other platform its lowering raises ``NotImplementedError``.

``mlir.register_lowering(..., platform="mps")`` raises unless an ``mps`` backend factory is
registered, so the ``mps`` rule is registered lazily, once the platform is known.
"""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch as jax_dispatch
from jax._src import xla_bridge
from jax._src.interpreters import mlir
from jax.extend import core as jex_core

from metal_plugin import specs

TARGET = "mps.metal_kernel_jit"

metal_kernel_p = jex_core.Primitive("metal_kernel")
metal_kernel_p.multiple_results = True


def _abstract_eval(*avals, spec: specs.KernelSpec):
    del avals
    return [
        jax.core.ShapedArray(tuple(s), jnp.dtype(d))
        for s, d in zip(spec.out_shapes, spec.out_dtypes)
    ]


metal_kernel_p.def_abstract_eval(_abstract_eval)
metal_kernel_p.def_impl(functools.partial(jax_dispatch.apply_primitive, metal_kernel_p))


def _unsupported_lowering(ctx, *args, spec):
    platforms = getattr(ctx.module_context, "platforms", ("?",))
    raise NotImplementedError(
        f"Metal kernel {spec.name!r} compiles only for JAX's 'mps' platform (jax-mps with the "
        f"{TARGET} custom call, PR #212); lowering for {tuple(platforms)}. Pass "
        "interpret=True to run it on the CPU emulator, or use backend='xla'."
    )


def _mps_lowering(ctx, *args, spec):
    result_types = [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_out]
    return mlir.custom_call(
        TARGET,
        result_types=result_types,
        operands=list(args),
        backend_config=json.dumps(spec.backend_config()),
    ).results


mlir.register_lowering(metal_kernel_p, _unsupported_lowering)
_mps_registered = False


def ensure_mps_lowering() -> bool:
    """Registers the ``mps`` lowering once the platform is known; True when registered."""
    global _mps_registered
    if not _mps_registered and xla_bridge.is_known_platform("mps"):
        mlir.register_lowering(metal_kernel_p, _mps_lowering, platform="mps")
        _mps_registered = True
    return _mps_registered


def _emulate(spec, *arrays):
    from metal_plugin import emulator  # builds lazily; importing it costs nothing

    return emulator.run(spec, *(np.asarray(a) for a in arrays))


# What ``interpret=True`` launches: the emulator, or (in the Mac self-test) MLX's
# ``fast.metal_kernel`` with the very same strings.
_runner = _emulate


@contextlib.contextmanager
def use_runner(runner):
    """Temporarily runs ``interpret=True`` launches with ``runner(spec, *np_arrays)``."""
    global _runner
    old, _runner = _runner, runner
    try:
        yield
    finally:
        _runner = old


def _run_host(spec, *arrays):
    return _runner(spec, *arrays)


def call(spec: specs.KernelSpec, *inputs, interpret: bool):
    """Runs one kernel launch; returns its outputs (a tuple)."""
    if len(inputs) != len(spec.input_names):
        raise ValueError(f"{spec.name}: {len(inputs)} inputs for {spec.input_names}")
    if interpret:
        shapes = [
            jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d))
            for s, d in zip(spec.out_shapes, spec.out_dtypes)
        ]
        return tuple(
            jax.pure_callback(
                functools.partial(_run_host, spec), shapes, *inputs, vmap_method="sequential"
            )
        )
    ensure_mps_lowering()
    return tuple(metal_kernel_p.bind(*inputs, spec=spec))
