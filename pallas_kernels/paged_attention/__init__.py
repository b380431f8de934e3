"""Paged attention kernels: ``triton.py`` (Pallas, Triton lowering), ``mosaic.py`` (Pallas, Mosaic
GPU lowering) and ``tuning.py`` (block sizes). Import the backend module you need; importing this
package does not import any kernel module."""
