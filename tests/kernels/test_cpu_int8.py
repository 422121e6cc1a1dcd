"""The C++ CPU int8 matmul kernel against an exact integer emulation.

The kernel quantizes activations per row and runs the int8 product with
AVX-512 VNNI (portable loops without it); the integer part is exact, so it
must equal numpy's int64 product of the same quantized operands, with the
same float epilogue. Shapes include K not a multiple of 4 and N not a
multiple of 16 (packing pads both), and row counts around the 4-row tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.quant import int8_matmul, quantize_weight
from pallas_kernels import cpu_int8

pytestmark = pytest.mark.skipif(not cpu_int8.available(),
                                reason="no C++ compiler to build the CPU kernels")


def _emulate(x, q, scale):
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1, keepdims=True)
    xs = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    xq = np.clip(np.round(x / xs), -127, 127).astype(np.int64)
    acc = xq @ np.asarray(q, np.int64)
    return (acc.astype(np.float32) * xs) * np.asarray(scale, np.float32)[None, :]


@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (2, 70, 64), (3, 128, 100), (4, 64, 16),
                                   (5, 36, 200), (33, 96, 72)])
def test_equals_integer_emulation(m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, : k // 2] *= 30.0  # a row with outlier channels
    q, s = quantize_weight(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    assert packed.shape == (-(-n // 16), -(-k // 4), 64) and colsum.shape == (-(-n // 16) * 16,)
    y = jax.jit(cpu_int8.int8_matmul_cpu)(jnp.asarray(x), packed, colsum, s)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _emulate(x, q, s), rtol=1e-6, atol=1e-6)
    # and the XLA int8 path computes the same product
    np.testing.assert_allclose(np.asarray(y), np.asarray(int8_matmul(jnp.asarray(x), q, s)),
                               rtol=1e-5, atol=1e-5)


def test_rows_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((9, 64)), jnp.float32).at[2].mul(100.0)
    q, s = quantize_weight(jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    full = np.asarray(cpu_int8.int8_matmul_cpu(x, packed, colsum, s))
    for i in range(9):
        one = np.asarray(cpu_int8.int8_matmul_cpu(x[i:i + 1], packed, colsum, s))
        np.testing.assert_array_equal(one[0], full[i])


def test_zero_rows_and_leading_dims():
    q, s = quantize_weight(jnp.ones((8, 16), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    y = cpu_int8.int8_matmul_cpu(jnp.zeros((2, 3, 8), jnp.float32), packed, colsum, s)
    assert y.shape == (2, 3, 16) and not np.asarray(y).any()


def test_rejects_mismatched_weight():
    q, s = quantize_weight(jnp.ones((8, 16), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_int8.int8_matmul_cpu(jnp.ones((1, 12), jnp.float32), packed, colsum, s)
