"""The registry and the shape of the tree: every table entry implements its op's Protocol,
kernel packages never import the API, nothing imports in a cycle, no file grows past 800 lines."""

from __future__ import annotations

import ast
import inspect
import pathlib
import sys

import pytest

from jax_paged_attn import backends, interfaces, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_PACKAGES = ("pallas_kernels", "metal_plugin")
SOURCE_DIRS = ("jax_paged_attn", "pallas_kernels", "metal_plugin", "benchmarks", "scripts",
               "tests", "examples")  # fmt: skip


def _entries():
    for name, backend in backends.TABLE.items():
        for op, impl in backend.ops.items():
            yield pytest.param(name, op, impl, id=f"{name}-{op}")


@pytest.mark.parametrize("name, op, impl", list(_entries()))
def test_every_entry_implements_its_protocol(name, op, impl):
    protocol = interfaces.OPS[op]
    assert isinstance(impl, protocol), f"{name}/{op} lacks a method of {protocol.__name__}"
    for method, spec in inspect.getmembers(protocol, inspect.isfunction):
        if method.startswith("_"):
            continue
        want = inspect.signature(spec).parameters
        got = inspect.signature(getattr(impl, method)).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in got.values())
        for arg, p in want.items():
            if arg == "self" or p.kind is p.VAR_KEYWORD:
                continue
            assert arg in got or takes_any, f"{name}/{op}.{method} does not take {arg!r}"


def test_xla_implements_every_op_and_is_the_fallback():
    assert set(backends.TABLE["xla"].ops) == set(interfaces.OPS)
    for op in interfaces.OPS:
        # On the CPU, auto resolves to the readable oracle for every op.
        if backends.platform() == "cpu":
            assert backends.implementation(op, "auto", interpret=False) is reference


def test_auto_choices_name_backends_that_implement_the_op():
    for (op, _case), names in backends.AUTO_GPU.items():
        assert op in interfaces.OPS
        for name in names:
            assert op in backends.TABLE[name].ops, (op, name)


@pytest.mark.skipif(sys.platform != "linux", reason="the Pallas GPU dialects ship in Linux jaxlib")
def test_pallas_kernels_import_on_linux():
    assert backends.PALLAS_IMPORT_ERROR is None


def test_unknown_op_and_backend_name_the_argument():
    with pytest.raises(ValueError, match="op must be one of"):
        backends.implementation("attend", "xla", interpret=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.implementation("attention", "cuda", interpret=False)


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level package-qualified modules a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _sources(*dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_kernel_packages_never_import_the_api():
    bad = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _sources(*KERNEL_PACKAGES)
        for m in _imports(p)
        if m == "jax_paged_attn" or m.startswith(("jax_paged_attn.", "benchmarks", "tests"))
    ]
    assert not bad, bad


def test_no_import_cycles():
    paths = list(_sources("jax_paged_attn", *KERNEL_PACKAGES))
    modules = {_module_name(p): p for p in paths}
    graph = {
        name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()
    }
    # A package's __init__ importing its own submodules is not a cycle worth reporting.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (name.startswith(d + ".") and d in modules)}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join(stack[stack.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_source_file_over_800_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _sources(*SOURCE_DIRS)
        if (n := len(p.read_text().splitlines())) > 800
    }
    assert not long, long
