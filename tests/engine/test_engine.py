"""The engine end to end on a tiny random Llama: batching, sampling features,
stops, preemption, prefix caching and abort, checked against a plain greedy loop."""

from __future__ import annotations

import numpy as np
import pytest

from model.generate import greedy_generate
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.errors import ValidationError
from serving.engine.types import SamplingParams
from tests.model.tiny_hf import save_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers
    from model.default import default_model_path
    from model.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama_engine")
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    import torch
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    load_tokenizer(default_model_path(), "gguf").save_pretrained(path)
    return str(path)


def _engine(model_dir, **kw) -> LLMEngine:
    args = dict(model=model_dir, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                precompile=False, compile_cache_dir=None, page_size=8)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


@pytest.fixture(scope="module")
def engine(model_dir):
    return _engine(model_dir)


def run(engine: LLMEngine, requests: dict, max_steps: int = 2000, abort_after=None):
    """Submits {rid: (prompt, params)}; steps until all finish; returns final outputs."""
    for rid, (prompt, params) in requests.items():
        engine.submit(rid, prompt, engine.validate(prompt, params))
    final, steps = {}, 0
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        steps += 1
        if abort_after and steps == abort_after[1]:
            engine.abort(abort_after[0])
        assert steps < max_steps
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages
    return final


PROMPTS = [[1, 450, 3681, 310, 3444, 338], [1, 20, 30, 40], list(range(100, 160)),
           [5], [1, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 11000]]


def greedy(n=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def test_greedy_batch_equals_reference_loop(engine):
    outs = run(engine, {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)})
    for i, p in enumerate(PROMPTS):
        ref = greedy_generate(engine.loaded, p, 12, eos_token_ids=())
        assert outs[f"r{i}"].outputs[0].token_ids == ref, i
        assert outs[f"r{i}"].outputs[0].finish_reason == "length"


def test_alone_equals_in_a_mixed_batch(engine):
    target = PROMPTS[0]
    alone = run(engine, {"a": (target, greedy(20))})["a"].outputs[0].token_ids
    rng = np.random.default_rng(0)
    reqs = {f"m{i}": (rng.integers(3, 49000, size=int(rng.integers(1, 60))).tolist(),
                      SamplingParams(temperature=0.9, seed=i, max_tokens=int(rng.integers(1, 30))))
            for i in range(12)}
    reqs["t"] = (target, greedy(20))
    assert run(engine, reqs)["t"].outputs[0].token_ids == alone


def test_seed_gives_same_tokens_whatever_the_batch(engine):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=10)
    alone = run(engine, {"s": (PROMPTS[1], p)})["s"].outputs[0].token_ids
    reqs = {f"o{i}": (PROMPTS[i % 5], SamplingParams(temperature=1.0, max_tokens=7))
            for i in range(6)}
    reqs["s"] = (PROMPTS[1], SamplingParams(temperature=1.0, seed=1234, max_tokens=10))
    outs = run(engine, reqs)
    assert outs["s"].outputs[0].token_ids == alone
    other = run(engine, {"x": (PROMPTS[1], SamplingParams(temperature=1.0, seed=99, max_tokens=10))})
    assert other["x"].outputs[0].token_ids != alone


def test_n_and_best_of(engine):
    out = run(engine, {"n": (PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8))})["n"]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    out = run(engine, {"b": (PROMPTS[0], SamplingParams(n=2, best_of=4, temperature=1.0, seed=5,
                                                        max_tokens=8))})["b"]
    assert len(out.outputs) == 2
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob


def test_stop_strings_and_stop_token_ids(engine):
    base = run(engine, {"g": (PROMPTS[0], greedy(24))})["g"].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[6:9]
    idx = text.find(stop)
    out = run(engine, {"s": (PROMPTS[0], greedy(24, stop=[stop]))})["s"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:idx]
    out = run(engine, {"s": (PROMPTS[0], greedy(24, stop=[stop], include_stop_str_in_output=True))})
    assert out["s"].outputs[0].text == text[:idx + len(stop)]
    tid = base.token_ids[4]
    first = base.token_ids.index(tid)
    out = run(engine, {"t": (PROMPTS[0], greedy(24, stop_token_ids=[tid]))})["t"].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.stop_reason == tid


def test_min_tokens_bans_stop_ids(engine):
    base = run(engine, {"g": (PROMPTS[1], greedy(8))})["g"].outputs[0].token_ids
    out = run(engine, {"m": (PROMPTS[1], greedy(8, stop_token_ids=[base[0]], min_tokens=3))})
    toks = out["m"].outputs[0].token_ids
    assert len(toks) >= 3 and base[0] not in toks[:3]


def test_logprobs_and_prompt_logprobs(engine):
    out = run(engine, {"l": (PROMPTS[0], greedy(6, logprobs=3, prompt_logprobs=2))})["l"]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 6
    total = 0.0
    for tok, pos in zip(comp.token_ids, comp.logprobs):
        assert pos[tok].rank == 1 and len(pos) == 3
        total += pos[tok].logprob
    assert comp.cumulative_logprob == pytest.approx(total, rel=1e-5)
    assert len(out.prompt_logprobs) == len(PROMPTS[0]) and out.prompt_logprobs[0] is None
    for tok, pos in zip(PROMPTS[0][1:], out.prompt_logprobs[1:]):
        assert tok in pos and pos[tok].logprob <= 0


def test_logit_bias_and_allowed_tokens(engine):
    out = run(engine, {"b": (PROMPTS[1], greedy(5, logit_bias={777: 100.0}))})
    assert out["b"].outputs[0].token_ids == [777] * 5
    allowed = [11, 22, 33]
    out = run(engine, {"a": (PROMPTS[1], SamplingParams(temperature=1.0, max_tokens=10, seed=3,
                                                        allowed_token_ids=allowed))})
    assert set(out["a"].outputs[0].token_ids) <= set(allowed)


def test_abort_frees_pages(engine):
    out = run(engine, {"x": (PROMPTS[2], greedy(60))}, abort_after=("x", 3))
    assert out["x"].outputs[0].finish_reason == "abort"
    assert 0 < len(out["x"].outputs[0].token_ids) < 60


def test_prefix_cache_reuses_pages_without_changing_output(engine):
    prompt = list(range(200, 250))
    first = run(engine, {"p1": (prompt, greedy(8))})["p1"]
    second = run(engine, {"p2": (prompt, greedy(8))})["p2"]
    assert second.metrics.num_cached_tokens >= 40
    stats = engine.stats()
    assert stats["prefix_cache_hits_total"] >= 40 and 0 < stats["prefix_cache_hit_rate"] < 1
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_validation_errors(engine):
    with pytest.raises(ValidationError) as e:
        engine.validate(list(range(1, 130)), greedy(4))
    assert "maximum context length is 128" in str(e.value)
    with pytest.raises(ValidationError):
        engine.validate([], greedy(4))
    with pytest.raises(ValidationError):
        engine.validate([10**6], greedy(4))


def test_max_model_len_finishes_with_length(engine):
    out = run(engine, {"m": (PROMPTS[2], SamplingParams(temperature=0, max_tokens=None,
                                                        ignore_eos=True))})["m"]
    assert len(PROMPTS[2]) + len(out.outputs[0].token_ids) == 128
    assert out.outputs[0].finish_reason == "length"


def test_preemption_keeps_outputs_exact(model_dir, engine):
    small = _engine(model_dir, num_pages=14, max_model_len=96, enable_prefix_caching=False)
    reqs = {f"q{i}": (p, greedy(30)) for i, p in enumerate(PROMPTS[:4])}
    outs = run(small, reqs)
    assert small.counters["preemptions"] > 0
    for i, p in enumerate(PROMPTS[:4]):
        assert outs[f"q{i}"].outputs[0].token_ids == greedy_generate(
            engine.loaded, p, 30, eos_token_ids=()), i


def test_bfloat16_engine_stores_kv_as_bits_and_matches_reference(model_dir):
    import jax.numpy as jnp

    from model.loader import load_model
    bf = _engine(model_dir, dtype="bfloat16")
    assert bf.runner.kv.k.dtype == jnp.uint16  # in-place scatter on the XLA/CPU path
    outs = run(bf, {f"b{i}": (p, greedy(8)) for i, p in enumerate(PROMPTS[:3])})
    ref_model = load_model(model_dir, "bfloat16")
    for i, p in enumerate(PROMPTS[:3]):
        assert outs[f"b{i}"].outputs[0].token_ids == greedy_generate(
            ref_model, p, 8, eos_token_ids=(), stacked_layers=True), i


def test_async_scheduling_matches_synchronous_steps(model_dir, engine):
    """Overlapped steps (pending tokens fed from the device) change no output.

    A mixed workload: greedy and seeded sampling, stop strings and stop ids,
    n > 1, penalties (which force synchronous steps), prefix reuse, an abort,
    and a page budget small enough to preempt.
    """
    base = run(engine, {"g": (PROMPTS[0], greedy(24))})["g"].outputs[0]
    rng = np.random.default_rng(7)
    reqs = {f"m{i}": (rng.integers(3, 49000, size=int(rng.integers(1, 50))).tolist(),
                      SamplingParams(temperature=0.8, seed=i, max_tokens=int(rng.integers(1, 25))))
            for i in range(10)}
    reqs.update({
        "g": (PROMPTS[0], greedy(24)), "g2": (PROMPTS[0] + [7, 8], greedy(16)),
        "stop": (PROMPTS[0], greedy(24, stop=[base.text[6:9]])),
        "stopid": (PROMPTS[0], greedy(24, stop_token_ids=[base.token_ids[5]])),
        "n": (PROMPTS[1], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=9)),
        "pen": (PROMPTS[2], greedy(12, repetition_penalty=1.3, presence_penalty=0.5)),
        "ab": (PROMPTS[3], greedy(40)),
    })
    results = {}
    for mode in (True, False):
        eng = _engine(model_dir, async_scheduling=mode, num_pages=24, max_model_len=96)
        results[mode] = run(eng, reqs, abort_after=("ab", 6))
        if mode:
            assert eng.counters["overlapped_steps"] > 0
            assert eng.counters["preemptions"] > 0
    for rid in reqs:
        if rid == "ab":
            assert results[True][rid].outputs[0].finish_reason == "abort"
            continue
        a, b = results[True][rid], results[False][rid]
        assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in a.outputs] == \
               [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in b.outputs], rid
    assert results[True]["g"].outputs[0].token_ids == base.token_ids


def test_w8a8_int8_engine_matches_its_own_reference_loop(model_dir):
    """The quantized engine batches exactly like the quantized model run alone."""
    eng = _engine(model_dir, quantization="w8a8_int8")
    assert eng.loaded.state["embed_tokens"]["embedding"][...].dtype == np.int8
    outs = run(eng, {f"r{i}": (p, greedy()) for i, p in enumerate(PROMPTS)})
    for i, p in enumerate(PROMPTS):
        assert outs[f"r{i}"].outputs[0].token_ids == greedy_generate(
            eng.loaded, p, 12, eos_token_ids=()), i


def test_precompile_builds_every_program_so_steps_never_trace(model_dir):
    """Start-up builds one program per token bucket (plus its prompt-logprobs
    program); a workload of mixed prefill chunks and decode rows, greedy and
    sampled, then traces nothing (counted by jax's trace events)."""
    from serving.engine import compile_log

    log = compile_log.install()
    eng = _engine(model_dir, decode_buckets=(1, 8), prefill_buckets=(16, 32))
    eng.runner.precompile()
    assert eng.runner.num_programs() == 2 * len(eng.plan.token_buckets)
    assert eng.block_manager.num_free_pages == eng.block_manager.num_usable_pages
    traced = log.snapshot()["traces"]
    prompts = [list(range(10, 10 + n)) for n in (3, 20, 31, 9, 17)]
    sampled = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, top_k=5, seed=3,
                             presence_penalty=0.5, logprobs=3, ignore_eos=True)
    reqs = {f"w{i}": (p, greedy(40)) for i, p in enumerate(prompts)}
    reqs["s"] = (prompts[1], sampled)
    outs = run(eng, reqs)
    assert log.snapshot()["traces"] == traced
    assert eng.runner.num_programs() == 2 * len(eng.plan.token_buckets)
    assert len(outs["s"].outputs[0].token_ids) == 40
    for i, p in enumerate(prompts):  # the warm-up runs left nothing behind
        assert outs[f"w{i}"].outputs[0].token_ids == greedy_generate(
            eng.loaded, p, 40, eos_token_ids=())


def test_bfloat16_kv_cache_on_a_float32_model(model_dir, engine):
    """--kv-cache-dtype bfloat16: half the bytes per page, so twice the pages in one
    budget; stored as bf16 bits on the CPU; outputs stay the float32 cache's
    (this tiny model's greedy tokens do not sit on bf16 rounding ties)."""
    budget = 256 * 1024
    f32 = _engine(model_dir, kv_cache_memory_bytes=budget)
    bf16 = _engine(model_dir, kv_cache_memory_bytes=budget, kv_cache_dtype="bfloat16")
    assert bf16.num_pages == 2 * f32.num_pages
    assert bf16.runner.kv.k.dtype in (np.uint16, np.dtype("bfloat16"))
    reqs = {f"k{i}": (p, greedy()) for i, p in enumerate(PROMPTS)}
    want, got = run(f32, reqs), run(bf16, reqs)
    same = [want[r].outputs[0].token_ids == got[r].outputs[0].token_ids for r in reqs]
    assert sum(same) >= len(same) - 1, same
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")


def test_program_cache_serves_a_second_start(model_dir, tmp_path):
    """A second engine with the same settings loads every program from disk (no
    trace), runs them, and gives the first engine's tokens; a damaged file is
    rebuilt; another setting is another key."""
    from serving.engine import compile_log

    log = compile_log.install()
    kw = dict(decode_buckets=(1, 8), prefill_buckets=(16, 32), precompile=True,
              compile_cache_dir=str(tmp_path))
    first = _engine(model_dir, **kw)
    first.precompile()
    assert first.runner.programs_loaded == 0
    files = sorted(first.runner.program_cache.dir.glob("*.bin"))
    assert len(files) == first.runner.num_programs() == 2 * len(first.plan.token_buckets)
    reqs = {f"c{i}": (p, greedy(12)) for i, p in enumerate(PROMPTS)}
    want = run(first, reqs)
    traced = log.snapshot()["traces"]
    second = _engine(model_dir, **kw)
    second.precompile()
    assert second.runner.programs_loaded == second.runner.num_programs()
    got = run(second, reqs)
    assert log.snapshot()["traces"] == traced  # nothing traced, lowered or compiled
    for r in reqs:
        assert got[r].outputs[0].token_ids == want[r].outputs[0].token_ids
    files[0].write_bytes(b"not a program")  # a torn file is rebuilt, not fatal
    third = _engine(model_dir, **kw)
    third.precompile()
    assert third.runner.programs_loaded == third.runner.num_programs() - 1
    other = _engine(model_dir, **dict(kw, max_num_seqs=4))
    assert other.runner.program_cache.dir != first.runner.program_cache.dir
