"""jax_paged_attn.models' serving parts: the block allocator and prefix cache, sampling, stop
tokens, the progress line and the command line (checkpoints written by tests/test_models.py's
helpers; CPU, float32, xla)."""

from __future__ import annotations

import io
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the models extra: pip install -e '.[models]'")

from jax_paged_attn import models  # noqa: E402
from jax_paged_attn.models import (  # noqa: E402
    BlockAllocator,
    Engine,
    Progress,
    SamplingParams,
    block_hashes,
    dense_logits,
    load_model,
)
from tests.test_models import prompts_for, write_checkpoint  # noqa: E402

# -- allocator and prefix cache -------------------------------------------------------------


def test_block_hashes_chain_the_prefix():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # the partial third block has no hash
    assert block_hashes(list(range(8)) + [99], 4) == a
    b = block_hashes([7] + list(range(1, 10)), 4)
    assert b[0] != a[0] and b[1] != a[1]  # same tokens in block 1, different prefix


def test_allocator_refcounts_caches_and_evicts():
    alloc = BlockAllocator(3)
    h = block_hashes(list(range(12)), 4)
    first = [alloc.allocate(), alloc.allocate()]
    for block, hh in zip(first, h):
        alloc.register(block, hh)
    assert alloc.lookup(h) == first and alloc.refs[first].tolist() == [2, 2]
    alloc.release(first)
    alloc.release(first)  # both users done: cached but evictable
    assert alloc.num_available == 3
    other = alloc.allocate()  # the never-used block first
    assert other not in first
    assert alloc.lookup(h[:1]) == first[:1]  # a hit takes the block off the evictable list
    evicted = alloc.allocate()  # evicts the least recently used cached block
    assert evicted == first[1] and alloc.lookup(h[1:2]) == []
    with pytest.raises(models.OutOfBlocksError):
        alloc.allocate()
    alloc.release([other, evicted, first[0]])
    with pytest.raises(RuntimeError, match="released more often"):
        alloc.release([other])
    off = BlockAllocator(2, prefix_caching=False)
    off.register(off.allocate(), h[0])
    assert off.lookup(h) == []


def test_engine_frees_blocks_and_reuses_prefix_across_requests(tmp_path):
    model = load_model(write_checkpoint(tmp_path / "q", "qwen3"))
    engine = Engine(
        model, block_size=4, max_seqs=2, token_budget=8, max_model_len=40, backend="xla"
    )
    prompt = list(range(2, 20))
    first = engine.generate([prompt], SamplingParams(max_new_tokens=3), progress=False)[0]
    assert engine.allocator.refs.sum() == 0 and first.cached_tokens == 0
    again = engine.generate([prompt], SamplingParams(max_new_tokens=3), progress=False)[0]
    assert again.cached_tokens == 16 and again.output == first.output
    assert engine.stats["cached_tokens"] == 16


def test_steps_compile_per_row_bucket(tmp_path):
    """A step computes the smallest max_seqs * 2^k rows that hold it (a decode-only step of two
    requests: 2 rows, not the budget of 8); warmup compiles every bucket without touching the
    cache; the tokens are the same as without it."""
    model = load_model(write_checkpoint(tmp_path / "q", "qwen3"))
    kw = dict(block_size=4, max_seqs=2, token_budget=8, max_model_len=40, backend="xla")
    engine, cold = Engine(model, **kw), Engine(model, **kw)
    assert engine.row_bucket_sizes() == [2, 4, 8]
    assert [engine.rows_for(n) for n in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
    assert Engine(model, **{**kw, "max_seqs": 3}).row_bucket_sizes() == [3, 6, 8]
    before = [np.asarray(c.k).copy() for c in engine.caches]
    engine.warmup()
    assert engine.row_buckets == {2, 4, 8}
    assert all(
        np.array_equal(np.asarray(c.k), b, equal_nan=True) for c, b in zip(engine.caches, before)
    )
    prompts = [list(range(2, 13)), list(range(20, 26))]
    sp = SamplingParams(max_new_tokens=5)
    warm = engine.generate(prompts, sp, progress=False)
    assert [r.output for r in warm] == [
        r.output for r in cold.generate(prompts, sp, progress=False)
    ]
    assert 2 in cold.row_buckets  # the decode-only steps


def test_bfloat16_weights_and_stop_tokens(tmp_path):
    path = write_checkpoint(tmp_path / "b", "qwen3_moe")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    f32, bf16 = load_model(path), load_model(path, dtype="bfloat16")
    assert f32.config.eos_token_ids == (1, 7)
    assert bf16.params["layers"][0]["w_gate_up"].dtype == jnp.bfloat16
    assert bf16.params["layers"][0]["attn_in_norm"].dtype == jnp.float32
    engine = Engine(
        bf16, block_size=4, max_seqs=2, token_budget=8, max_model_len=32, backend="xla",
        keep_logits=True, prefix_caching=False,
    )  # fmt: skip
    prompt = prompts_for(128)[0]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    req = engine.generate([prompt], sp, progress=False)[0]
    want = np.asarray(dense_logits(f32, req.tokens))
    got = np.stack([req.logits[p] for p in sorted(req.logits)])
    assert np.max(np.abs(got - want[: len(got)])) / np.max(np.abs(want)) < 5e-2
    sp = SamplingParams(max_new_tokens=4, stop_token_ids=(req.output[0],), ignore_eos=True)
    stop = engine.generate([prompt], sp, progress=False)[0]
    assert stop.output == req.output[:1] and stop.finish_reason == "stop"


def test_progress_line_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    out = io.StringIO()
    bar = Progress(4, stream=out)
    req = models.Request(0, [3], SamplingParams(max_new_tokens=4))
    req.output = [5]
    bar.update(models.TokenEvent(req, 5, False))
    req.output = [5, 6]
    bar.update(models.TokenEvent(req, 6, True))  # finished early: counts the rest as done
    bar.close()
    assert bar.bar is None and "4/4 tokens, 1 requests done" in out.getvalue()


# -- sampling -------------------------------------------------------------------------------


def _draw(logits, temperature, top_p, seed, counters):
    s = len(counters)
    return np.asarray(
        models.sample(
            jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (s, len(logits))),
            jnp.full(s, temperature, jnp.float32),
            jnp.full(s, top_p, jnp.float32),
            jnp.full(s, seed, jnp.uint32),
            jnp.asarray(counters, jnp.uint32),
        )
    )


def test_sampler_greedy_topp_and_seeds():
    logits = np.log(np.array([0.1, 0.2, 0.4, 0.3]))
    assert _draw(logits, 0.0, 1.0, 0, range(5)).tolist() == [2] * 5
    assert set(_draw(logits, 1.0, 0.01, 0, range(50)).tolist()) == {2}  # nucleus of one
    assert set(_draw(logits, 1.0, 0.6, 0, range(300)).tolist()) == {2, 3}  # 0.4 + 0.3
    a = _draw(logits, 1.0, 1.0, 7, range(64))
    assert np.array_equal(a, _draw(logits, 1.0, 1.0, 7, range(64)))
    assert not np.array_equal(a, _draw(logits, 1.0, 1.0, 8, range(64)))
    freq = np.bincount(_draw(logits, 1.0, 1.0, 3, range(4000)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.4, 0.3], atol=0.03)
    hot = np.bincount(_draw(logits, 0.25, 1.0, 3, range(2000)), minlength=4) / 2000
    assert hot[2] > 0.6  # a low temperature sharpens towards the argmax
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1)


def test_seeded_sampling_does_not_depend_on_the_batch(tmp_path):
    model = load_model(write_checkpoint(tmp_path / "g", "gemma2"))
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    prompts = prompts_for(model.config.vocab_size, seed=2)
    alone = Engine(model, block_size=4, max_seqs=1, token_budget=8, max_model_len=32, backend="xla")
    solo = alone.generate(prompts[:1], sp, progress=False)[0].output
    together = Engine(
        model, block_size=4, max_seqs=3, token_budget=8, max_model_len=32, backend="xla"
    )
    reqs = together.generate(prompts, sp, progress=False)
    assert reqs[0].output == solo
    streamed = []
    late = together.add_request(prompts[0], sp, on_token=lambda r, t: streamed.append(t))
    events = list(together.stream())
    assert [e.token for e in events] == streamed == late.output == solo
    assert events[-1].finished and late.finish_reason == "length"


# -- the command line -----------------------------------------------------------------------


def test_cli_streams_tokens_and_reports_speed(tmp_path, capsys):
    from jax_paged_attn import serve

    path = write_checkpoint(tmp_path / "c", "mixtral")
    code = serve.main(
        ["--model", str(path), "--prompt-ids", "3,4,5,6,7", "--max-new-tokens", "5",
         "--block-size", "4", "--backend", "xla", "--ignore-eos"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "tokens/s" in out
    ids = [line for line in out.splitlines() if line.startswith("ids:")][0].split()[1:]
    reference = Engine(load_model(path), block_size=4, max_seqs=1, token_budget=8, backend="xla")
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    assert [int(t) for t in ids] == reference.generate([[3, 4, 5, 6, 7]], sp, progress=False)[
        0
    ].output
    with pytest.raises(SystemExit):  # a text prompt needs the checkpoint's tokenizer.json
        serve.main(["--model", str(path), "--prompt", "hello"])
    assert "tokenizer.json" in capsys.readouterr().err
