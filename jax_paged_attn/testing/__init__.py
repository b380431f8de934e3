"""Test kit: paged-cache cases, float64 oracles and tolerances (like ``numpy.testing``).

The library's own conformance suite and benchmarks use it; so can a serving engine built on
``jax_paged_attn`` to check its calls. ``build_case`` lays a batch ``[(q_len, kv_len), ...]``
over a cache with permuted blocks and NaN in every unused page, slot and padding query row,
and keeps the values the float64 oracle needs; ``random_paged_kv`` builds large caches on the
device for benchmarks.

>>> import numpy as np
>>> import jax_paged_attn as jpa
>>> from jax_paged_attn import testing
>>> # a decode row over 37 keys, a 5-token prompt chunk after 15 cached tokens, an idle slot
>>> case = testing.build_case(np.random.default_rng(0), [(1, 37), (5, 20), (0, 0)], pad_rows=2)
>>> out = jpa.paged_attention(case.q, case.cache, case.meta, softcap=30.0, backend="xla")
>>> testing.assert_close(out, case.reference(softcap=30.0), case.q.dtype)
>>> testing.rel_error(out, case.reference(softcap=30.0)) < 1e-5
True
"""

from jax_paged_attn.testing import oracle
from jax_paged_attn.testing.cases import (
    FP8,
    Case,
    build_case,
    nan_cache,
    random_paged_kv,
    stored_values,
)
from jax_paged_attn.testing.tolerance import FULL_F32, TOLERANCE, assert_close, rel_error

__all__ = [
    "FP8",
    "FULL_F32",
    "TOLERANCE",
    "Case",
    "assert_close",
    "build_case",
    "nan_cache",
    "oracle",
    "random_paged_kv",
    "rel_error",
    "stored_values",
]
