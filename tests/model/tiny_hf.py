"""Tiny random Hugging Face checkpoints of every decoder family, for tests."""

from __future__ import annotations

import torch
import transformers

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=256, rms_norm_eps=1e-6)

# name -> (config class, kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=False)),
    "llama3_tied": ("LlamaConfig", dict(
        _COMMON, tie_word_embeddings=True, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear": ("LlamaConfig", dict(
        _COMMON, num_hidden_layers=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(_COMMON, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(
        _COMMON, num_hidden_layers=3, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=5.0, attn_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        hidden_activation="gelu_pytorch_tanh")),
}


def hf_config(family: str):
    """The transformers config object of a tiny ``family`` model."""
    cls_name, kwargs = FAMILIES[family]
    return getattr(transformers, cls_name)(**kwargs)


def build_hf_model(family: str, seed: int = 0):
    """A tiny random transformers model (eager attention, float32, eval mode).

    Weights are re-drawn larger than the default init (and norm weights
    perturbed) so every parameter visibly matters.
    """
    torch.manual_seed(seed)
    config = hf_config(family)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_hf_model(family: str, path, seed: int = 0):
    """Builds a tiny model, saves it as safetensors under ``path``; returns the model."""
    model = build_hf_model(family, seed)
    model.save_pretrained(path)
    return model
