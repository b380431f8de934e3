"""Serving throughput: tokens/s of the engine's loop (``jax_paged_attn.models.Engine``) on
real-size configurations with random weights, and where the step's device time goes.

    python -m benchmarks.serving [--smoke] [--json PATH] [--configs llama3-8b,gpt-oss-20b]
        [--layers 4] [--requests 64] [--prompt-len 512,2048] [--new-tokens 128]
        [--max-seqs 64] [--token-budget 1024] [--prefill-chunk 512] [--block-size 16]
        [--backend auto]

Configurations (``CONFIGS``): the dimensions of Llama-3-8B (dense), gpt-oss-20b (MoE: 32
experts, top-4, sinks, 128-token windows on alternate layers) and Qwen3-30B-A3B (MoE: 128
experts, top-8), cut to ``--layers`` layers, bfloat16 random weights
(``models.random_model``). ``--smoke``: tiny versions of the first two on the CPU (< 1 min).

1. **The serving loop.** ``--requests`` requests (prompt lengths uniform in ``--prompt-len``,
   random token ids, greedy, ``--new-tokens`` each, end-of-sequence ignored) are queued at once
   and ``engine.step()`` runs until all are done: continuous batching (a decode row for each
   running request, prefill chunks of at most ``--prefill-chunk`` tokens of the others fill the
   ``--token-budget`` rows), no preemption, prefix caching on (random prompts share nothing).
   ``engine.warmup()`` first compiles the step for every row bucket (``Engine.rows_for``). The
   loop's wall time (host scheduling, batch building, transfers and the per-step sync
   included) gives generated tokens/s and prompt + generated tokens/s.
2. **Where the time goes.** Every step's batch is recorded, then replayed on the engine's cache
   by three jitted programs: the whole step; the attention alone (per layer ``write_kv`` +
   ``paged_attention`` on the step's metadata, with random q, k, v of the model's shapes, its
   windows and sinks); the MLP alone (per layer: router + ``moe_topk`` + ``fused_moe`` for MoE
   layers, the gate/up and down GEMMs for dense ones, on random hidden states with the step's
   padding rows routed nowhere). ``rest`` = step - attention - MLP: the Q/K/V/O projections,
   norms, RoPE, embedding, LM head and sampling. On a GPU each replay is device busy time (a
   ``jax.profiler`` trace, ``benchmarks/timing.jax_device_time``); on a CPU wall time. The
   loop's wall time minus the steps' device time is the host's share (Python scheduling and
   dispatch while the GPU idles). Split by step kind: ``mixed`` (prefill rows in the batch)
   and ``decode`` (decode rows only).

Every step computes its row bucket (``max_seqs * 2^k`` rows, at most ``--token-budget``),
padding included: ``row_utilization`` says which share of the computed rows were real tokens.

Cross-checks in the JSON: each replay's wall time (``wall_ms``; device time is below it), the
KV bytes a step's attention must read (``kv_read_mb``) and the bandwidth that implies
(``attention_kv_tb_s``: above any HBM, the trace missed kernels, and the report warns), and on
a GPU the longest kernels of one step of each kind (``top_kernels_step``,
``top_kernels_attention``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402
from jax_paged_attn import models  # noqa: E402
from jax_paged_attn.models import model as M  # noqa: E402

_GPT_OSS_ROPE = dict(
    rope_type="yarn",
    rope_theta=150000.0,
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)
CONFIGS = {  # config.json of the real model (all its layers; --layers cuts them)
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
    ),
    "gpt-oss-20b": dict(
        architectures=["GptOssForCausalLM"],
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        attention_bias=True,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters=_GPT_OSS_ROPE,
        tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"],
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
}
SMOKE_DIMS = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=8,
)
DEFAULT_CONFIGS = ("llama3-8b", "gpt-oss-20b")
HBM_TB_S = 8.0  # above every GPU's memory bandwidth (H200: 4.8 TB/s; B200: 8)


def model_config(name: str, layers: int, smoke: bool = False) -> models.ModelConfig:
    hf = dict(CONFIGS[name], num_hidden_layers=layers)
    if smoke:
        hf.update({k: v for k, v in SMOKE_DIMS.items() if k in hf or k == "head_dim"})
    if "layer_types" in hf:
        hf["layer_types"] = hf["layer_types"][:layers]
    return models.parse_config(hf)


class _RecordingEngine(models.Engine):
    """The engine, keeping every step's host batch for the replays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def _batch(self, plan, rows=None):
        batch = super()._batch(plan, rows)
        self.batches.append(batch)
        return batch


def workload(args, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lo, hi = args.prompt_len
    lengths = rng.integers(lo, hi + 1, args.requests)
    return [rng.integers(0, vocab, int(n)).tolist() for n in lengths]


def _kind(batch) -> str:
    q_lens = np.diff(batch["meta"].cu_seqlens_q)
    return "mixed" if (q_lens > 1).any() else "decode"


def kv_bytes(cfg, batch, itemsize: int) -> int:
    """Bytes of K and V the step's attention must read at least: per layer and sequence, its
    context (a window's worth plus the chunk on sliding layers)."""
    lens = np.asarray(batch["meta"].context_lens, np.int64)
    q_lens = np.diff(np.asarray(batch["meta"].cu_seqlens_q, np.int64))
    row = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
    total = 0
    for w in cfg.windows:
        seen = lens if w is None else np.minimum(lens, w + q_lens - 1)
        total += int(np.sum(np.where(q_lens > 0, seen, 0))) * row
    return total


def _attention_only(cfg, params, backend):
    """write_kv + paged_attention of every layer on the step's metadata."""
    layers = M.attention_layers(cfg, backend)

    def run(caches, q, k, v, meta):
        outs, new = [], []
        for i, layer in enumerate(layers):
            out, c = layer(q, k, v, caches[i], meta, sinks=params["layers"][i].get("sinks"))
            outs.append(out)
            new.append(c)
        return outs, new

    return jax.jit(run, donate_argnums=(0,))


def _mlp_only(cfg, backend):
    """Every layer's MLP (MoE: router + moe_topk + fused_moe; dense: the two GEMMs)."""

    def run(params, h, meta):
        valid = jnp.arange(h.shape[0]) < meta.cu_seqlens_q[-1]
        return [
            M._moe(cfg, p, h, valid, backend) if cfg.moe_layers[i] else M._mlp(cfg, p, h)
            for i, p in enumerate(params["layers"])
        ]

    return jax.jit(run)


def _wall_time(fn, arg_sets) -> float:
    """Seconds per call over ``arg_sets``, each call synced (host dispatch included)."""
    start = time.perf_counter()
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / len(arg_sets)


def _replay_time(fn, arg_sets) -> tuple[float, float, str]:
    """(seconds per call, wall seconds per call, how) over ``arg_sets`` (one call each, ``fn``
    warm): device busy time on a GPU, else the wall time. The wall time (each call synced) is a
    cross-check: device time can only be below it."""
    wall = _wall_time(fn, arg_sets)
    if timing.on_gpu():
        dev = timing.jax_device_time(fn, arg_sets, len(arg_sets))
        if dev is not None:
            return dev, wall, "device"
    return wall, wall, "wall"


def breakdown(engine: _RecordingEngine, backend: str, seed: int = 0) -> dict:
    cfg, params = engine.cfg, engine.model.params
    dtype = engine.model.dtype
    batches = [jax.tree.map(jnp.asarray, b) for b in engine.batches]
    kinds = [_kind(b) for b in engine.batches]
    keys = jax.random.split(jax.random.key(seed), 4)
    inputs = {}  # random q, k, v, h per row bucket

    def rand(batch):
        t = batch["tokens"].shape[0]
        if t not in inputs:
            inputs[t] = (
                jax.random.normal(keys[0], (t, cfg.num_heads, cfg.head_dim), dtype),
                jax.random.normal(keys[1], (t, cfg.num_kv_heads, cfg.head_dim), dtype),
                jax.random.normal(keys[2], (t, cfg.num_kv_heads, cfg.head_dim), dtype),
                jax.random.normal(keys[3], (t, cfg.hidden_size), dtype),
            )
        return inputs[t]

    attn, mlp = _attention_only(cfg, params, backend), _mlp_only(cfg, backend)
    state = {"caches": engine.caches}

    def step(batch):
        tokens, _, state["caches"] = engine._step(params, state["caches"], batch)
        return tokens

    def attention(batch):
        q, k, v, _ = rand(batch)
        outs, state["caches"] = attn(state["caches"], q, k, v, batch["meta"])
        return outs

    def moe(batch):
        return mlp(params, rand(batch)[3], batch["meta"])

    compile_s = time.perf_counter()
    first = {b["tokens"].shape[0]: b for b in batches}  # one batch per row bucket
    for fn in (attention, moe):  # compile (the step is compiled already)
        for b in first.values():
            jax.block_until_ready(fn(b))
    compile_s = time.perf_counter() - compile_s
    out, how = {"compile_replays_s": round(compile_s, 2)}, set()
    for kind in ("mixed", "decode"):
        sets = [(b,) for b, kk in zip(batches, kinds) if kk == kind]
        if not sets:
            continue
        per, wall = {}, {}
        for part, fn in (("step", step), ("attention", attention), ("mlp", moe)):
            per[part], wall[part], timed = _replay_time(fn, sets)
            how.add(timed)
        per["rest"] = per["step"] - per["attention"] - per["mlp"]
        out[kind] = dict(steps=len(sets), **{f"{p}_ms": round(s * 1e3, 4) for p, s in per.items()})
        out[kind]["wall_ms"] = {p: round(s * 1e3, 4) for p, s in wall.items()}
        # a sanity floor: attention reads at least this much KV; above the memory bandwidth,
        # the trace missed kernels
        size = jnp.dtype(engine.caches[0].k.dtype).itemsize
        kv = np.mean([kv_bytes(cfg, b, size) for b, kk in zip(engine.batches, kinds) if kk == kind])
        out[kind]["kv_read_mb"] = round(kv / 1e6, 2)
        out[kind]["attention_kv_tb_s"] = round(kv / max(per["attention"], 1e-12) / 1e12, 3)
        if timing.on_gpu():  # the kernels of one step of this kind (its middle one), longest first
            mid = sets[len(sets) // 2]
            for part, fn in (("step", step), ("attention", attention)):
                top = timing.kernel_breakdown(fn, *mid, calls=3)[:8]
                out[kind][f"top_kernels_{part}"] = [
                    dict(us=round(us, 2), launches=n, name=name[:80]) for us, n, name in top
                ]
    engine.caches = state["caches"]
    total = {
        part: sum(
            out[kk]["steps"] * out[kk][f"{part}_ms"] for kk in ("mixed", "decode") if kk in out
        )
        / 1e3
        for part in ("step", "attention", "mlp", "rest")
    }
    out["total_s"] = {p: round(s, 4) for p, s in total.items()}
    out["timing"] = "device" if how == {"device"} else "wall"
    return out


def bench_config(name: str, args) -> dict:
    cfg = model_config(name, args.layers, args.smoke)
    t0 = time.perf_counter()
    model = models.random_model(cfg, dtype=args.dtype, seed=0)
    jax.block_until_ready(model.params)
    init_s = time.perf_counter() - t0
    lo, hi = args.prompt_len
    engine = _RecordingEngine(
        model,
        block_size=args.block_size,
        max_seqs=args.max_seqs,
        token_budget=args.token_budget,
        max_model_len=hi + args.new_tokens,
        prefill_chunk=args.prefill_chunk,
        backend=args.backend,
    )
    greedy = models.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    t0 = time.perf_counter()  # compile every row bucket
    engine.warmup()
    compile_s = time.perf_counter() - t0
    engine.batches.clear()
    prompts = workload(args, cfg.vocab_size)
    reqs = [engine.add_request(p, greedy) for p in prompts]
    step_times, rows, computed = [], [], []
    t0 = time.perf_counter()
    while engine.has_work():
        s = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - s)
        rows.append(int(engine.batches[-1]["meta"].cu_seqlens_q[-1]))
        computed.append(len(engine.batches[-1]["tokens"]))
    wall = time.perf_counter() - t0
    generated = sum(len(r.output) for r in reqs)
    prompt_tokens = sum(len(p) for p in prompts)
    assert generated == args.requests * args.new_tokens
    kinds = [_kind(b) for b in engine.batches]
    loop = dict(
        wall_s=round(wall, 4),
        steps=len(step_times),
        decode_only_steps=kinds.count("decode"),
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        generated_tok_s=round(generated / wall, 1),
        total_tok_s=round((prompt_tokens + generated) / wall, 1),
        mean_step_ms=round(1e3 * wall / len(step_times), 3),
        row_utilization=round(sum(rows) / sum(computed), 4),
    )
    res = dict(
        config=name,
        smoke_dims=args.smoke,
        architecture=cfg.architecture,
        layers=cfg.num_layers,
        params_b=round(sum(x.size for x in jax.tree.leaves(model.params)) / 1e9, 3),
        dtype=str(model.dtype),
        engine=dict(
            block_size=args.block_size,
            max_seqs=args.max_seqs,
            token_budget=args.token_budget,
            prefill_chunk=args.prefill_chunk,
            backend=args.backend,
            num_blocks=engine.allocator.num_blocks,
        ),
        workload=dict(requests=args.requests, prompt_len=[lo, hi], new_tokens=args.new_tokens),
        init_s=round(init_s, 2),
        compile_s=round(compile_s, 2),
        loop=loop,
    )
    res["breakdown"] = breakdown(engine, args.backend)
    step_s = res["breakdown"]["total_s"]["step"]
    res["breakdown"]["host_s"] = round(max(0.0, wall - step_s), 4)
    return res


def report(res: dict) -> str:
    loop, b = res["loop"], res["breakdown"]
    lines = [
        f"{res['config']}{' [smoke dims]' if res['smoke_dims'] else ''} "
        f"({res['architecture']}, {res['layers']} layers, "
        f"{res['params_b']:.2f}B params, {res['dtype']}): "
        f"{loop['generated_tok_s']:.0f} generated tok/s, {loop['total_tok_s']:.0f} tok/s with "
        f"prompts; {loop['steps']} steps ({loop['decode_only_steps']} decode-only) in "
        f"{loop['wall_s']:.2f} s, rows used {100 * loop['row_utilization']:.0f}%",
        f"  {b['timing']} time per step:      step   attention   MLP/MoE     rest",
    ]
    for kind in ("mixed", "decode"):
        if kind in b:
            r = b[kind]
            lines.append(
                f"    {kind:>6} x{r['steps']:<4}        {r['step_ms']:8.3f} ms {r['attention_ms']:8.3f}"
                f"  {r['mlp_ms']:8.3f}  {r['rest_ms']:8.3f}   (attention reads "
                f"{r['kv_read_mb']:.0f} MB of KV: {r['attention_kv_tb_s']:.2f} TB/s; replay wall "
                f"{r['wall_ms']['step']:.3f} / {r['wall_ms']['attention']:.3f} / "
                f"{r['wall_ms']['mlp']:.3f} ms)"
            )
            if r["attention_kv_tb_s"] > HBM_TB_S:
                lines.append(
                    f"    warning: {r['attention_kv_tb_s']:.0f} TB/s is above any HBM: the "
                    "trace missed attention kernels (if XLA ran them as CUDA graphs, "
                    "XLA_FLAGS=--xla_gpu_enable_command_buffer= traces each launch)"
                )
    tot = b["total_s"]
    share = {p: 100 * tot[p] / loop["wall_s"] for p in tot}
    lines.append(
        f"  of the loop's {loop['wall_s']:.2f} s: attention {share['attention']:.0f}%, "
        f"MLP/MoE {share['mlp']:.0f}%, rest {share['rest']:.0f}%, host and idle "
        f"{100 * b['host_s'] / loop['wall_s']:.0f}%"
    )
    return "\n".join(lines)


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny configs and workload (CPU, < 1 min)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--configs", default=None, help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--layers", type=int, default=None, help="layers of each model (default 4)")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--prompt-len", type=_pair, default=None, help="min,max prompt tokens")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--max-seqs", type=int, default=None)
    p.add_argument("--token-budget", type=int, default=None, help="rows per step")
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    defaults = (
        dict(layers=2, requests=6, prompt_len=(16, 40), new_tokens=8, max_seqs=4,
             token_budget=64, prefill_chunk=32)
        if args.smoke
        else dict(layers=4, requests=64, prompt_len=(512, 2048), new_tokens=128, max_seqs=64,
                  token_budget=1024, prefill_chunk=512)
    )  # fmt: skip
    if args.smoke:
        args.block_size = min(args.block_size, 8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    dev = jax.devices()[0]
    header = dict(
        device=getattr(dev, "device_kind", str(dev)),
        platform=jax.default_backend(),
        jax=jax.__version__,
        smoke=args.smoke,
    )
    print(f"{header['device']} ({header['platform']}), jax {header['jax']}", flush=True)
    results = []
    for name in names:
        res = bench_config(name, args)
        results.append(res)
        print(report(res), flush=True)
        if args.json:  # after each config: a run cut short keeps what it finished
            with open(args.json, "w") as f:
                json.dump(dict(header, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
