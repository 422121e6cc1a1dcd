"""Reads a GGUF file into a Hugging Face style config dict and float32 tensors.

No torch: the ``gguf`` package's ``GGUFReader`` parses the file and
``gguf.quants.dequantize`` turns every tensor into float32 numpy. The result is
what transformers' GGUF loader (``transformers/modeling_gguf_pytorch_utils.py``)
builds, with the same two repairs of llama.cpp's conversions:

- Llama-family ``attn_q`` / ``attn_k`` rows were permuted by llama.cpp's
  converter for its rotary layout; the permutation is undone
  (``LlamaTensorProcessor._reverse_permute_weights``).
- Gemma 3 norm weights were stored as ``1 + w``; ``w`` is restored by
  subtracting 1 (``Gemma2TensorProcessor``), because the Hugging Face Gemma
  RMSNorm multiplies by ``1 + w`` itself.

Tensor names are mapped with an explicit table (GGUF ``blk.N.attn_q.weight`` ->
``model.layers.N.self_attn.q_proj.weight``), the same as the gguf package's
own name map for these architectures.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

logger = logging.getLogger(__name__)

# GGUF ``general.architecture`` -> (HF model_type, HF architectures entry).
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

# Per-layer GGUF tensor stem -> HF module path under ``model.layers.N.``.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
# Llama/Qwen: ffn_norm is the pre-MLP norm HF calls post_attention_layernorm.
_LLAMA_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}
# Gemma 3 has four norms per layer.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")
# Gemma 3 (all sizes) alternates five sliding-window layers and one global one;
# llama.cpp hard-codes the same pattern.
GEMMA3_SLIDING_PATTERN = 6


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a GGUF file into an HF config dict and dequantized HF-named tensors.

    Args:
        path: the ``.gguf`` file.

    Returns:
        ``(hf_config, tensors)``: ``hf_config`` looks like a Hugging Face
        ``config.json`` (``model_type``, ``architectures``, ``rope_theta``, ...);
        ``tensors`` maps HF names (``model.layers.0.self_attn.q_proj.weight``)
        to float32 numpy arrays in HF layout (``[out_features, in_features]``).
        Tied models carry no ``lm_head.weight``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable GGUF, or its architecture is not
            supported.
    """
    reader = open_gguf(path)
    config = config_from_reader(reader, path)
    arch = read_field(reader, "general.architecture")
    tensors = {}
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(arch, tensor.name)
        if hf_name is None:
            logger.warning("%s: skipping unmapped GGUF tensor %s", path, tensor.name)
            continue
        tensors[hf_name] = _process(arch, config, tensor.name, _dequantize(tensor))
    return config, tensors


def open_gguf(path: str | os.PathLike):
    """Opens ``path`` (``model.gguf_fast.GGUFFile``: header decoded, tensors mapped), with clear errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable GGUF file.
    """
    from model.gguf_fast import GGUFFile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFFile(path)
    except Exception as err:  # ValueError/IndexError/struct.error/KeyError... on junk
        raise ValueError(f"{path} is not a valid GGUF file: {err}") from err


def read_field(reader, key: str, default=None):
    """Returns the Python value of metadata field ``key`` (``default`` if absent)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_tensor_name(arch: str, gguf_name: str) -> str | None:
    """Maps a GGUF tensor name to its Hugging Face name (None if unknown)."""
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LLAMA_LAYER_NAMES
    match = _LAYER_RE.match(gguf_name)
    if match:
        layer, stem, kind = match.groups()
        if stem in layer_names:
            return f"model.layers.{layer}.{layer_names[stem]}.{kind}"
        return None
    match = _GLOBAL_RE.match(gguf_name)
    if match and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    return None


def config_from_reader(reader, path: str | os.PathLike = "") -> dict:
    """Builds a Hugging Face ``config.json`` style dict from GGUF metadata.

    Raises:
        ValueError: the architecture is not one of :data:`ARCHITECTURES`.
    """
    arch = read_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})")

    def meta(key, default=None):
        return read_field(reader, f"{arch}.{key}", default)

    model_type, hf_arch = ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    num_heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    head_dim = meta("attention.key_length") or meta("rope.dimension_count") or hidden // num_heads
    vocab = meta("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    config = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", num_heads)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        value = read_field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[key] = int(value)
    rope_scaling = _rope_scaling(meta)
    if arch == "gemma3":
        _add_gemma3(config, meta, rope_scaling)
    else:
        config["hidden_act"] = "silu"
        config["mlp_bias"] = False
        config["rope_scaling"] = rope_scaling
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"],
                                     **(rope_scaling or {})}
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def _rope_scaling(meta) -> dict | None:
    kind = meta("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(meta("rope.scaling.factor", 1.0))}
    original = meta("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _add_gemma3(config: dict, meta, rope_scaling: dict | None) -> None:
    """Fills the Gemma 3 fields GGUF leaves out, as llama.cpp assumes them."""
    num_layers = config["num_hidden_layers"]
    config["layer_types"] = [
        "full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
        for i in range(num_layers)]
    config["sliding_window"] = int(meta("attention.sliding_window", 4096))
    config["sliding_window_pattern"] = GEMMA3_SLIDING_PATTERN
    config["rope_local_base_freq"] = 10000.0
    config["rope_scaling"] = rope_scaling
    config["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"],
                           **(rope_scaling or {})},
    }
    # llama.cpp: 27B (62 layers) scales queries by hidden/heads, others by head_dim.
    config["query_pre_attn_scalar"] = (
        config["hidden_size"] // config["num_attention_heads"] if num_layers == 62
        else config["head_dim"])
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["final_logit_softcapping"] = None
    config["attn_logit_softcapping"] = None


def _dequantize(tensor) -> np.ndarray:
    """Dequantizes one GGUF tensor to float32 in HF (row-major, reversed) shape."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    array = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)


def _process(arch: str, config: dict, gguf_name: str, weights: np.ndarray) -> np.ndarray:
    """Undoes llama.cpp's Q/K permutation (Llama) and ``1 + w`` norms (Gemma 3)."""
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = (config["num_attention_heads"] if ".attn_q." in gguf_name
                 else config["num_key_value_heads"])
        return reverse_permute(weights, heads)
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return weights - np.float32(1.0)
    return weights


def reverse_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of a Q or K projection.

    llama.cpp reorders each head's rows from HF's half-split rotary layout
    ``[x0..x(d/2-1), y0..]`` to interleaved pairs; this is the inverse, as in
    transformers' ``LlamaTensorProcessor``.

    Args:
        weights: ``[num_heads * head_dim, ...]`` (weight or bias).
        num_heads: heads in this projection (KV heads for K).
    """
    half = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weights.shape))
