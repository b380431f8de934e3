"""The tolerance table of the conformance suite, and the comparisons that use it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# By the query/activation dtype: |out - ref| <= atol + rtol * |ref| elementwise and
# ||out - ref|| / ||ref|| <= rel.
TOLERANCE = {
    jnp.dtype(jnp.float32): dict(atol=2e-3, rtol=2e-3, rel=1e-3),
    jnp.dtype(jnp.float16): dict(atol=6e-3, rtol=6e-3, rel=4e-3),
    jnp.dtype(jnp.bfloat16): dict(atol=3e-2, rtol=3e-2, rel=2e-2),
}

# Kernels that compute float32 with full-precision matmuls (Pallas's interpreters, the Metal
# emulator, float32 Triton dots) meet a much tighter bound than the table's float32 row:
# ``assert_close(out, ref, jnp.float32, **FULL_F32)``.
FULL_F32 = dict(atol=1e-4, rtol=1e-4, rel=1e-4)


def _f64(x) -> np.ndarray:
    """float64 copy of a jax or NumPy array of any float dtype (bfloat16 and float8 included)."""
    return np.asarray(x).astype(np.float64)


def rel_error(out, ref) -> float:
    """Relative L2 error ``||out - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    out, ref = _f64(out), _f64(ref)
    norm = np.linalg.norm(ref)
    diff = np.linalg.norm(out - ref)
    if norm == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / norm)


def assert_close(out, ref, dtype, what="", *, atol=None, rtol=None, rel=None):
    """Asserts ``out`` (any float dtype) matches the float64 ``ref`` within ``TOLERANCE[dtype]``.

    ``out`` must be finite everywhere (a NaN means a read of an unused page, slot or padding
    row). ``atol``, ``rtol`` and ``rel`` override the table's entries, for tests that check
    tighter bounds (kernels under an interpreter compute float32 exactly).
    """
    out, ref = _f64(out), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    assert np.all(np.isfinite(out)), (
        f"{what}: non-finite values at {np.argwhere(~np.isfinite(out))[:5].tolist()}"
    )
    assert np.all(np.isfinite(ref)), f"{what}: the reference is not finite"
    tol = dict(TOLERANCE[jnp.dtype(dtype)])
    tol.update({k: v for k, v in (("atol", atol), ("rtol", rtol), ("rel", rel)) if v is not None})
    err = np.abs(out - ref)
    bad = err > tol["atol"] + tol["rtol"] * np.abs(ref)
    assert not bad.any(), (
        f"{what}: {bad.sum()} elements off, worst {err.max():.3g} at "
        f"{tuple(int(i) for i in np.unravel_index(err.argmax(), err.shape))}"
    )
    r = rel_error(out, ref)
    assert r <= tol["rel"], f"{what}: relative error {r:.3g} > {tol['rel']}"
