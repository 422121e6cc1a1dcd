"""GGUF reading against transformers' own GGUF loader (the reference).

Fast: ``read_gguf``'s config and dequantized tensors equal what transformers
builds from the same file. Slow: greedy generations of SmolLM2-135M-Instruct
and Gemma 3 270M through ``load_model`` + ``greedy_generate`` equal
transformers' greedy ``generate`` token for token.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from model.default import default_model_path, gemma3_270m_path  # noqa: E402
from model.gguf import read_gguf  # noqa: E402

KEY_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id")
GEMMA_FIELDS = ("sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_activation",
                "final_logit_softcapping", "attn_logit_softcapping")

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]
PLAIN_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def _split(path: str) -> tuple[str, str]:
    return os.path.dirname(path), os.path.basename(path)


@functools.lru_cache(maxsize=None)  # parsing a GGUF's metadata takes transformers ~25 s (Gemma 3)
def _hf_config(path: str):
    folder, name = _split(path)
    return transformers.AutoConfig.from_pretrained(folder, gguf_file=name)


@functools.lru_cache(maxsize=None)
def _reference_tensors(path: str) -> dict[str, np.ndarray]:
    """Tensors exactly as transformers' GGUF loader produces them (no model weights)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(_hf_config(path))
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)
    return {k: v.numpy() for k, v in parsed["tensors"].items()}


def _assert_config_matches(ours: dict, ref: dict, fields) -> None:
    for key in fields:
        assert ours[key] == ref[key], (key, ours[key], ref[key])


def _rope_thetas(ref: dict) -> dict:
    params = ref["rope_parameters"]
    if "rope_theta" in params:
        return {"full_attention": params["rope_theta"]}
    return {kind: p["rope_theta"] for kind, p in params.items()}


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    return path, read_gguf(path)


def test_smollm2_config_matches_transformers(smollm2):
    path, (config, _) = smollm2
    ref = _hf_config(path).to_dict()
    _assert_config_matches(config, ref, KEY_FIELDS)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == _rope_thetas(ref)["full_attention"] == 100000.0


def test_smollm2_tensors_equal_transformers(smollm2):
    path, (_, tensors) = smollm2
    ref = _reference_tensors(path)
    assert set(tensors) == set(ref) - {"lm_head.weight"}  # tied: no lm_head here
    for name in tensors:
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], ref[name], err_msg=name)
    # the Q/K un-permutation is what makes these equal; V is never permuted
    assert "model.layers.0.self_attn.q_proj.weight" in tensors


@pytest.mark.slow  # transformers parses all 262k tokenizer entries to build the config
def test_gemma3_config_matches_transformers():
    from model.gguf import config_from_reader, open_gguf

    path = gemma3_270m_path()
    config = config_from_reader(open_gguf(path), path)  # metadata only: fast
    ref = _hf_config(path).to_dict()
    _assert_config_matches(config, ref, KEY_FIELDS + GEMMA_FIELDS)
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    thetas = _rope_thetas(ref)
    assert config["rope_theta"] == thetas["full_attention"]
    assert config["rope_local_base_freq"] == thetas["sliding_attention"]


@pytest.mark.slow
def test_gemma3_tensors_equal_transformers():
    path = gemma3_270m_path()
    _, tensors = read_gguf(path)
    ref = _reference_tensors(path)
    assert set(tensors) == set(ref) - {"lm_head.weight"}
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], ref[name], err_msg=name)


def _greedy_pairs(path: str, prompts: list[list[int]], max_new_tokens: int):
    """(ours, transformers') greedy continuations of each prompt."""
    from model.generate import greedy_generate
    from model.loader import load_model

    loaded = load_model(path, "float32", with_tokenizer=False)
    # transformers' model with the tensors its own GGUF loader produced (what
    # from_pretrained(gguf_file=...) builds, without parsing the file again)
    ref = transformers.AutoModelForCausalLM.from_config(_hf_config(path))
    state = {k: torch.from_numpy(v) for k, v in _reference_tensors(path).items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ref.tie_weights()
    ref = ref.float().eval()
    pairs = []
    for ids in prompts:
        ours = greedy_generate(loaded, ids, max_new_tokens)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                               do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        pairs.append((ours, out[0, len(ids):].tolist()))
    return pairs


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers():
    from model.tokenizer import load_tokenizer

    path = default_model_path()
    tokenizer = load_tokenizer(path, "gguf")
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
               for m in CHAT_PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p)
               for p in prompts]
    prompts += [tokenizer(p).input_ids for p in PLAIN_PROMPTS]
    assert len(prompts) == 5
    # 32 tokens here; the engine test (test_engine_smollm2.py) runs the issue's
    # 5 prompts x 64 tokens against transformers, alone and in a batch of 32.
    for i, (ours, ref) in enumerate(_greedy_pairs(path, prompts, 32)):
        assert ours == ref, f"prompt {i}: ours {ours} vs transformers {ref}"


@pytest.mark.slow
def test_gemma3_greedy_matches_transformers():
    from model.tokenizer import load_tokenizer

    path = gemma3_270m_path()
    tokenizer = load_tokenizer(path, "gguf")
    prompts = [tokenizer(p).input_ids for p in PLAIN_PROMPTS[:2]]
    for i, (ours, ref) in enumerate(_greedy_pairs(path, prompts, 20)):
        assert ours == ref, f"prompt {i}: ours {ours} vs transformers {ref}"
