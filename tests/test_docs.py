"""The README's Python examples and the API docstrings' examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    # ```python blocks are complete programs and run here; ```py blocks are fragments that
    # continue an example (the scale-out recipe runs in full as examples/sharded_decode.py).
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    out = namespace["out"]
    assert out.shape == (46, 32, 128)
    assert bool(namespace["jnp"].all(namespace["jnp"].isfinite(out)))


def test_api_docstring_examples():
    import doctest

    import jax_paged_attn.attention
    import jax_paged_attn.cache
    import jax_paged_attn.metadata
    import jax_paged_attn.moe
    import jax_paged_attn.sharding

    for module in (
        jax_paged_attn.attention,
        jax_paged_attn.cache,
        jax_paged_attn.metadata,
        jax_paged_attn.moe,
        jax_paged_attn.sharding,
    ):
        result = doctest.testmod(module)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__
