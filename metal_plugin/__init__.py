"""Metal backend of jax_paged_attn: MSL kernels, the ``mps.metal_kernel_jit`` lowering, a
C++ emulator that runs the same kernel strings on the CPU (``interpret=True``), and a Mac
self-test (``python -m jax_paged_attn.metal_selftest``). See README.md for what is verified."""

from metal_plugin.dispatch import ENV_SWITCH, dispatch_available, unavailable_reason
from metal_plugin.ops import (
    check_moe_supported,
    check_supported,
    fused_moe,
    paged_attention,
    paged_decode,
    write_kv,
)
from metal_plugin.specs import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS

__all__ = [
    "ENV_SWITCH",
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_HEAD_DIMS",
    "check_moe_supported",
    "check_supported",
    "dispatch_available",
    "fused_moe",
    "paged_attention",
    "paged_decode",
    "unavailable_reason",
    "write_kv",
]
