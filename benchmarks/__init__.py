"""Benchmarks of jax_paged_attn: named shapes (shapes.py), the harness (run.py), plots (plot.py)."""
