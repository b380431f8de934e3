"""Paged attention kernels: ``triton.py`` (Pallas, Triton lowering: prefill and mixed batches;
``triton_decode.py`` decode, re-exported; ``triton_common.py`` the shared loop and softmax step),
``mosaic.py`` (Pallas, Mosaic GPU lowering; ``mosaic_decode.py`` decode, ``mosaic_plan.py``
static planning, ``mosaic_items.py`` the per-CTA work items) and ``tuning.py`` (Triton block
sizes). Import the backend module you need; importing this package does not import any kernel
module."""
