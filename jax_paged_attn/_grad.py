"""Gradients for kernel backends: the kernel runs the forward pass, the xla path the backward.

Pallas and Metal kernels have no autodiff rules of their own. ``with_xla_backward(kernel,
reference)`` returns a function of the same arrays whose forward pass is ``kernel`` and whose
VJP is the VJP of ``reference`` (the pure-JAX implementation of the same math), evaluated at the
same inputs. Integer arrays (block tables, lengths, expert ids) get float0 cotangents, i.e. no
gradient; ``None`` leaves (an absent ALiBi or sink vector) are empty pytrees.
"""

from __future__ import annotations

import jax


def with_xla_backward(kernel, reference):
    """``kernel(*arrays)`` forward, ``jax.vjp(reference, *arrays)`` backward."""

    @jax.custom_vjp
    def run(*arrays):
        return kernel(*arrays)

    def forward(*arrays):
        return kernel(*arrays), arrays

    def backward(arrays, cotangent):
        _, vjp = jax.vjp(reference, *arrays)
        return vjp(cotangent)

    run.defvjp(forward, backward)
    return run
