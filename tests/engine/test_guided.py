"""Guided decoding: llguidance masks with the SmolLM2 tokenizer, the sampler's
bitmask path, and the engine on a tiny random Llama (whose unconstrained output
is noise, so a match can only come from the mask)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from serving.engine.errors import ValidationError
from serving.engine.guided import (GuideCompiler, GuideSpec, bitmask_table, check_guide,
                                   spec_from_json_value)
from serving.engine.types import SamplingParams

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "pet": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    from model.default import default_model_path
    from model.tokenizer import load_tokenizer
    return load_tokenizer(default_model_path(), "gguf")


@pytest.fixture(scope="module")
def guides(tokenizer):
    return GuideCompiler(tokenizer, [tokenizer.eos_token_id])


def allowed_ids(mask: np.ndarray) -> np.ndarray:
    bits = ((mask[:, None].astype(np.int64) >> np.arange(32)) & 1).reshape(-1)
    return np.nonzero(bits)[0]


def walk(guides, tokenizer, spec: GuideSpec, pick, max_steps: int = 64) -> str:
    """Greedy walk through the grammar: ``pick(allowed ids, step)`` chooses each token."""
    m = guides.matcher(spec)
    out = []
    for step in range(max_steps):
        ids = allowed_ids(m.next_mask())
        assert len(ids) > 0
        tok = int(pick(ids, step))
        assert tok in ids
        if tok == tokenizer.eos_token_id:
            assert m.is_accepting()
            break
        out.append(tok)
        if m.advance(tok):
            assert m.is_finished() and m.is_accepting()
            break
    return tokenizer.decode(out)


def random_pick(seed):
    rng = np.random.default_rng(seed)
    return lambda ids, step: rng.choice(ids)


def test_regex_mask_allows_only_valid_continuations(guides, tokenizer):
    m = guides.matcher(GuideSpec("regex", r"[0-9]{3}-[a-z]{2}"))
    ids = allowed_ids(m.next_mask())
    texts = {tokenizer.decode([int(t)]) for t in ids}
    assert texts and all(re.fullmatch(r"[0-9]{1,3}(-[a-z]{0,2})?", t) for t in texts), texts
    assert tokenizer.eos_token_id not in ids  # not accepting yet
    for t in tokenizer.encode("123-a", add_special_tokens=False):
        assert not m.advance(t)
    assert not m.is_accepting()
    assert m.advance(tokenizer.encode("b", add_special_tokens=False)[0])  # complete: stop
    assert m.is_finished()
    assert list(allowed_ids(m.next_mask())) == [tokenizer.eos_token_id]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_walks_fullmatch_the_regex(guides, tokenizer, seed):
    pattern = r"(yes|no), [A-Z][a-z]{1,5} [0-9]{2}"
    text = walk(guides, tokenizer, GuideSpec("regex", pattern), random_pick(seed))
    assert re.fullmatch(pattern, text), text


def test_choice_walks_give_a_choice(guides, tokenizer):
    spec = GuideSpec("choice", json.dumps(["positive", "negative", "neutral"]))
    for seed in range(4):
        assert walk(guides, tokenizer, spec, random_pick(seed)) in (
            "positive", "negative", "neutral")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_walks_parse_and_validate(guides, tokenizer, seed):
    spec = spec_from_json_value(SCHEMA, "guided_json")
    # prefer short tokens so strings and numbers end within the step budget
    rng = np.random.default_rng(seed)
    eos = tokenizer.eos_token_id

    def pick(ids, step):
        if eos in ids:
            return eos
        return rng.choice(ids[:max(1, len(ids) // 4)])

    text = walk(guides, tokenizer, spec, pick, max_steps=200)
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "pet"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert obj["pet"] in ("cat", "dog")


def test_lark_and_gbnf_grammars(guides, tokenizer):
    for grammar in ('start: "on" | "off"', 'root ::= "on" | "off"'):
        spec = GuideSpec("grammar", grammar, "guided_grammar")
        assert walk(guides, tokenizer, spec, random_pick(0)) in ("on", "off")


@pytest.mark.parametrize("spec,param", [
    (GuideSpec("regex", "[0-9", "guided_regex"), "guided_regex"),
    (GuideSpec("json", '{"type": "nope"}', "guided_json"), "guided_json"),
    (GuideSpec("json", "[1, 2]", "response_format"), "response_format"),
    (GuideSpec("json", "{not json", "sampling_params.json_schema"),
     "sampling_params.json_schema"),
    (GuideSpec("choice", "[]", "guided_choice"), "guided_choice"),
    (GuideSpec("choice", '["a", 3]', "guided_choice"), "guided_choice"),
    (GuideSpec("grammar", "start: undefined_rule", "guided_grammar"), "guided_grammar"),
    (GuideSpec("xml", "<a/>", "guided_xml"), "guided_xml"),
])
def test_bad_specs_raise_validation_errors_naming_the_param(spec, param):
    with pytest.raises(ValidationError) as exc:
        SamplingParams(guide=spec)
    assert exc.value.param == param
    with pytest.raises(ValidationError):
        check_guide(spec)


def test_spec_from_json_value_accepts_dicts_and_strings():
    a = spec_from_json_value(SCHEMA, "guided_json")
    b = spec_from_json_value(json.dumps(SCHEMA), "guided_json")
    assert a == b and a.kind == "json"
    with pytest.raises(ValidationError) as exc:
        spec_from_json_value("{bad", "guided_json")
    assert exc.value.param == "guided_json"


def test_needs_sync():
    assert not SamplingParams().needs_sync()
    assert SamplingParams(guide=GuideSpec("regex", "a+")).needs_sync()


def test_bitmask_table_pads_rows_and_vocab():
    mask = np.array([0b101, 0], np.int32)  # tokenizer vocab of 64: tokens 0 and 2
    table = bitmask_table([(1, mask)], 3, 100)  # model vocab 100 -> 4 words
    assert table.shape == (3, 4)
    assert (table[0] == -1).all() and (table[2] == -1).all()
    np.testing.assert_array_equal(table[1], [0b101, 0, 0, 0])
    assert bitmask_table([], 3, 100).shape == (3, 1)


def test_sampler_applies_the_bitmask():
    from serving.engine.runner import StepItem
    from serving.engine.sampling import sample, unpack_bitmask
    from serving.engine.sampling_tensors import build_sampling_tensors

    vocab = 40
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    logits[:, 7] = 50.0  # the unconstrained favourite
    masks = {0: np.array([1 << 3, 1 << (33 - 32)], np.int32),  # tokens 3 and 33
             2: np.array([0, 1 << (39 - 32)], np.int32)}  # token 39 only
    table = bitmask_table(list(masks.items()), 3, vocab)
    bits = np.asarray(unpack_bitmask(table, vocab))
    assert bits.shape == (3, vocab) and bits[1].all()
    assert list(np.nonzero(bits[0])[0]) == [3, 33] and list(np.nonzero(bits[2])[0]) == [39]

    def tensors(temperature, step):
        items = [StepItem(seq_id=i, token_ids=[1], start_pos=0, block_table=[1], sample=True,
                          params=SamplingParams(temperature=temperature), seed=i,
                          output_token_ids=[0] * step, token_bitmask=masks.get(i))
                 for i in range(3)]
        return build_sampling_tensors(items, 3, vocab_size=vocab, max_model_len=64,
                                      max_logprobs=SamplingParams.MAX_LOGPROBS)

    greedy = np.asarray(sample(logits, tensors(0.0, 0)).tokens)
    assert greedy[0] == (3 if logits[0, 3] > logits[0, 33] else 33)
    assert greedy[1] == 7 and greedy[2] == 39
    for step in range(20):
        toks = np.asarray(sample(logits, tensors(1.5, step)).tokens)
        assert toks[0] in (3, 33) and toks[2] == 39


# ---- the engine on a tiny random model -------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import torch
    import transformers

    from model.default import default_model_path
    from model.tokenizer import load_tokenizer
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine

    path = tmp_path_factory.mktemp("tiny_llama_guided")
    cfg = transformers.LlamaConfig(
        vocab_size=49152 + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer(default_model_path(), "gguf").save_pretrained(path)
    return LLMEngine(EngineConfig(model=str(path), max_model_len=256, max_num_seqs=8,
                                  max_num_batched_tokens=64, precompile=False,
                                  compile_cache_dir=None, page_size=8))


def run(engine, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.submit(rid, prompt, engine.validate(prompt, params))
    final = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_engine_guided_outputs_match_in_a_mixed_batch(engine):
    prompt = engine.tokenizer.encode("Tell me something:")
    pattern = r"[0-9]{2}-[a-z]{3}"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    reqs = {
        "free": (prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
        "regex": (prompt, SamplingParams(temperature=0.0, max_tokens=40,
                                         guide=GuideSpec("regex", pattern))),
        "choice": (prompt, SamplingParams(temperature=0.9, seed=3, max_tokens=40, n=3,
                                          guide=GuideSpec("choice", '["alpha", "beta"]'))),
        "json": (prompt, SamplingParams(temperature=0.0, max_tokens=60,
                                        guide=spec_from_json_value(schema, "guided_json"))),
    }
    final = run(engine, reqs)
    assert len(final["free"].outputs[0].token_ids) == 12
    out = final["regex"].outputs[0]
    assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop", out
    assert len(out.token_ids) < 40
    assert [o.text in ("alpha", "beta") for o in final["choice"].outputs] == [True] * 3
    assert all(o.finish_reason == "stop" for o in final["choice"].outputs)
    obj = json.loads(final["json"].outputs[0].text)
    assert isinstance(obj["ok"], bool) and obj["n"] in (1, 2, 3)


def test_engine_rejects_bad_guides_at_validation(engine):
    prompt = engine.tokenizer.encode("hi")
    with pytest.raises(ValidationError) as exc:
        engine.validate(prompt, SamplingParams(guide=GuideSpec("regex", "(", "guided_regex")))
    assert exc.value.param == "guided_regex"
