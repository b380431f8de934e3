"""KV-cache write kernels (slot-mapping scatter into the paged cache): ``triton.py``."""
