"""W8A8 dynamic int8 quantization (SGLang's ``--quantization w8a8_int8``).

Weights: int8 with one float32 scale per output channel (per vocabulary row
for the embedding table), symmetric, quantized once after loading. Activations:
int8 with one scale per token, computed on the fly inside the compiled step.
The product runs as an int8 x int8 -> int32 dot, which XLA CPU executes ~2-3x
faster than the float32 GEMM (and streams a quarter of the weight bytes);
the result is rescaled to float32.

Quantization is a module swap after loading (gpt-fast's ``quantize.py``):
the model classes are float only, and ``quantize_model`` replaces each
``Linear`` / ``Embedding`` it quantizes with one of the int8 modules here:

==========================  =================================================
``Int8Linear``              int8 ``[in, *out]`` kernel, XLA int8 dot (W8A8)
``Int8Embedding``           int8 table; lookups dequantize, the tied LM head
                            is an int8 dot
``PackedInt8Linear``        the CPU FFI kernel's packed layout (W8A8), tp 1
``WeightOnlyInt8Linear``    int8 weights, float activations (CPU FFI), tp 1
``PackedInt8Embedding``     ``Int8Embedding`` plus a packed LM head copy
==========================  =================================================

Numerics: not bit-identical to float32 (as with any quantization); logits stay
within a few percent and greedy outputs mostly agree (tests/model/test_quant.py
measures it). Off by default; ``--quantization w8a8_int8`` turns it on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import Embedding, Linear
from model.stacked import InPlace, stack_index

QUANTIZATIONS = ("w8a8_int8",)


def quantize_weight(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 with one scale per slice along ``axis``'s complement.

    Args:
      w: float weight; ``axis`` is the one reduced over (the input features of
        a ``[in, out]`` kernel: ``axis=0``; the hidden axis of a
        ``[vocab, hidden]`` table: ``axis=1``).

    Returns:
      ``(q int8 like w, scale float32)`` with ``w ~= q * scale`` broadcast
      along ``axis``; ``scale`` has ``w``'s shape without ``axis``.
    """
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, axis)), -127, 127).astype(jnp.int8)
    return q, scale


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row dynamic int8: ``x [M, K] -> (q [M, K] int8, scale [M, 1] f32)``."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *,
                transposed: bool = False, out_dtype=None) -> jax.Array:
    """``x @ dequant(q)`` as an int8 x int8 -> int32 dot.

    Args:
      x: [..., K] activations (any float dtype).
      q: int8 weight, ``[K, *out]`` (or ``[N, K]`` when ``transposed``).
      scale: float32 per-output-channel scale, ``[*out]`` (``[N]``).
      out_dtype: result dtype (default ``x.dtype``).

    Returns:
      [..., *out] in ``out_dtype``.
    """
    out_dtype = out_dtype or x.dtype
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, k)
    if rows == 1:  # XLA CPU's one-row integer GEMV is slow; two rows take the GEMM path
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    xq, xs = _quantize_rows(x2)
    contract = ((1,), (1,)) if transposed else ((1,), (0,))
    acc = jax.lax.dot_general(xq, q, (contract, ((), ())),
                              preferred_element_type=jnp.int32)  # [M, *out]
    xs = xs.reshape(xs.shape[:1] + (1,) * (acc.ndim - 1))
    y = acc.astype(jnp.float32) * xs * scale
    return y[:rows].reshape(*lead, *acc.shape[1:]).astype(out_dtype)


def _add_bias(y: jax.Array, bias) -> jax.Array:
    return y if bias is None else y + bias[...]


def _copy_bias(linear: Linear):
    return None if linear.bias is None else nnx.Param(linear.bias[...])


class Int8Linear(nnx.Module):
    """W8A8 ``Linear``: int8 kernel ``[in, *out]``, per-output-channel scale, XLA int8 dot."""

    def __init__(self, linear: Linear):
        q, s = quantize_weight(linear.kernel[...], axis=0)
        self.kernel = nnx.Param(q)  # [in, *out] int8
        self.scale = nnx.Param(s)  # [*out] float32
        self.bias = _copy_bias(linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _add_bias(int8_matmul(x, self.kernel[...], self.scale[...]), self.bias)


class PackedInt8Linear(nnx.Module):
    """W8A8 ``Linear`` on the CPU FFI kernel (``pallas_kernels/cpu/int8.py``).

    The kernel is packed for VNNI: ``[ceil(N/16), ceil(in/4), 64]`` int8 with
    ``N = prod(out_shape)``; whole (unsharded) weights only.
    """

    def __init__(self, linear: Linear):
        from pallas_kernels.cpu.int8 import pack_int8_weight

        w = linear.kernel[...]
        self.out_shape = tuple(w.shape[1:])
        q, s = quantize_weight(w.reshape(w.shape[0], -1), axis=0)
        packed, colsum = pack_int8_weight(q)
        # read in place from the layer stack (model/stacked.py): no copy per layer
        self.kernel = InPlace(packed)
        self.colsum = InPlace(colsum)  # [ceil(N/16) * 16] int32
        self.scale = InPlace(s)  # [N] float32
        self.bias = _copy_bias(linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        from pallas_kernels.cpu.int8 import int8_matmul_cpu

        kernel = self.kernel[...]
        layer = stack_index() if kernel.ndim == 4 else None  # stacked: [groups, ...]
        y = int8_matmul_cpu(x, kernel, self.colsum[...], self.scale[...], layer=layer)
        return _add_bias(y.astype(x.dtype).reshape(*x.shape[:-1], *self.out_shape), self.bias)


class WeightOnlyInt8Linear(nnx.Module):
    """``Linear`` with int8 weights and float activations on the CPU FFI kernel.

    For the attention projections, whose inputs carry the outlier channels
    that per-token int8 activations handle worst: a quarter of the weight
    bytes to stream, no activation error. Kernel ``[in, N padded to 16]``.
    """

    def __init__(self, linear: Linear):
        from pallas_kernels.cpu.int8 import pad_int8_weight

        w = linear.kernel[...]
        self.out_shape = tuple(w.shape[1:])
        q, s = quantize_weight(w.reshape(w.shape[0], -1), axis=0)
        self.kernel = InPlace(pad_int8_weight(q))  # read in place from the layer stack
        self.scale = InPlace(s)  # [N] float32
        self.bias = _copy_bias(linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        from pallas_kernels.cpu.int8 import int8_weight_matmul_cpu

        kernel = self.kernel[...]
        layer = stack_index() if kernel.ndim == 3 else None  # stacked: [groups, K, Np]
        y = int8_weight_matmul_cpu(x, kernel, self.scale[...], layer=layer)
        return _add_bias(y.astype(x.dtype).reshape(*x.shape[:-1], *self.out_shape), self.bias)


class Int8Embedding(nnx.Module):
    """Int8 embedding table ``[vocab, hidden]`` with one scale per vocabulary row."""

    def __init__(self, embedding: Embedding):
        table = embedding.embedding[...]
        self.dtype = jnp.dtype(table.dtype)
        q, s = quantize_weight(table, axis=1)
        self.embedding = nnx.Param(q)
        self.scale = nnx.Param(s)  # [vocab] float32

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding[...], ids, axis=0)  # [T, hidden] int8
        return (rows.astype(jnp.float32)
                * jnp.take(self.scale[...], ids)[:, None]).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``[N, hidden] -> [N, vocab]`` float32."""
        return int8_matmul(x, self.embedding[...], self.scale[...], transposed=True,
                           out_dtype=jnp.float32)


class PackedInt8Embedding(Int8Embedding):
    """``Int8Embedding`` whose tied LM head runs on the CPU FFI kernel (a packed copy)."""

    def __init__(self, embedding: Embedding):
        from pallas_kernels.cpu.int8 import pack_int8_weight

        super().__init__(embedding)
        packed, colsum = pack_int8_weight(self.embedding[...].T)
        self.packed = nnx.Param(packed)
        self.colsum = nnx.Param(colsum)

    def attend(self, x: jax.Array) -> jax.Array:
        from pallas_kernels.cpu.int8 import int8_matmul_cpu

        return int8_matmul_cpu(x, self.packed[...], self.colsum[...], self.scale[...])


def quantize_model(graphdef: nnx.GraphDef, state: nnx.State, method: str, *,
                   packed: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """Swaps a decoder's MLPs, embedding table and LM head for int8 modules.

    The attention projections keep their float weights: their inputs carry
    the outlier channels that per-token int8 activations handle worst
    (quantizing them too took SmolLM2's worst-position logit cosine from 0.985
    to 0.84), and they are only ~20% of the weight bytes.

    Args:
      graphdef, state: a float ``DecoderLM`` (``nnx.split``); modules already
        swapped are left as they are.
      method: one of ``QUANTIZATIONS``.
      packed: use the CPU FFI kernels' modules (``PackedInt8Linear`` for
        gate|up, down and an untied LM head, ``PackedInt8Embedding`` for a
        tied one; unsharded CPU weights only) instead of ``Int8Linear`` for
        XLA's dot. The attention projections (q|k|v and o) then take
        ``WeightOnlyInt8Linear``: int8 weights, float activations, without
        the activation error above.

    Returns the new ``(graphdef, state)``. Shardings follow the float weights
    (the quantization runs on the placed arrays).

    Raises:
      ValueError: an unknown ``method``.
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose from {QUANTIZATIONS}")
    model = nnx.merge(graphdef, state)
    linear = PackedInt8Linear if packed else Int8Linear
    for layer in model.layers:
        if packed:
            _swap(layer.self_attn, "qkv_proj", WeightOnlyInt8Linear)
            _swap(layer.self_attn, "o_proj", WeightOnlyInt8Linear)
        _swap(layer.mlp, "gate_up_proj", linear)
        _swap(layer.mlp, "down_proj", linear)
    if model.lm_head is not None:
        _swap(model, "lm_head", linear)
    tied_packed = packed and model.lm_head is None
    _swap(model, "embed_tokens", PackedInt8Embedding if tied_packed else Int8Embedding)
    return nnx.split(model)


def _swap(parent: nnx.Module, name: str, int8_cls) -> None:
    """``parent.name = int8_cls(parent.name)`` if that module is still float."""
    module = getattr(parent, name)
    if type(module) in (Linear, Embedding):
        setattr(parent, name, int8_cls(module))
