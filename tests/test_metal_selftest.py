"""The pure-Python parts of the Mac self-test, with the emulator standing in for MLX."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metal_plugin")
from jax_paged_attn import metal_selftest as selftest  # noqa: E402


def test_exits_with_a_clear_message_without_mlx(capsys):
    try:
        import mlx.core  # noqa: F401

        pytest.skip("MLX is installed here")
    except ImportError:
        pass
    assert selftest.main([]) == 2
    assert "needs MLX" in capsys.readouterr().err


def test_harness_against_xla_with_the_emulator_as_runner():
    picked = (
        "prefill/mixed bfloat16 kv float8_e4m3fn",
        "decode (partitioned) float32 kv float32",
        "fused_moe decode gelu bf16",
    )
    results = selftest.run_cases(select=lambda name: name in picked)
    assert len(results) == len(picked)
    assert all(r.ok for r in results), selftest.report(results)
    assert selftest.report(results).endswith(f"{len(picked)}/{len(picked)} passed")


def test_compare_flags_nan_shape_and_error():
    want = np.ones((2, 3), np.float32)
    assert selftest.compare("a", "float32", want, want).ok
    bad = want.copy()
    bad[0, 0] = np.nan
    assert selftest.compare("b", "float32", want, bad).error == "NaN in output"
    assert not selftest.compare("c", "float32", want, want[:1]).ok
    r = selftest.compare("d", "bfloat16", want, want + 0.1)
    assert not r.ok and "FAIL" in selftest.report([r])
