"""Shared-prefix (cascade) decode against plain paged attention over the full block tables.

    python -m benchmarks.cascade [--backends xla,triton,mosaic] [--json PATH] [--smoke]
                                 [--fold-rows 16,32] [--iters 20] [--warmup 3]
                                 [--timing device|wall]

The case: 64 requests share a 4096-token prompt (256 blocks of 16, held once in the cache), each
has its own suffix of 64 to 256 tokens (the decode token included) and one decode query;
Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128, bf16). Per backend it times

- ``plain_decode``: ``paged_decode`` over the full tables (the prefix blocks, then the
  request's), i.e. each request reads the 4096 prefix tokens itself;
- ``plain_attention``: ``paged_attention`` with the same decode metadata;
- ``cascade``: ``cascade_attention`` (one pass over the prefix for all 64 rows, folded into the
  decode kernels' head group, plus each request's suffix, merged).

Harness conventions (benchmarks/harness.py): every output is first checked against the ``xla``
backend's plain result on the same inputs (relative L2 error within the test kit's tolerance;
a mismatch marks the row ``invalid``), then timed with benchmarks/timing.py (device time on a
GPU, wall clock elsewhere). ``value`` is the effective bandwidth: the K/V bytes plain attention
reads (each request's whole context) per second, so rows of one shape compare directly; a
cascade row's ``ratio_to_peer`` is its speed-up over the same backend's ``plain_decode``, and the
summary gives the best cascade against the best plain row. ``--smoke``: a tiny case with the
kernels under their interpreters (a CPU test of the wiring; times mean nothing). Writes JSON
(default ``$OUT/cascade.json`` or ``benchmarks/results/cascade.json``) and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness, timing  # noqa: E402
from benchmarks.harness import Ctx, new_row, reference_check, run_row  # noqa: E402
from benchmarks.shapes import itemsize  # noqa: E402


@dataclasses.dataclass(frozen=True)
class CascadeShape:
    """``num_requests`` decode queries sharing a ``prefix_len``-token prompt; request ``i``'s
    own suffix holds ``suffix_lens[i]`` tokens (its decode token included)."""

    name: str
    num_requests: int
    prefix_len: int
    suffix_min: int
    suffix_max: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: str = "bfloat16"

    def __post_init__(self):
        assert self.prefix_len % self.block_size == 0, "the prefix is shared in whole blocks"

    @property
    def suffix_lens(self) -> tuple[int, ...]:
        """Spread evenly over ``[suffix_min, suffix_max]``."""
        return tuple(
            int(x) for x in np.linspace(self.suffix_min, self.suffix_max, self.num_requests).round()
        )

    def kv_bytes(self, tokens: int) -> int:
        return 2 * tokens * self.num_kv_heads * self.head_dim * itemsize(self.dtype)

    @property
    def plain_bytes(self) -> int:
        """K/V bytes plain attention reads: every request's whole context."""
        return self.kv_bytes(self.num_requests * self.prefix_len + sum(self.suffix_lens))

    def cascade_bytes(self, fold_rows: int) -> int:
        """K/V bytes the cascade reads: the prefix once per ``fold_rows`` rows, the suffixes."""
        passes = -(-self.num_requests // fold_rows)
        return self.kv_bytes(passes * self.prefix_len + sum(self.suffix_lens))


SHARED_4K = CascadeShape(
    "shared_prompt_4k_x64",
    num_requests=64,
    prefix_len=4096,
    suffix_min=64,
    suffix_max=256,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
)
SMOKE = CascadeShape(
    "tiny_shared_prompt",
    num_requests=4,
    prefix_len=48,
    suffix_min=5,
    suffix_max=20,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
)


def inputs(shape: CascadeShape, seed: int = 0):
    """One cache holding the prefix once and every suffix (permuted blocks, NaN in every slot
    no sequence holds), the queries, both levels' metadata and the full tables."""
    from jax_paged_attn import AttentionMetadata, shared_prefix
    from jax_paged_attn.testing import random_paged_kv

    kc, kq = jax.random.split(jax.random.key(seed))
    suffix = list(shape.suffix_lens)
    cache, tables, lens = random_paged_kv(
        kc,
        [shape.prefix_len] + suffix,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        block_size=shape.block_size,
        dtype=jnp.dtype(shape.dtype),
    )
    bs = shape.block_size
    prefix_blocks = shape.prefix_len // bs
    suffix_blocks = -(-max(suffix) // bs)
    r = shape.num_requests
    q = jax.random.normal(kq, (r, shape.num_heads, shape.head_dim), jnp.float32)
    q = q.astype(shape.dtype)
    suffix_tables = tables[1:, :suffix_blocks]
    shared = shared_prefix(tables[0, :prefix_blocks], shape.prefix_len, r)
    suffix_meta = AttentionMetadata.decode(suffix_tables, lens[1:])
    full_tables = jnp.concatenate(
        [jnp.tile(tables[:1, :prefix_blocks], (r, 1)), suffix_tables], axis=1
    )
    full_lens = lens[1:] + shape.prefix_len
    return dict(
        q=q,
        cache=cache,
        shared=shared,
        suffix=suffix_meta,
        full_tables=full_tables,
        full_lens=full_lens,
        cache_bytes=int(cache.k.nbytes + cache.v.nbytes),
    )


def bench(ctx: Ctx, shape: CascadeShape, fold_rows_list) -> None:
    api = harness.jpa()
    x = inputs(shape)
    group = x["q"].shape[1] // shape.num_kv_heads
    default_fold = max(1, 64 // group)  # cascade_attention's default fold_rows
    nsets = timing.num_sets(x["cache_bytes"])
    sets = [x] + [inputs(shape, seed=1 + i) for i in range(nsets - 1)]
    ctx.log(
        f"{shape.name}: {shape.num_requests} requests x ({shape.prefix_len} shared + "
        f"{shape.suffix_min}..{shape.suffix_max} own tokens); cache {x['cache_bytes'] / 2**20:.1f}"
        f" MiB, {nsets} input set(s); plain reads {shape.plain_bytes / 2**20:.0f} MiB of K/V, "
        f"the cascade {shape.cascade_bytes(default_fold) / 2**20:.0f} MiB"
    )
    plain_sets = [(s["q"], s["cache"], s["full_tables"], s["full_lens"]) for s in sets]
    meta_sets = [
        (s["q"], s["cache"], api.AttentionMetadata.decode(s["full_tables"], s["full_lens"]))
        for s in sets
    ]
    cascade_sets = [(s["q"], s["cache"], s["shared"], s["suffix"]) for s in sets]

    def plain_decode(kw):
        return jax.jit(functools.partial(api.paged_decode, **kw))

    def plain_attention(kw):
        return jax.jit(functools.partial(api.paged_attention, **kw))

    def cascade(kw, fold):
        return jax.jit(functools.partial(api.cascade_attention, fold_rows=fold, **kw))

    try:
        ref = {"out": np.asarray(plain_decode({"backend": "xla"})(*plain_sets[0]), np.float32)}
    except Exception as e:  # the rows then say there is no reference
        ref = {"error": harness.err_line(e)}
        ctx.log(f"xla reference failed: {ref['error']}")
    check = reference_check(ref, shape.dtype, "xla plain_decode")
    folds = [None] + [f for f in fold_rows_list if f]
    for b in ctx.args.backends:
        kw = harness.api_kw(ctx, b)
        peer = f"{b}:plain_decode"
        runs = [
            (peer, plain_decode(kw), plain_sets, shape.plain_bytes, {}),
            (f"{b}:plain_attention", plain_attention(kw), meta_sets, shape.plain_bytes, {}),
        ]
        for fold in folds:
            c = min(default_fold if fold is None else fold, shape.num_requests)
            name = f"{b}:cascade" if fold is None else f"{b}:cascade_f{fold}"
            info = {"fold_rows": c, "cascade_kv_bytes": shape.cascade_bytes(c)}
            runs.append((name, cascade(kw, fold), cascade_sets, shape.plain_bytes, info))
        for impl, fn, arg_sets, work, info in runs:
            row = new_row(
                "cascade",
                shape,
                impl,
                "ours",
                "TB/s",
                peer=peer,
                work={"bytes": work},
                config=dict(kw, **info),
            )
            run_row(ctx, row, fn, arg_sets, check=check, work_key="bytes")


def summary(ctx: Ctx) -> dict:
    """Best cascade against the best plain row (time ratio), and per backend."""
    ok = [r for r in ctx.rows if r["status"] == "ok"]
    plain = [r for r in ok if ":plain" in r["impl"]]
    casc = [r for r in ok if ":cascade" in r["impl"]]
    res = {}
    if plain and casc:
        bp = min(plain, key=lambda r: r["time_s"])
        bc = min(casc, key=lambda r: r["time_s"])
        res["best_plain"] = {"impl": bp["impl"], "time_s": bp["time_s"]}
        res["best_cascade"] = {"impl": bc["impl"], "time_s": bc["time_s"]}
        res["speedup"] = bp["time_s"] / bc["time_s"]
    per = {}
    for r in casc:
        b = r["impl"].split(":")[0]
        same = [p for p in plain if p["impl"].startswith(b + ":")]
        if same:
            per[r["impl"]] = min(p["time_s"] for p in same) / r["time_s"]
    res["speedup_vs_best_plain_of_backend"] = per
    return res


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.cascade",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--backends", default=None, help="default: xla,triton,mosaic (smoke: xla)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny case, interpreted kernels (CPU)")
    ap.add_argument(
        "--fold-rows",
        default="",
        help="comma-separated fold_rows values to time besides the default (e.g. 16,32)",
    )
    ap.add_argument("--iters", type=int, default=None, help="timed samples (default 20, smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3, smoke 1)")
    ap.add_argument("--timing", choices=("device", "wall"), default="device")
    ap.add_argument("--device-calls", type=int, default=10)
    ap.add_argument("--max-row-s", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=0)
    a = ap.parse_args(argv)
    default_backends = "xla" if a.smoke else ",".join(harness.DEFAULT_BACKENDS)
    a.backends = [b.strip() for b in (a.backends or default_backends).split(",") if b.strip()]
    bad = [b for b in a.backends if b not in ("xla", "triton", "mosaic", "metal", "auto")]
    if bad:
        ap.error(f"unknown backend(s) {bad}")
    a.fold_rows = [int(f) for f in a.fold_rows.split(",") if f.strip()]
    a.quick = a.smoke
    a.iters = a.iters or (2 if a.smoke else 20)
    a.warmup = a.warmup or (1 if a.smoke else 3)
    a.min_sample_s = 0.0 if a.smoke else 2e-3
    a.max_row_s = a.max_row_s or (1.0 if a.smoke else 10.0)
    # Kernel backends run under their interpreters where there is no GPU.
    a.interpret = jax.default_backend() == "cpu"
    a.no_torch = True
    a.only = ["cascade"]
    if a.json is None:
        a.json = (
            os.path.join(os.environ["OUT"], "cascade.json")
            if os.environ.get("OUT")
            else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cascade.json")
        )
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = Ctx(args)
    shape = SMOKE if args.smoke else SHARED_4K
    ctx.log(
        f"device {ctx.device} ({ctx.platform}), jax {jax.__version__}; backends "
        f"{args.backends}; json {args.json}"
    )
    try:
        bench(ctx, shape, args.fold_rows)
    except Exception as e:  # a setup failure: recorded, the JSON still written
        row = new_row("cascade", shape, "setup", "ours", "", work={})
        row.update(status="error", error=harness.err_line(e))
        ctx.add(row)
    ctx.meta["summary"] = summary(ctx)
    ctx.write_json()
    print("\n" + harness.table(ctx), flush=True)
    s = ctx.meta["summary"]
    if "speedup" in s:
        ctx.log(
            f"best cascade {s['best_cascade']['impl']} {s['best_cascade']['time_s'] * 1e6:.1f} us"
            f" vs best plain {s['best_plain']['impl']} {s['best_plain']['time_s'] * 1e6:.1f} us:"
            f" {s['speedup']:.2f}x"
        )
    ctx.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
