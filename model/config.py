"""Decoder model configuration parsed from a Hugging Face ``config.json`` dict.

``ModelConfig.from_hf`` accepts both the transformers 4.x layout (``rope_theta``
+ ``rope_scaling``) and the 5.x layout (``rope_parameters``, per layer type for
Gemma 3), and configs without ``architectures`` (built from a GGUF file), which
are resolved by ``model_type``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

logger = logging.getLogger(__name__)

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# architecture -> model_type
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}
_ARCH_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_ARCH_BY_MODEL_TYPE["gemma3"] = "Gemma3ForCausalLM"

SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedArchitectureError(ValueError):
    """Raised when a checkpoint's architecture has no decoder implementation."""

    def __init__(self, architecture: str):
        self.architecture = architecture
        super().__init__(
            f"unsupported architecture {architecture!r}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (hashable, so the config can be a static jit arg).

    Attributes:
      rope_type: "llama3" or "linear".
      factor: frequency division factor.
      low_freq_factor: llama3 only.
      high_freq_factor: llama3 only.
      original_max_position_embeddings: llama3 only.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r}; "
                             f"supported: {SUPPORTED_ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about one checkpoint.

    ``layer_types[i]`` decides whether layer ``i`` uses ``sliding_window``;
    Gemma 3 sliding layers also use ``rope_local_base_freq`` without scaling.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj
    qk_norm: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                             f"supported: {SUPPORTED_ACTIVATIONS}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_layers} layers")
        bad = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}")
        if SLIDING_ATTENTION in self.layer_types and not (
                isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ValueError("sliding_attention layers need a positive sliding_window, "
                             f"got {self.sliding_window!r}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be > 0")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError("eos_token_ids must be a tuple")

    @property
    def is_gemma(self) -> bool:
        """Gemma-style norms ((1 + w), pre/post sandwich) and scaled embeddings."""
        return self.model_type in ("gemma3_text", "gemma3")

    @property
    def sm_scale(self) -> float:
        """Softmax scale applied to q·k."""
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.head_dim) ** -0.5

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None for full attention)."""
        if self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """``(theta, scaling)`` of the rotary embedding used by ``layer``."""
        if (self.is_gemma and self.layer_types[layer] == SLIDING_ATTENTION
                and self.rope_local_base_freq is not None):
            return float(self.rope_local_base_freq), None
        return float(self.rope_theta), self.rope_scaling

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a Hugging Face ``config.json`` dict.

        Raises:
          UnsupportedArchitectureError: for architectures not in
            ``SUPPORTED_ARCHITECTURES``.
          ValueError: for invalid or unsupported settings.
        """
        config = dict(config)
        architecture = _architecture(config)
        if "text_config" in config and isinstance(config["text_config"], Mapping):
            # A multimodal wrapper: the decoder settings live in text_config.
            config = {**config, **config["text_config"]}
        model_type = SUPPORTED_ARCHITECTURES[architecture]
        is_gemma = model_type == "gemma3_text"

        num_layers = int(config["num_hidden_layers"])
        num_heads = int(config["num_attention_heads"])
        hidden_size = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden_size // num_heads
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        if config.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")

        rope_theta, rope_scaling, local_theta = _parse_rope(config, is_gemma)
        sliding_window = config.get("sliding_window")
        layer_types = config.get("layer_types")
        if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            sliding_window, layer_types = None, None
        if layer_types is None:
            if is_gemma:
                pattern = int(config.get("sliding_window_pattern")
                              or config.get("_sliding_window_pattern") or 6)
                layer_types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
                               for i in range(num_layers)]
            elif model_type == "mistral" and sliding_window:
                layer_types = [SLIDING_ATTENTION] * num_layers
            else:
                layer_types = [FULL_ATTENTION] * num_layers
        layer_types = tuple(layer_types)
        if SLIDING_ATTENTION not in layer_types:
            sliding_window = None

        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(e) for e in (
            eos if isinstance(eos, (list, tuple)) else [eos]))
        hidden_act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
        if isinstance(hidden_act, str) and hidden_act == "gelu_new":
            hidden_act = "gelu_pytorch_tanh"
        attention_bias = bool(config.get("attention_bias", model_type == "qwen2"))
        if model_type == "qwen2":
            attention_bias, out_bias = True, False
        else:
            out_bias = attention_bias

        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", is_gemma)),
            attention_bias=attention_bias,
            attention_out_bias=out_bias,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            hidden_act=hidden_act,
            sliding_window=None if sliding_window is None else int(sliding_window),
            layer_types=layer_types,
            rope_local_base_freq=local_theta,
            query_pre_attn_scalar=(float(config.get("query_pre_attn_scalar", 256))
                                   if is_gemma else None),
            final_logit_softcapping=_opt_float(config.get("final_logit_softcapping")),
            attn_logit_softcapping=_attn_softcap(config, is_gemma),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _opt_float(value) -> float | None:
    return None if value is None else float(value)


def _attn_softcap(config: Mapping[str, Any], is_gemma: bool) -> float | None:
    cap = _opt_float(config.get("attn_logit_softcapping"))
    if cap is not None and is_gemma:
        # transformers' Gemma3Attention never passes the cap to its attention
        # function (released Gemma 3 checkpoints leave it null); match it.
        logger.warning("Gemma 3: ignoring attn_logit_softcapping=%s, as transformers does", cap)
        return None
    return cap


def _architecture(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures")
    if archs:
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(arch)
        return arch
    model_type = config.get("model_type")
    if model_type in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[model_type]
    raise UnsupportedArchitectureError(f"model_type={model_type!r}")


def _parse_scaling(params: Mapping[str, Any] | None) -> RopeScaling | None:
    if not params:
        return None
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; "
                         f"supported: {SUPPORTED_ROPE_TYPES}")
    kwargs = {"rope_type": rope_type, "factor": float(params["factor"])}
    if rope_type == "llama3":
        kwargs.update(
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    return RopeScaling(**kwargs)


def _parse_rope(config: Mapping[str, Any], is_gemma: bool
                ) -> tuple[float, RopeScaling | None, float | None]:
    """Returns ``(rope_theta, rope_scaling, local_base_freq)`` from either layout."""
    default_theta = 1_000_000.0 if is_gemma else 10_000.0
    params = config.get("rope_parameters")
    if is_gemma:
        local = float(config.get("rope_local_base_freq", 10_000.0))
        if params and FULL_ATTENTION in params:
            full = params[FULL_ATTENTION] or {}
            sliding = params.get(SLIDING_ATTENTION) or {}
            local = float(sliding.get("rope_theta", local))
            if _parse_scaling(sliding) is not None:
                raise ValueError("rope scaling on Gemma 3 sliding layers is not supported")
            return float(full.get("rope_theta", default_theta)), _parse_scaling(full), local
    else:
        local = None
    if params:
        theta = float(params.get("rope_theta", config.get("rope_theta", default_theta)))
        return theta, _parse_scaling(params), local
    theta = float(config.get("rope_theta", default_theta))
    return theta, _parse_scaling(config.get("rope_scaling")), local
