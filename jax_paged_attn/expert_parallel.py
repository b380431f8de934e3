"""Expert-parallel MoE with ``jax.shard_map`` (re-exported by ``jax_paged_attn.sharding``).

``w_gate_up [E, Hd, 2I]`` and ``w_down [E, I, Hd]`` (and the biases ``b_gate_up [E, 2I]``,
``b_down [E, Hd]``) are sharded ``P(axis)`` on the expert axis, so device ``d`` holds experts
``d*E/n : (d+1)*E/n``; tokens, router weights and ids are replicated. Each device maps global
ids to local ones (``ids - d*E/n``); ids outside ``[0, E/n)`` contribute zero, biases included
(the MoE contract), and a float32 ``psum`` over the axis adds the devices' partial outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_paged_attn import _checks
from jax_paged_attn.moe import ACTIVATIONS, fused_moe

__all__ = ["local_expert_ids", "moe_specs", "shard_fused_moe"]


def moe_specs(axis: str):
    """``(in_specs, out_specs)`` of expert-parallel :func:`fused_moe`: ``x, weights, ids``
    replicated, ``w_gate_up, w_down`` (and ``b_gate_up, b_down``) ``P(axis)`` (expert axis),
    ``y`` replicated."""
    return (P(), P(axis), P(axis), P(), P(), P(axis), P(axis)), P()


def local_expert_ids(ids, axis: str, num_local_experts: int):
    """Inside ``shard_map``: global expert ids to this device's local ids
    (``ids - axis_index(axis) * num_local_experts``). Ids of experts on other devices fall
    outside ``[0, num_local_experts)``, which :func:`fused_moe` treats as contributing zero."""
    return ids - lax.axis_index(axis).astype(ids.dtype) * num_local_experts


def _experts(name, w, num_experts, ndim):
    w = _checks.as_array(name, w, ndim=ndim)
    if w.shape[0] != num_experts:
        raise ValueError(
            f"{name} must have {num_experts} experts (as w_gate_up), got shape {tuple(w.shape)}"
        )
    return w


def shard_fused_moe(
    mesh: Mesh,
    axis: str,
    *,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    backend: str = "auto",
    interpret: bool = False,
):
    """Expert-parallel :func:`fused_moe` over mesh axis ``axis``.

    Returns ``f(x, w_gate_up, w_down, weights, ids, b_gate_up=None, b_down=None) -> y`` with
    the meaning of ``fused_moe(x, w_gate_up, w_down, weights, ids, activation=...,
    b_gate_up=..., b_down=...)`` (global expert ids; ``swigluoai`` for gpt-oss). Device ``d``
    holds experts ``d*E/n : (d+1)*E/n`` (weights and biases sharded ``P(axis)``; place them
    with ``NamedSharding(mesh, P(axis))`` so they never move), computes the tokens'
    contributions of its experts, and a ``psum`` (in float32) adds the partial outputs; ``y``
    is replicated, in ``x.dtype``. ``ValueError`` naming ``w_gate_up`` when ``E`` is not a
    multiple of the axis size. Usable under ``jax.jit``.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    >>> moe = jax.jit(shard_fused_moe(mesh, "ep", backend="xla"))
    >>> x = jnp.ones((3, 8)); wgu = jnp.ones((4, 8, 32)) / 8; wd = jnp.ones((4, 16, 8)) / 16
    >>> moe(x, wgu, wd, jnp.full((3, 2), 0.5), jnp.array([[0, 3]] * 3, jnp.int32)).shape
    (3, 8)
    """
    n = _checks.mesh_axis_size(mesh, axis)
    _checks.one_of("activation", activation, ACTIVATIONS)

    def moe(x, w_gate_up, w_down, weights, ids, b_gate_up=None, b_down=None):
        w_gate_up = _checks.as_array("w_gate_up", w_gate_up, ndim=3)
        num_experts = w_gate_up.shape[0]
        if num_experts % n:
            raise ValueError(
                f"w_gate_up has {num_experts} experts, which must be a multiple of "
                f"the {n} devices of mesh axis {axis!r}"
            )
        w_down = _experts("w_down", w_down, num_experts, 3)
        if b_gate_up is not None:
            b_gate_up = _experts("b_gate_up", b_gate_up, num_experts, 2)
        if b_down is not None:
            b_down = _experts("b_down", b_down, num_experts, 2)
        ids = _checks.int_array("ids", ids, ndim=2)
        local_experts = num_experts // n

        def run(x, w_gate_up, w_down, weights, ids, b_gate_up, b_down):
            y = fused_moe(
                x,
                w_gate_up,
                w_down,
                weights,
                local_expert_ids(ids, axis, local_experts),
                activation=activation,
                b_gate_up=b_gate_up,
                b_down=b_down,
                swiglu_alpha=swiglu_alpha,
                swiglu_limit=swiglu_limit,
                backend=backend,
                interpret=interpret,
            )
            return lax.psum(y.astype(jnp.float32), axis).astype(y.dtype)

        in_specs, out_specs = moe_specs(axis)
        return jax.shard_map(
            run, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )(x, w_gate_up, w_down, weights, ids, b_gate_up, b_down)

    return moe
