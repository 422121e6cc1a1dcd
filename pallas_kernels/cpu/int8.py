"""W8A8 int8 matmul on the CPU through a C++ XLA FFI kernel.

``pack_int8_weight`` turns a quantized ``[K, N]`` int8 kernel into the
kernel's layout once, at load time; ``int8_matmul_cpu`` then quantizes the
activations per row and multiplies inside one custom call (see
``csrc/int8_matmul_cpu.cc``). The result equals ``model/quant.py``'s XLA path
up to float rounding of the activation scale (the integer product is exact).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import ffi

TARGET = ffi.TARGETS["Int8MatmulCpu"]
available = ffi.available


def pack_int8_weight(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``q [K, N] int8 -> (packed [ceil(N/16), ceil(K/4), 64] int8, colsum [ceil(N/16)*16] int32)``.

    ``packed[b, kk, 4 * l + j] = q[4 * kk + j, 16 * b + l]`` (zeros past K, N):
    each 64-byte row is one VNNI operand, 16 columns by 4 reduction steps.
    """
    k, n = q.shape
    kp, np_ = -(-k // 4) * 4, -(-n // 16) * 16
    qp = jnp.zeros((kp, np_), jnp.int8).at[:k, :n].set(q.astype(jnp.int8))
    packed = qp.reshape(kp // 4, 4, np_ // 16, 16).transpose(2, 0, 3, 1).reshape(
        np_ // 16, kp // 4, 64)
    colsum = jnp.sum(qp.astype(jnp.int32), axis=0)
    return packed, colsum


def int8_matmul_cpu(x: jax.Array, packed: jax.Array, colsum: jax.Array,
                    scale: jax.Array, layer=None) -> jax.Array:
    """``x @ dequant(w)`` with per-row int8 activations.

    Args:
      x: [..., K] float activations (computed in float32).
      packed, colsum: from ``pack_int8_weight``; with ``layer``, stacks of
        them (``[L, ...]``, and ``scale`` ``[L, N]``), read in place at ``layer``.
      scale: [N] float32 per-output-channel weight scale.
      layer: None, or an int32 scalar (traced inside a loop over layers).

    Returns:
      [..., N] float32.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    stack = () if layer is None else packed.shape[:1]
    n = scale.shape[-1]
    if (packed.ndim != 3 + len(stack) or packed.shape[-2] != -(-k // 4)
            or packed.shape[-3] != -(-n // 16) or colsum.shape[:-1] != stack
            or scale.shape[:-1] != stack):
        raise ValueError(f"packed weight {packed.shape} does not fit x {x.shape} and "
                         f"scale {scale.shape}")
    if not available():
        raise RuntimeError("the CPU int8 kernel could not be built; see the log")
    rows = math.prod(lead)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    y = call(x.reshape(rows, k).astype(jnp.float32), packed, colsum,
             scale.astype(jnp.float32), jnp.asarray(0 if layer is None else layer, jnp.int32))
    return y.reshape(*lead, n)


WEIGHT_ONLY_TARGET = ffi.TARGETS["Int8WeightMatmulCpu"]


def pad_int8_weight(q: jax.Array) -> jax.Array:
    """``q [K, N] int8 -> [K, ceil(N/16)*16]`` (zero columns) for the weight-only kernel."""
    k, n = q.shape
    return jnp.zeros((k, -(-n // 16) * 16), jnp.int8).at[:, :n].set(q.astype(jnp.int8))


def int8_weight_matmul_cpu(x: jax.Array, w: jax.Array, scale: jax.Array,
                           layer=None) -> jax.Array:
    """``x @ (w * scale)`` with float32 activations and int8 weights.

    Args:
      x: [..., K] float activations (computed in float32).
      w: [K, Np] int8 from ``pad_int8_weight``; with ``layer``, a stack
        ``[L, K, Np]`` (and ``scale`` ``[L, N]``) read in place at ``layer``.
      scale: [N] float32 per-output-channel scale.
      layer: None, or an int32 scalar (traced inside a loop over layers).

    Returns:
      [..., N] float32.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    stack = () if layer is None else w.shape[:1]
    n = scale.shape[-1]
    if (w.ndim != 2 + len(stack) or w.shape[-2] != k or w.shape[-1] != -(-n // 16) * 16
            or scale.shape[:-1] != stack):
        raise ValueError(f"int8 weight {w.shape} does not fit x {x.shape} and scale {scale.shape}")
    if not available():
        raise RuntimeError("the CPU int8 kernel could not be built; see the log")
    rows = math.prod(lead)
    call = jax.ffi.ffi_call(WEIGHT_ONLY_TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    y = call(x.reshape(rows, k).astype(jnp.float32), w, scale.astype(jnp.float32),
             jnp.asarray(0 if layer is None else layer, jnp.int32))
    return y.reshape(*lead, n)
