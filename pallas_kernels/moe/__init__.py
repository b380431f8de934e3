"""Fused mixture-of-experts kernels.

align.py   token-to-expert alignment on the device (static bounds, pure jnp)
triton.py  Pallas/Triton grouped GEMMs (gate_up + fused activation, down + routing weight)
mosaic.py  Pallas/Mosaic GPU grouped GEMMs (Hopper: TMA + wgmma pipelines)
tuning.py  block sizes by device class, dtype and rows per expert
common.py  activations, dtype checks, the scatter-free top-k combine
"""

from pallas_kernels.moe.align import Alignment, align_tokens, padded_rows
from pallas_kernels.moe.tuning import GemmBlocks, MoeBlocks, get_blocks

__all__ = ["Alignment", "GemmBlocks", "MoeBlocks", "align_tokens", "get_blocks", "padded_rows"]
