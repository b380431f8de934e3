"""Benchmarks of jax_paged_attn.

- ``run.py``: the command line (``python -m benchmarks.run``): ceilings, our backends and the
  peers in one run, JSON + table + plot;
- ``harness.py``: the run context, rows, JSON, output checks, the table;
- ``timing.py``: the one timer (sample loop, device time from profiler traces or CUDA events,
  L2 rotation), also used by ``sharded.py``, ``moe_kernels.py`` and ``scripts/``;
- ``ceilings.py``, ``attention.py`` (decode, prefill, sweep), ``moe.py``, ``kv_write.py``: the
  groups; ``peers.py``: the other implementations they are compared with;
- ``shapes.py``: the named shapes and their counting; ``plot.py``: figures from a run's JSON;
- ``sharded.py``: N devices against 1; ``moe_kernels.py``: kernel-level MoE sweep.
"""
