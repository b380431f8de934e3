"""Serve a local Hugging Face checkpoint from the command line.

    python -m jax_paged_attn.serve --model DIR --prompt "Once upon a time" --max-new-tokens 32
    python -m jax_paged_attn.serve --model DIR --prompt-ids 1,2,3 --temperature 0.7 --top-p 0.9

Text prompts are tokenized with the checkpoint's ``tokenizer.json`` (needs the ``tokenizers``
package); ``--prompt-ids`` takes token ids directly. Tokens are printed as they are generated,
then the throughput. Several ``--prompt``/``--prompt-ids`` are served together in one batch.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax

from jax_paged_attn.models import Engine, SamplingParams, load_model


def _tokenizer(model_dir: pathlib.Path):
    path = model_dir / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None, "the tokenizers package is not installed (pip install tokenizers)"
    if not path.exists():
        return None, f"{model_dir} has no tokenizer.json"
    return Tokenizer.from_file(str(path)), None


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m jax_paged_attn.serve", description=__doc__)
    p.add_argument(
        "--model", required=True, help="checkpoint directory (config.json, *.safetensors)"
    )
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument(
        "--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)"
    )
    p.add_argument("--backend", default="auto", help="attention / MoE backend (default auto)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-seqs", type=int, default=8)
    p.add_argument("--token-budget", type=int, default=256, help="rows per step")
    p.add_argument("--max-model-len", type=int, default=None)
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    parser, args = _parse(argv)
    model_dir = pathlib.Path(args.model)
    prompts = []
    for ids in args.prompt_ids:
        try:
            prompts.append([int(t) for t in ids.split(",") if t.strip()])
        except ValueError:
            parser.error(f"--prompt-ids must be comma-separated integers, got {ids!r}")
    tokenizer = None
    if args.prompt:
        tokenizer, why = _tokenizer(model_dir)
        if tokenizer is None:
            parser.error(
                f"text prompts need the checkpoint's tokenizer.json: {why}; use --prompt-ids"
            )
        prompts += [tokenizer.encode(text).ids for text in args.prompt]
    if not prompts:
        parser.error("give at least one --prompt or --prompt-ids")

    start = time.perf_counter()
    model = load_model(model_dir, dtype=args.dtype)
    cfg = model.config
    print(
        f"{cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads of {cfg.head_dim}, dtype {model.dtype}; "
        f"loaded in {time.perf_counter() - start:.1f} s; jax {jax.__version__} on "
        f"{jax.default_backend()}",
        file=sys.stderr,
    )
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    engine = Engine(
        model,
        block_size=args.block_size,
        max_seqs=args.max_seqs,
        token_budget=args.token_budget,
        max_model_len=args.max_model_len or longest,
        backend=args.backend,
    )
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    requests = [engine.add_request(p, sampling) for p in prompts]
    single = len(requests) == 1
    shown = ""
    if single:
        print("" if tokenizer else "ids:", end="", flush=True)
    start = time.perf_counter()
    for event in engine.stream():
        if not single:
            continue
        if tokenizer is None:
            print(f" {event.token}", end="", flush=True)
        else:  # decode the whole output each time: tokens can merge into one character
            text = tokenizer.decode(event.request.output)
            print(text[len(shown) :], end="", flush=True)
            shown = text
    wall = time.perf_counter() - start
    if single:
        print()
    else:
        for i, req in enumerate(requests):
            text = tokenizer.decode(req.output) if tokenizer else " ".join(map(str, req.output))
            print(f"[{i}] {text}")
    generated = sum(len(r.output) for r in requests)
    print(
        f"{generated} tokens in {wall:.2f} s ({engine.stats['steps']} steps, first one compiles); "
        f"{engine.tokens_per_second():.1f} tokens/s after compilation; "
        f"{engine.stats['cached_tokens']} prompt tokens from the prefix cache"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
