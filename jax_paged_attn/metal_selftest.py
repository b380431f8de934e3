"""Mac self-test: the kernel strings through MLX (and JAX's mps plugin when it can) against
the ``xla`` backend.

    python -m jax_paged_attn.metal_selftest          # exit 0: all passed, 1: a mismatch, 2: no MLX

Each case runs ``jax_paged_attn`` with ``backend="xla"`` for the expected values and the
``metal_plugin`` entry points with ``interpret=True`` while :func:`lowering.use_runner`
points the launches at ``mlx.core.fast.metal_kernel`` — the same name/source/header/grid
strings the ``mps.metal_kernel_jit`` custom call carries. When the jax-mps plugin provides
that custom call, the case also runs end to end with ``backend="metal"`` on the GPU.
Runs on Linux with the emulator as the runner (how its harness is tested).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from metal_plugin import dispatch, lowering

MLX_MISSING = (
    "jax_paged_attn.metal_selftest needs MLX (pip install mlx) on an Apple-silicon Mac; "
    "it is not installed here. On Linux the same kernels run on the emulator: "
    "pytest tests/test_metal_kernels.py"
)
TOLERANCE = {"float32": 2e-4, "float16": 5e-3, "bfloat16": 4e-2}


@dataclasses.dataclass
class Result:
    name: str
    max_err: float
    tol: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_err <= self.tol


def mlx_runner() -> Callable:
    """``runner(spec, *np_arrays) -> outputs`` through ``mlx.core.fast.metal_kernel``."""
    import ml_dtypes
    import mlx.core as mx

    def to_mx(a):
        a = np.ascontiguousarray(a)
        if a.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16 MLX understands
            return mx.array(a.view(np.uint16)).view(mx.bfloat16)
        return mx.array(a)  # float8 pages already travel as uint8

    def to_np(o, dtype):
        if dtype == "bfloat16":
            return np.array(o.view(mx.uint16)).view(ml_dtypes.bfloat16)
        return np.array(o)

    kernels = {}

    def run(spec, *arrays):
        if spec.name not in kernels:
            kernels[spec.name] = mx.fast.metal_kernel(
                name=spec.name,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                source=spec.source,
                header=spec.header,
            )
        outs = kernels[spec.name](
            inputs=[to_mx(a) for a in arrays],
            grid=tuple(spec.grid),
            threadgroup=tuple(spec.threadgroup),
            output_shapes=[tuple(s) for s in spec.out_shapes],
            output_dtypes=[getattr(mx, d) for d in spec.out_dtypes],
        )
        return tuple(to_np(o, d) for o, d in zip(outs, spec.out_dtypes))

    return run


def _attention_case(
    rng,
    *,
    q_dtype,
    kv_dtype,
    seqs,
    head_dim=128,
    block_size=16,
    heads=8,
    kv_heads=2,
    decode=False,
    **feat,
):
    import jax_paged_attn as jpa

    nb = sum(-(-L // block_size) for _, L in seqs) + 2
    mb = max(-(-L // block_size) for _, L in seqs) + 1
    cache = jpa.KVCache.init(nb, block_size, kv_heads, head_dim, jnp.dtype(kv_dtype))
    perm = rng.permutation(nb)
    bt = np.zeros((len(seqs), mb), np.int32)
    slots, used = [], 0
    for i, (_, L) in enumerate(seqs):
        for b in range(-(-L // block_size)):
            bt[i, b] = perm[used]
            used += 1
        slots += [bt[i, t // block_size] * block_size + t % block_size for t in range(L)]
    n_kv = len(slots)
    kv = rng.standard_normal((2, n_kv, kv_heads, head_dim)).astype(np.float32)
    if cache.k_scale is not None:
        cache = jpa.update_kv_scales(cache, kv[0], kv[1])
    cache = jpa.write_kv(cache, kv[0], kv[1], np.array(slots, np.int32), backend="xla")
    ctx = jnp.asarray([L for _, L in seqs], jnp.int32)
    cu = np.concatenate([[0], np.cumsum([n for n, _ in seqs])]).astype(np.int32)
    bt = jnp.asarray(bt)
    q = jnp.asarray(rng.standard_normal((int(cu[-1]), heads, head_dim)), jnp.dtype(q_dtype))
    kw = dict(
        softcap=feat.get("softcap"),
        sliding_window=feat.get("window"),
        alibi_slopes=feat.get("alibi"),
        sinks=feat.get("sinks"),
    )
    if decode:
        want = jpa.paged_decode(q, cache, bt, ctx, backend="xla", **kw)
        got = lambda **b: jpa.paged_decode(q, cache, bt, ctx, **kw, **b)  # noqa: E731
    else:
        meta = jpa.AttentionMetadata(bt, ctx, jnp.asarray(cu))
        want = jpa.paged_attention(q, cache, meta, backend="xla", **kw)
        got = lambda **b: jpa.paged_attention(q, cache, meta, **kw, **b)  # noqa: E731
    return want, got


def _moe_case(rng, *, dtype, activation):
    import jax_paged_attn as jpa

    t, hd, inter, e, k = 4, 256, 128, 8, 2
    dt = jnp.dtype(dtype)
    x = jnp.asarray(rng.standard_normal((t, hd)), dt)
    wgu = jnp.asarray(rng.standard_normal((e, hd, 2 * inter)) / 16, dt)
    wd = jnp.asarray(rng.standard_normal((e, inter, hd)) / 11, dt)
    weights, ids = jpa.moe_topk(jnp.asarray(rng.standard_normal((t, e)), jnp.float32), k)
    want = jpa.fused_moe(x, wgu, wd, weights, ids, activation=activation, backend="xla")
    got = lambda **b: jpa.fused_moe(
        x,
        wgu,
        wd,
        weights,
        ids,  # noqa: E731
        activation=activation,
        **b,
    )
    return want, got


def cases(rng):
    """(name, dtype, build) triples; ``build()`` returns (expected, run(**backend_kw))."""
    h = 8
    feats = dict(
        softcap=30.0,
        window=40,
        alibi=jnp.asarray(-rng.random(h) * 0.1, jnp.float32),
        sinks=jnp.asarray(rng.standard_normal(h), jnp.float32),
    )
    mixed = [(1, 70), (9, 9), (4, 33), (0, 0), (1, 1)]
    longd = [(1, 1200), (1, 513), (1, 7)]
    out = []
    for q_dtype, kv_dtype in (
        ("bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("float32", "float32"),
        ("bfloat16", "float8_e4m3fn"),
    ):
        out.append(
            (
                f"prefill/mixed {q_dtype} kv {kv_dtype}",
                q_dtype,
                lambda q=q_dtype, k=kv_dtype: _attention_case(
                    rng, q_dtype=q, kv_dtype=k, seqs=mixed, **feats
                ),
            )
        )
        out.append(
            (
                f"decode (partitioned) {q_dtype} kv {kv_dtype}",
                q_dtype,
                lambda q=q_dtype, k=kv_dtype: _attention_case(
                    rng, q_dtype=q, kv_dtype=k, seqs=longd, decode=True, **feats
                ),
            )
        )
    for act in ("silu", "gelu", "gelu_tanh"):
        out.append(
            (
                f"fused_moe decode {act} bf16",
                "bfloat16",
                lambda a=act: _moe_case(rng, dtype="bfloat16", activation=a),
            )
        )
    return out


def compare(name: str, dtype: str, want, got) -> Result:
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    if got.shape != want.shape:
        return Result(name, np.inf, 0.0, f"shape {got.shape} != {want.shape}")
    if np.isnan(got).any():
        return Result(name, np.inf, 0.0, "NaN in output")
    tol = TOLERANCE[dtype] * max(1.0, float(np.abs(want).max()))
    return Result(name, float(np.abs(got - want).max()), tol)


def run_cases(
    runner: Callable | None = None,
    *,
    native: bool = False,
    seed: int = 0,
    select: Callable[[str], bool] = lambda name: True,
) -> list[Result]:
    """Every case through ``runner`` (default: the emulator) and, with ``native``, through
    ``backend="metal"`` on the GPU."""
    rng = np.random.default_rng(seed)
    results = []
    for name, dtype, build in cases(rng):
        if not select(name):
            continue
        try:
            want, got = build()
            with lowering.use_runner(runner or lowering._emulate):
                results.append(
                    compare(
                        f"{name} [kernel strings]",
                        dtype,
                        want,
                        got(backend="metal", interpret=True),
                    )
                )
            if native:
                results.append(compare(f"{name} [jax mps]", dtype, want, got(backend="metal")))
        except Exception as e:  # report and go on: one broken case should not hide others
            results.append(Result(name, np.inf, 0.0, f"{type(e).__name__}: {e}"))
    return results


def report(results: list[Result]) -> str:
    lines = [
        f"{'ok' if r.ok else 'FAIL':4}  {r.name:55}  max|err|={r.max_err:.3g} "
        f"(tol {r.tol:.3g})" + (f"  {r.error}" if r.error else "")
        for r in results
    ]
    n_bad = sum(not r.ok for r in results)
    lines.append(f"{len(results) - n_bad}/{len(results)} passed")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        print(MLX_MISSING, file=sys.stderr)
        return 2
    native = dispatch.dispatch_available(warn=False)
    print(
        f"JAX platform: {jax.default_backend()}; custom call: "
        f"{'yes' if native else dispatch.unavailable_reason()}"
    )
    results = run_cases(mlx_runner(), native=native)
    print(report(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
