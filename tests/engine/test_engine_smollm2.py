"""SmolLM2-135M-Instruct through the engine equals transformers' greedy
``generate`` (5 prompts, 64 tokens), alone and inside a batch of 32 mixed
requests; a shared 1,000-token prefix is served from the prefix cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.types import SamplingParams

pytestmark = pytest.mark.slow

CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "List three prime numbers."]
PLAIN = ["The history of the Roman Empire", "def fibonacci(n):"]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2():
    from model.loader import load_model
    return load_model(None)


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = smollm2.tokenizer
    out = []
    for c in CHATS:
        text = tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                       add_generation_prompt=True)
        out.append(tok.encode(text, add_special_tokens=False))
    out += [tok.encode(p) for p in PLAIN]
    return out


@pytest.fixture(scope="module")
def hf_reference(prompts):
    import torch
    from transformers import AutoModelForCausalLM

    from model.default import default_model_path
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    refs = []
    assert hf.generation_config.eos_token_id in (2, [2])
    with torch.no_grad():
        for p in prompts:
            # Stops at EOS like the engine does (ignore_eos in vLLM does not ban
            # EOS, while min_new_tokens in transformers would).
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=2, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    return refs


def _run(engine, requests):
    for rid, (prompt, params) in requests.items():
        engine.submit(rid, prompt, engine.validate(prompt, params))
    final = {}
    while engine.has_work():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    return final


@pytest.fixture(scope="module")
def engine(smollm2):
    return LLMEngine(EngineConfig(max_model_len=2048, max_num_seqs=32,
                                  max_num_batched_tokens=256, precompile=False,
                                  compile_cache_dir=None), loaded=smollm2)


def _greedy():
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)


def test_greedy_alone_equals_transformers(engine, prompts, hf_reference):
    for i, p in enumerate(prompts):
        out = _run(engine, {f"a{i}": (p, _greedy())})[f"a{i}"]
        assert out.outputs[0].token_ids == hf_reference[i], i


def test_greedy_in_batch_of_32_equals_transformers(engine, prompts, hf_reference):
    rng = np.random.default_rng(0)
    reqs = {f"g{i}": (p, _greedy()) for i, p in enumerate(prompts)}
    for j in range(32 - len(prompts)):
        mixed = rng.integers(100, 40000, size=int(rng.integers(1, 200))).tolist()
        reqs[f"m{j}"] = (mixed, SamplingParams(temperature=0.8, top_p=0.9, seed=j,
                                               max_tokens=int(rng.integers(1, 80))))
    outs = _run(engine, reqs)
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages
    for i in range(len(prompts)):
        assert outs[f"g{i}"].outputs[0].token_ids == hf_reference[i], i


def test_prefix_cache_computes_only_unshared_pages(smollm2):
    rng = np.random.default_rng(1)
    shared = rng.integers(100, 40000, size=1000).tolist()
    a = shared + rng.integers(100, 40000, size=40).tolist()
    b = shared + rng.integers(100, 40000, size=40).tolist()
    outputs = {}
    for caching in (True, False):
        eng = LLMEngine(EngineConfig(max_model_len=1100, max_num_seqs=4,
                                     max_num_batched_tokens=256, precompile=False,
                                     compile_cache_dir=None, enable_prefix_caching=caching),
                        loaded=smollm2)
        out_a = _run(eng, {"a": (a, SamplingParams(temperature=0, max_tokens=8))})["a"]
        before = eng.counters["prompt_tokens"]
        out_b = _run(eng, {"b": (b, SamplingParams(temperature=0, max_tokens=8))})["b"]
        computed = eng.counters["prompt_tokens"] - before
        if caching:
            # 1000 shared tokens = 62 full pages of 16 (992 tokens) reused
            assert out_b.metrics.num_cached_tokens == 992
            assert computed == len(b) - 992
        else:
            assert computed == len(b)
        outputs[caching] = (out_a.outputs[0].token_ids, out_b.outputs[0].token_ids)
    assert outputs[True] == outputs[False]
