"""Building blocks of the decoder: linear, embedding, RMSNorm, RoPE, gated MLP.

Float only: ``model/quant.py`` swaps ``Linear`` and ``Embedding`` for int8
modules after loading. Weights are stored as the math uses them: a linear
kernel is ``[in, *out]`` (Hugging Face stores ``[out, in]``;
``model/weights.py`` transposes, ``model/fusion.py`` fuses q|k|v and gate|up).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import RopeScaling

_INIT = nnx.initializers.normal(0.02)


def _contract_last(x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
    """``x [..., K]`` against ``w [K, *out]`` -> ``[..., *out]`` (one GEMM)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``x [..., K] @ w [K, *out] -> [..., *out]`` accumulated in float32.

    With bfloat16 operands, asking XLA for a float32 result selects the fast
    bf16 GEMM with float32 accumulation (about 1.75x float32 on these CPUs;
    a plain bf16-output dot takes a slow path); the result is cast back.
    """
    if w.dtype == jnp.float32 and x.dtype == jnp.float32:
        return _contract_last(x, w)
    out_dtype = out_dtype or x.dtype
    x = x.astype(w.dtype)  # bf16 weights under f32 activations: a bf16 GEMM
    if math.prod(x.shape[:-1]) == 1:
        # A one-row bf16 product takes XLA CPU's slow GEMV path (~15x slower
        # than two rows for SmolLM2's lm_head); compute two rows, keep one.
        x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        y = _contract_last(x2, w, preferred_element_type=jnp.float32)[:1]
        return y.reshape(*x.shape[:-1], *w.shape[1:]).astype(out_dtype)
    return _contract_last(x, w, preferred_element_type=jnp.float32).astype(out_dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel: [in_features, *out_shape]``.

    ``out_features`` is an int or a shape: fused projections keep their parts
    on axes of their own (``model/fusion.py``), so ``y`` is ``[..., *out_shape]``.
    """

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], *,
                 use_bias: bool, dtype, rngs: nnx.Rngs):
        out_shape = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.kernel = nnx.Param(_INIT(rngs.params(), (in_features, *out_shape), dtype))
        self.bias = nnx.Param(jnp.zeros(out_shape, dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel[...])  # [..., *out_shape]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding table ``[vocab_size, hidden_size]``."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_INIT(rngs.params(), (vocab_size, hidden_size), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)  # [T, hidden]

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``[N, hidden] -> [N, vocab]`` float32."""
        return matmul(x, self.embedding[...].T, out_dtype=jnp.float32)


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
    """Gated MLP: ``down(act(gate(x)) * up(x))`` with gate|up as one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, hidden_act: str,
                 dtype, rngs: nnx.Rngs):
        self.hidden_act = hidden_act
        # [hidden, 2, intermediate]: gate at [:, 0], up at [:, 1] (model/fusion.py)
        self.gate_up_proj = Linear(hidden_size, (2, intermediate_size), use_bias=False,
                                   dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate_size, hidden_size, use_bias=False, dtype=dtype,
                                rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.gate_up_proj(x)  # [T, 2, intermediate]
        gate, up = h[..., 0, :], h[..., 1, :]
        return self.down_proj(activation(self.hidden_act)(gate) * up)  # [T, hidden]
