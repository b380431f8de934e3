"""The documentation holds: the README's and docs/' Python examples run as written, the API
docstrings' examples pass, and every relative link (and #anchor) in the Markdown resolves."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [README, *DOCS, ROOT / "examples/README.md", ROOT / "benchmarks/NOTES.md"]
LINKED.append(ROOT / "metal_plugin/README.md")


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def _python_blocks(path: pathlib.Path) -> list[str]:
    # ```python blocks are complete programs; ```py blocks are fragments that continue an
    # example (the README's scale-out recipe runs in full as examples/sharded_decode.py).
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_blocks_run():
    blocks = _python_blocks(README)
    assert blocks, "the README has no python example"
    for code in blocks:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    out = namespace["out"]
    assert out.shape == (46, 32, 128)
    assert bool(namespace["jnp"].all(namespace["jnp"].isfinite(out)))


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_docs_python_blocks_run(path):
    for code in _python_blocks(path):
        exec(compile(code, str(path), "exec"), {})  # noqa: S102 - our own docs


def test_api_docstring_examples():
    import doctest

    import jax_paged_attn.attention
    import jax_paged_attn.cache
    import jax_paged_attn.cascade
    import jax_paged_attn.context_parallel
    import jax_paged_attn.expert_parallel
    import jax_paged_attn.metadata
    import jax_paged_attn.mla
    import jax_paged_attn.moe
    import jax_paged_attn.sharding
    import jax_paged_attn.states
    import jax_paged_attn.testing
    import jax_paged_attn.testing.cases

    for module in (
        jax_paged_attn.attention,
        jax_paged_attn.cache,
        jax_paged_attn.cascade,
        jax_paged_attn.context_parallel,
        jax_paged_attn.expert_parallel,
        jax_paged_attn.metadata,
        jax_paged_attn.mla,
        jax_paged_attn.states,
        jax_paged_attn.testing,
        jax_paged_attn.testing.cases,
        jax_paged_attn.moe,
        jax_paged_attn.sharding,
    ):
        result = doctest.testmod(module)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, and a
    -1, -2, ... suffix on repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: pathlib.Path) -> list[str]:
    return re.findall(
        r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _prose(path.read_text())
    )


@pytest.mark.parametrize("path", LINKED, ids=_rel)
def test_relative_links_resolve(path):
    assert path.exists(), path
    links = _links(path)
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ... (public pages)
            assert link.startswith(("https://", "http://", "mailto:")), link
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.is_relative_to(ROOT), f"{_rel(path)}: {link} points outside the repository"
        assert file.exists(), f"{_rel(path)}: {link} does not exist"
        if anchor:
            assert file.suffix == ".md", f"{_rel(path)}: {link}: anchor into a non-Markdown file"
            assert anchor in _anchors(file), f"{_rel(path)}: {link}: no heading #{anchor}"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs/README.md").read_text()
    for page in DOCS:
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"
