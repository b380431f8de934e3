"""CPU emulator for the Metal kernels: MSL compiled as C++20 against ``metal_shim.h``.

:func:`run` takes a :class:`~metal_plugin.specs.KernelSpec` (or the same fields parsed from
an emitted custom call) and numpy inputs, writes the kernel signature the way MLX's
``metal_kernel`` does, compiles it with g++ into a shared library cached by a hash of all
sources and flags, and launches it with one OS thread per Metal thread. Outputs start
poisoned (all bytes 0xff: NaN for floats), because on Metal they arrive uninitialised.

:func:`run_sanitized` builds the same kernel with ``-fsanitize=thread`` or ``address`` into
a stand-alone executable (``driver.cc``) and runs it in a subprocess, so the sanitizer
runtime loads first, as it must.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax.numpy as jnp
import numpy as np

from metal_plugin import specs

HERE = pathlib.Path(__file__).parent
CXX = os.environ.get("JAX_PAGED_ATTN_CXX", "g++")
BASE_FLAGS = ("-std=c++20", "-pthread", "-w", f"-I{HERE}")
ATTRIBUTES = (  # (name, type), as MLX declares them when a body mentions them
    ("thread_position_in_grid", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threads_per_threadgroup", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("grid_size", "uint3"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("threads_per_simdgroup", "uint"),
)

_libs: dict[str, tuple[ctypes.CDLL, threading.Lock]] = {}
_libs_lock = threading.Lock()


def cache_dir() -> pathlib.Path:
    """``$JAX_PAGED_ATTN_EMU_CACHE``, else ``metal_plugin/_build/emu`` when writable, else
    ``~/.cache/jax_paged_attn/metal_emu``."""
    env = os.environ.get("JAX_PAGED_ATTN_EMU_CACHE")
    if env:
        d = pathlib.Path(env)
    else:
        d = HERE.parent / "_build" / "emu"
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            d = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
            d = d / "jax_paged_attn" / "metal_emu"
    d.mkdir(parents=True, exist_ok=True)
    return d


def translation_unit(
    name: str,
    source: str,
    header: str,
    input_names,
    input_dtypes,
    input_shapes,
    output_names,
    output_dtypes,
) -> str:
    """The C++ file: runtime, header, the kernel with an MLX-style signature, a launcher."""
    params, casts = [], []
    for i, (n, dt, shape) in enumerate(zip(input_names, input_dtypes, input_shapes)):
        t = specs.MSL_TYPES[dt]
        if len(shape) == 0:  # MLX passes 0-d inputs by constant reference
            params.append(f"const constant {t}& {n}")
            casts.append(f"*static_cast<const {t}*>(b[{i}])")
        else:
            params.append(f"const device {t}* {n}")
            casts.append(f"static_cast<const {t}*>(b[{i}])")
    for j, (n, dt) in enumerate(zip(output_names, output_dtypes)):
        t = specs.MSL_TYPES[dt]
        params.append(f"device {t}* {n}")
        casts.append(f"static_cast<{t}*>(b[{len(input_names) + j}])")
    params += [f"{t} {n}" for n, t in ATTRIBUTES]
    casts += [f"a.{n}" for n, _ in ATTRIBUTES]
    sep = ",\n    "
    return (
        '#include "runtime.h"\n'
        f"// ---- header of {name}\n{header}\n"
        f"// ---- kernel {name}\n"
        f"static void kernel_{name}(\n    {sep.join(params)}) {{\n{source}\n}}\n"
        f"static void thunk(void** b, const emu::Attrs& a) {{\n"
        f"  kernel_{name}({', '.join(casts)});\n}}\n"
        'extern "C" int emu_launch(void** b, const unsigned* grid, const unsigned* tg) {\n'
        "  return emu::launch(thunk, b, grid, tg);\n}\n"
    )


def _runtime_text() -> str:
    return "".join((HERE / f).read_text() for f in ("metal_shim.h", "runtime.h", "driver.cc"))


def _compile(tu: str, flags: tuple[str, ...], suffix: str, extra_sources=()) -> pathlib.Path:
    key = hashlib.sha256("\0".join((tu, _runtime_text(), CXX, *flags, suffix)).encode())
    out = cache_dir() / f"{key.hexdigest()[:24]}{suffix}"
    if out.exists():
        return out
    if shutil.which(CXX) is None:
        raise RuntimeError(
            f"the Metal emulator needs a C++20 compiler; {CXX!r} not found (set JAX_PAGED_ATTN_CXX)"
        )
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = pathlib.Path(tmp) / "kernel.cc"
        src.write_text(tu)
        tmp_out = pathlib.Path(tmp) / out.name
        cmd = [CXX, *BASE_FLAGS, *flags, str(src), *map(str, extra_sources), "-o", str(tmp_out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{res.stderr[-6000:]}")
        os.replace(tmp_out, out)  # atomic: parallel test workers may build the same kernel
    return out


def _fields(spec_or_fields, inputs):
    f = spec_or_fields
    if isinstance(f, specs.KernelSpec):
        f = dict(
            name=f.name,
            source=f.source,
            header=f.header,
            input_names=f.input_names,
            output_names=f.output_names,
            grid=f.grid,
            threadgroup=f.threadgroup,
            out_shapes=f.out_shapes,
            out_dtypes=f.out_dtypes,
        )
    if len(inputs) != len(f["input_names"]):
        raise ValueError(f"{f['name']}: {len(inputs)} inputs for {len(f['input_names'])} names")
    return f


def _tu_for(f, inputs) -> str:
    return translation_unit(
        f["name"],
        f["source"],
        f["header"],
        f["input_names"],
        [a.dtype.name for a in inputs],
        [a.shape for a in inputs],
        f["output_names"],
        [jnp.dtype(d).name for d in f["out_dtypes"]],
    )


def _prepare(inputs):
    # Kernels see raw bytes: float8 travels as uint8, as on the custom-call path.
    out = []
    for a in inputs:
        a = np.ascontiguousarray(a)
        if a.dtype.name == "float8_e4m3fn":
            a = a.view(np.uint8)
        out.append(a)
    return out


def run(spec, *inputs) -> tuple[np.ndarray, ...]:
    """Launches ``spec`` on numpy ``inputs``; returns its outputs."""
    inputs = _prepare(inputs)
    f = _fields(spec, inputs)
    tu = _tu_for(f, inputs)
    key = hashlib.sha256(tu.encode()).hexdigest()
    with _libs_lock:
        if key not in _libs:
            path = _compile(tu, ("-O1", "-fPIC", "-shared"), ".so")
            _libs[key] = (ctypes.CDLL(str(path)), threading.Lock())
        lib, lock = _libs[key]
    # Poison: all bytes 0xff is NaN for every float type and -1 for integers.
    outs = [
        np.full((int(np.prod(s)) * jnp.dtype(d).itemsize,), 0xFF, np.uint8)
        .view(jnp.dtype(d))
        .reshape(tuple(s))
        for s, d in zip(f["out_shapes"], f["out_dtypes"])
    ]
    ptrs = (ctypes.c_void_p * (len(inputs) + len(outs)))(
        *[a.ctypes.data for a in inputs], *[o.ctypes.data for o in outs]
    )
    grid = (ctypes.c_uint * 3)(*f["grid"])
    tg = (ctypes.c_uint * 3)(*f["threadgroup"])
    with lock:  # threadgroup memory is per library: one launch at a time
        rc = lib.emu_launch(ptrs, grid, tg)
    if rc != 0:
        raise ValueError(
            f"{f['name']}: bad launch shape grid={f['grid']} "
            f"threadgroup={f['threadgroup']} (code {rc})"
        )
    return tuple(outs)


def run_sanitized(spec, *inputs, sanitizer: str, timeout: float = 300.0):
    """Runs ``spec`` in a subprocess built with ``-fsanitize={sanitizer}``.

    Returns ``(outputs or None, returncode, stderr)``; a sanitizer report makes the
    returncode non-zero (``halt_on_error``)."""
    if sanitizer not in ("thread", "address"):
        raise ValueError(f"sanitizer must be 'thread' or 'address', got {sanitizer!r}")
    inputs = _prepare(inputs)
    f = _fields(spec, inputs)
    tu = _tu_for(f, inputs)
    flags = ("-O1", "-g", f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer")
    exe = _compile(tu, flags, f".{sanitizer}.exe", extra_sources=(HERE / "driver.cc",))
    env = dict(os.environ)
    env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66 report_signal_unsafe=0"
    env["ASAN_OPTIONS"] = "halt_on_error=1 exitcode=66 detect_leaks=0"
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(exe), *map(str, f["grid"]), *map(str, f["threadgroup"])]
        for i, a in enumerate(inputs):
            p = pathlib.Path(tmp) / f"in{i}"
            a.tofile(p)
            args.append(f"in:{p}:{a.nbytes}")
        out_paths = []
        for j, (s, d) in enumerate(zip(f["out_shapes"], f["out_dtypes"])):
            p = pathlib.Path(tmp) / f"out{j}"
            args.append(f"out:{p}:{int(np.prod(s)) * jnp.dtype(d).itemsize}")
            out_paths.append((p, s, d))
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
        outs = None
        if res.returncode == 0:
            outs = tuple(np.fromfile(p, dtype=jnp.dtype(d)).reshape(s) for p, s, d in out_paths)
    return outs, res.returncode, res.stderr
