"""Trace-time validation shared by the public API.

Every check raises ``ValueError`` whose message starts with the argument's name, so a user
sees at once which input is wrong. Only shapes, dtypes and static Python values are checked
here; what needs the array *values* lives in :func:`jax_paged_attn.check_metadata`.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
CACHE_DTYPES = FLOAT_DTYPES + (jnp.float8_e4m3fn,)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def as_array(name: str, x, *, ndim: int | None = None) -> jax.Array:
    if x is None:
        raise ValueError(f"{name} must be an array, got None")
    if not isinstance(x, jax.Array):  # NumPy arrays and lists become JAX arrays
        try:
            x = jnp.asarray(x)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument's name
            raise ValueError(f"{name} must be an array, got {type(x).__name__}") from e
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
    return x


def int_array(name: str, x, *, ndim: int, shape: tuple | None = None) -> jax.Array:
    """An integer array of the given rank, converted to int32."""
    x = as_array(name, x, ndim=ndim)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array (int32), got dtype {dtype_name(x.dtype)}"
        )
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x.astype(jnp.int32) if x.dtype != jnp.int32 else x


def float_vector(name: str, x, length: int, what: str) -> jax.Array | None:
    """Optional f32 [length] vector (ALiBi slopes, sinks, scales)."""
    if x is None:
        return None
    x = as_array(name, x, ndim=1)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {dtype_name(x.dtype)}")
    if x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) ({what}), got {tuple(x.shape)}")
    return x.astype(jnp.float32)


def static_number(
    name: str, x, *, positive: bool = True, integer: bool = False, none_means: str | None = None
):
    """A static (Python) number; None passes through. ``none_means`` says what None stands for
    (e.g. "no softcap"), for the error message of a non-positive value."""
    if x is None:
        return None
    if isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0:
        try:
            x = x.item()
        except jax.errors.ConcretizationTypeError as e:
            raise ValueError(f"{name} must be a static Python number, not a traced value") from e
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a Python number or None, got {type(x).__name__}")
    if integer and int(x) != x:
        raise ValueError(f"{name} must be an integer, got {x}")
    if positive and not x > 0:
        hint = f" (None means {none_means})" if none_means else ""
        raise ValueError(f"{name} must be > 0{hint}, got {x}")
    return int(x) if integer else float(x)


def one_of(name: str, x, allowed) -> None:
    if x not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {x!r}")


def mesh_axis_size(mesh, axis) -> int:
    """The size of mesh axis ``axis``; ValueError naming ``mesh`` or ``axis`` otherwise."""
    from jax.sharding import Mesh  # noqa: PLC0415 - keeps this module free of sharding imports

    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(
            f"axis must be one of the mesh's axes {tuple(mesh.axis_names)}, got {axis!r}"
        )
    return mesh.shape[axis]
