"""Pallas kernels behind jax_paged_attn's "triton" and "mosaic" backends.

One folder per op (paged_attention/, kv_write/, moe/), each with triton.py (Triton lowering,
Ampere and newer), mosaic.py (Mosaic GPU lowering, Hopper and newer) and tuning.py. Kernels take
plain arrays and static Python values; the Protocols in jax_paged_attn/interfaces.py are the contract with the API layer.
"""
