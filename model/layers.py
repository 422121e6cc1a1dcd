"""Building blocks of the decoder: linear, embedding, RMSNorm, RoPE, gated MLP.

Weights are stored as the math uses them: a linear kernel is ``[in, out]``
(Hugging Face stores ``[out, in]``; ``model/weights.py`` transposes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import RopeScaling
from model.quant import int8_matmul
from pallas_kernels.cpu.int8 import int8_matmul_cpu, int8_weight_matmul_cpu

_INIT = nnx.initializers.normal(0.02)


def _matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``x @ w`` accumulated in float32.

    With bfloat16 operands, asking XLA for a float32 result selects the fast
    bf16 GEMM with float32 accumulation (about 1.75x float32 on these CPUs;
    a plain bf16-output dot takes a slow path); the result is cast back.
    """
    if w.dtype == jnp.float32 and x.dtype == jnp.float32:
        return x @ w
    out_dtype = out_dtype or x.dtype
    x = x.astype(w.dtype)  # bf16 weights under f32 activations: a bf16 GEMM
    if math.prod(x.shape[:-1]) == 1:
        # A one-row bf16 product takes XLA CPU's slow GEMV path (~15x slower
        # than two rows for SmolLM2's lm_head); compute two rows, keep one.
        x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        y = jnp.matmul(x2, w, preferred_element_type=jnp.float32)[:1]
        return y.reshape(*x.shape[:-1], w.shape[-1]).astype(out_dtype)
    y = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel: [in_features, out_features]``."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
                 dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_INIT(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
        self.scale = nnx.data(None)  # [out_features] f32 once quantized to int8 (model/quant.py)
        self.colsum = nnx.data(None)  # int32 column sums once packed for the CPU int8 kernel
        self.weight_only = False  # int8 kernel with float activations (model/quant.py)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.colsum is not None:  # kernel packed: [out/16, in/4, 64] int8
            y = int8_matmul_cpu(x, self.kernel[...], self.colsum[...],
                                self.scale[...]).astype(x.dtype)
        elif self.weight_only:  # kernel [in, out padded to 16] int8
            y = int8_weight_matmul_cpu(x, self.kernel[...], self.scale[...]).astype(x.dtype)
        elif self.scale is not None:
            y = int8_matmul(x, self.kernel[...], self.scale[...])
        else:
            y = _matmul(x, self.kernel[...])  # [..., out_features]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding table ``[vocab_size, hidden_size]``."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_INIT(rngs.params(), (vocab_size, hidden_size), dtype))
        self.scale = nnx.data(None)  # [vocab_size] f32 once quantized to int8 (model/quant.py)
        self.packed = nnx.data(None)  # the int8 table packed for the CPU kernel (tied LM head)
        self.colsum = nnx.data(None)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding[...], ids, axis=0)  # [T, hidden]
        if self.scale is not None:
            return (rows.astype(jnp.float32)
                    * jnp.take(self.scale[...], ids)[:, None]).astype(self.dtype)
        return rows

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``[N, hidden] -> [N, vocab]``."""
        if self.packed is not None:
            return int8_matmul_cpu(x, self.packed[...], self.colsum[...], self.scale[...])
        if self.scale is not None:
            return int8_matmul(x, self.embedding[...], self.scale[...], transposed=True,
                               out_dtype=jnp.float32)
        return _matmul(x, self.embedding[...].T, out_dtype=jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, normalised in float32.

    ``gemma=False`` (Llama): ``w * normed.astype(x.dtype)``; ``gemma=True``:
    ``(normed * (1 + w)).astype(x.dtype)`` with the weight stored zero-centred.
    """

    def __init__(self, dim: int, *, eps: float, gemma: bool, dtype):
        self.eps = eps
        self.gemma = gemma
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if gemma else jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.gemma:
            return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w * normed.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32), as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: leave high frequencies, divide low ones, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each [num_tokens, head_dim] float32, of ``positions * inv_freq``.

    Computed once per forward pass and shared by every layer with the same
    frequencies: left inside each layer's fusion, XLA:CPU evaluated sin and
    cos per element of every head of q and k, in every layer (SmolLM2, 32
    decode rows: RoPE fusions 5.3 -> 2.8 ms per step).
    """
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates ``x`` (half-split layout, as Hugging Face Llama).

    Args:
      x: [num_tokens, num_heads, head_dim].
      tables: ``rope_tables(positions, inv_freq)``, each [num_tokens, head_dim].

    Returns:
      [num_tokens, num_heads, head_dim] in x's dtype.
    """
    cos, sin = tables
    cos = cos.astype(x.dtype)[:, None, :]  # [T, 1, D]
    sin = sin.astype(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def activation(name: str):
    """The MLP activation function for a Hugging Face ``hidden_act`` name."""
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_pytorch_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    raise ValueError(f"unsupported activation {name!r}")


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, hidden_act: str,
                 dtype, rngs: nnx.Rngs):
        self.hidden_act = hidden_act
        self.intermediate_size = intermediate_size
        self.gate_proj = Linear(hidden_size, intermediate_size, use_bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden_size, intermediate_size, use_bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate_size, hidden_size, use_bias=False, dtype=dtype, rngs=rngs)
        # [hidden, 2 * intermediate] gate|up in one Linear, set by model/quant.py
        # for the CPU int8 kernel (one call, one activation quantization).
        self.gate_up = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.hidden_act)
        if self.gate_up is not None:
            h = self.gate_up(x)  # [T, 2 * intermediate]
            gate, up = h[..., :self.intermediate_size], h[..., self.intermediate_size:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(act(gate) * up)  # [T, hidden]
