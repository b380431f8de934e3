"""The README's Python examples run as written (with the xla backend on CPU)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)   # noqa: S102 - our own README
    out = namespace["out"]
    assert out.shape == (46, 32, 128)
    assert bool(namespace["jnp"].all(namespace["jnp"].isfinite(out)))
