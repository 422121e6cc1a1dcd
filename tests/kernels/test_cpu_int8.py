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
from flax import nnx

from model.quant import int8_matmul, quantize_weight
from pallas_kernels.cpu import int8 as cpu_int8

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


@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (3, 64, 16), (6, 72, 200), (10, 40, 96),
                                   (11, 72, 200), (33, 40, 96)])
def test_weight_only_equals_float_of_dequantized(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q, s = quantize_weight(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), axis=0)
    w = cpu_int8.pad_int8_weight(q)
    assert w.shape == (k, -(-n // 16) * 16)
    y = jax.jit(cpu_int8.int8_weight_matmul_cpu)(x, w, s)
    ref = np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_int8.int8_weight_matmul_cpu(x[:, :-1], w, s)


def test_packed_qwen2_with_qkv_bias_tracks_float(tmp_path):
    """Fused q|k|v (with Qwen2's biases) and gate|up through the kernels."""
    from model import api
    from model.attention import AttentionMetadata, KVCache
    from model.loader import load_model
    from model.quant import quantize_model
    from tests.model.tiny_hf import save_hf_model

    save_hf_model("qwen2", tmp_path)
    lm = load_model(str(tmp_path), dtype="float32")
    c = lm.config
    n, ps = 21, 16
    ids = jnp.asarray(np.random.default_rng(0).integers(3, c.vocab_size, n), jnp.int32)

    def logits(graphdef, state):
        kv = KVCache.zeros(c.num_layers, 3, ps, c.num_kv_heads, c.head_dim)
        md = AttentionMetadata(
            block_tables=jnp.array([[1, 2]], jnp.int32), seq_lens=jnp.array([n], jnp.int32),
            query_start_loc=jnp.array([0, n], jnp.int32),
            slot_mapping=jnp.arange(ps, ps + n, dtype=jnp.int32), max_q_len=n)
        h, _ = api.forward(graphdef, state, ids, jnp.arange(n, dtype=jnp.int32), kv, md)
        return np.asarray(api.compute_logits(graphdef, state, h))

    ref = logits(lm.graphdef, lm.state)
    gp, sp = quantize_model(lm.graphdef, lm.state, "w8a8_int8", packed=True)
    from model.quant import PackedInt8Linear, WeightOnlyInt8Linear

    layer = nnx.merge(gp, sp).layers[0]
    assert isinstance(layer.self_attn.qkv_proj, WeightOnlyInt8Linear)
    assert layer.self_attn.qkv_proj.bias is not None  # Qwen2's q|k|v biases, fused
    assert isinstance(layer.mlp.gate_up_proj, PackedInt8Linear)
    got = logits(gp, sp)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.99, cos
