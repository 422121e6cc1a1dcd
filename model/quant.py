"""W8A8 dynamic int8 quantization (SGLang's ``--quantization w8a8_int8``).

Weights: int8 with one float32 scale per output channel (per vocabulary row
for the embedding table), symmetric, quantized once after loading. Activations:
int8 with one scale per token, computed on the fly inside the compiled step.
The product runs as an int8 x int8 -> int32 dot, which XLA CPU executes ~2-3x
faster than the float32 GEMM (and streams a quarter of the weight bytes);
the result is rescaled to float32.

Numerics: not bit-identical to float32 (as with any quantization); logits stay
within a few percent and greedy outputs mostly agree (tests/model/test_quant.py
measures it). Off by default; ``--quantization w8a8_int8`` turns it on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

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
      q: int8 weight, ``[K, N]`` (or ``[N, K]`` when ``transposed``).
      scale: [N] float32 per-output-channel scale.
      out_dtype: result dtype (default ``x.dtype``).

    Returns:
      [..., N] in ``out_dtype``.
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
                              preferred_element_type=jnp.int32)  # [M, N]
    y = acc.astype(jnp.float32) * xs * scale[None, :]
    return y[:rows].reshape(*lead, -1).astype(out_dtype)


def _quantize_linear(module, packed: bool) -> None:
    q, s = quantize_weight(module.kernel[...], axis=0)
    if packed:
        from pallas_kernels.cpu.int8 import pack_int8_weight

        q, colsum = pack_int8_weight(q)
        module.colsum = nnx.Param(colsum)
    module.kernel = nnx.Param(q)
    module.scale = nnx.Param(s)


def _quantize_attention_weight_only(attn) -> None:
    """q|k|v fused, and o, as int8 weights with float activations (CPU kernel)."""
    from pallas_kernels.cpu.int8 import pad_int8_weight

    if attn.qkv is not None:
        return
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    fused = attn.q_proj
    kernel = jnp.concatenate([m.kernel[...] for m in parts], axis=1)
    if fused.bias is not None:
        fused.bias = nnx.Param(jnp.concatenate([m.bias[...] for m in parts]))
    for module, w in ((fused, kernel), (attn.o_proj, attn.o_proj.kernel[...])):
        q, s = quantize_weight(w, axis=0)
        module.kernel = nnx.Param(pad_int8_weight(q))
        module.scale = nnx.Param(s)
        module.weight_only = True
    attn.qkv, attn.q_proj, attn.k_proj, attn.v_proj = fused, None, None, None


def quantize_model(graphdef: nnx.GraphDef, state: nnx.State, method: str, *,
                   packed: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """Quantizes a decoder's MLPs, embedding table and LM head in place.

    The attention projections keep their float weights: their inputs carry
    the outlier channels that per-token int8 activations handle worst
    (quantizing them too took SmolLM2's worst-position logit cosine from 0.985
    to 0.84), and they are only ~20% of the weight bytes.

    Args:
      packed: store the int8 kernels in the CPU FFI kernels' layouts
        (``pallas_kernels/cpu/int8.py``; unsharded CPU weights only) instead
        of ``[in, out]`` for XLA's dot, with gate|up fused. The tied embedding
        keeps its table for lookups and gains a packed copy for the LM head.
        The attention projections then take int8 weights too, but keep float
        activations (weight-only int8: a quarter of the bytes to stream
        without the activation error above), with q|k|v fused.

    Returns the new ``(graphdef, state)``: each quantized module holds an int8
    weight plus a float32 ``scale`` and its ``__call__`` takes the int8 path.
    Shardings follow the float weights (the quantization runs on the placed
    arrays).
    """
    from model.layers import Linear

    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose from {QUANTIZATIONS}")
    model = nnx.merge(graphdef, state)
    for layer in model.layers:
        if packed:
            _quantize_attention_weight_only(layer.self_attn)
        mlp = layer.mlp
        if packed and mlp.gate_up is None and mlp.gate_proj.scale is None:
            # gate|up as one [hidden, 2 * intermediate] kernel (per-column
            # scales, so each half quantizes exactly as it would alone).
            fused = mlp.gate_proj
            fused.kernel = nnx.Param(jnp.concatenate(
                [mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...]], axis=1))
            mlp.gate_up, mlp.gate_proj, mlp.up_proj = fused, None, None
        for _, module in nnx.iter_modules(mlp):
            if isinstance(module, Linear) and module.scale is None:
                _quantize_linear(module, packed)
    if model.lm_head is not None and model.lm_head.scale is None:
        _quantize_linear(model.lm_head, packed)
    emb = model.embed_tokens
    if emb.scale is None:
        q, s = quantize_weight(emb.embedding[...], axis=1)
        emb.embedding = nnx.Param(q)
        emb.scale = nnx.Param(s)
        if packed and model.lm_head is None:
            from pallas_kernels.cpu.int8 import pack_int8_weight

            lm_packed, colsum = pack_int8_weight(q.T)
            emb.packed = nnx.Param(lm_packed)
            emb.colsum = nnx.Param(colsum)
    return nnx.split(model)
