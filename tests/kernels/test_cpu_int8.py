"""The C++ CPU int8 matmul kernels against an exact integer emulation, on every path.

The W8A8 kernel quantizes activations per row and runs the int8 product
(AVX-512 VNNI or VPMADDUBSW, AVX2 with AVX-VNNI or VPMADDUBSW, portable
loops); the integer part is exact, so it must equal numpy's int64 product of
the same quantized operands, with the same float epilogue, and every path
must give the same bits. Shapes include K not a multiple of 4 and N not a
multiple of 16 (packing pads both; 40, 72 and 100 end inside a block's
halves), and row counts around the row tiles (4 and 6 rows).

Each comparison runs on every path the CPU has by /proc/cpuinfo, VNNI and
not, forced at run time: a path the library fails to offer is a failure, not
a skip. References are computed once per shape and shared by the paths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.quant import int8_matmul, quantize_weight
from pallas_kernels.cpu import int8 as cpu_int8
from pallas_kernels.cpu import testing as cpu_testing

pytestmark = pytest.mark.skipif(not cpu_int8.available(),
                                reason="no C++ compiler to build the CPU kernels")

ISAS = cpu_testing.cpuinfo_isas(vnni_variants=True)
_int8_matmul = jax.jit(cpu_int8.int8_matmul_cpu)
_weight_matmul = jax.jit(cpu_int8.int8_weight_matmul_cpu)


@pytest.fixture(params=ISAS)
def isa(request):
    """Forces one code path for the test (fails where the library lacks it)."""
    with cpu_testing.forced_isa(request.param) as path:
        yield path


def _emulate(x, q, scale):
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1, keepdims=True)
    xs = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    xq = np.clip(np.round(x / xs), -127, 127).astype(np.int64)
    acc = xq @ np.asarray(q, np.int64)
    return (acc.astype(np.float32) * xs) * np.asarray(scale, np.float32)[None, :]


@functools.lru_cache(maxsize=None)
def _w8a8_case(m, k, n):
    """(x, q, s, packed, colsum, emulation, XLA int8 path) for one shape."""
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, : k // 2] *= 30.0  # a row with outlier channels
    q, s = quantize_weight(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    xla = np.asarray(int8_matmul(jnp.asarray(x), q, s))
    return jnp.asarray(x), q, s, packed, colsum, _emulate(x, q, s), xla


W8A8_SHAPES = [(1, 96, 40), (2, 70, 64), (3, 128, 100), (4, 64, 16), (5, 36, 200),
               (7, 72, 72), (33, 96, 72)]


@pytest.mark.parametrize("m,k,n", W8A8_SHAPES)
def test_equals_integer_emulation(isa, m, k, n):
    x, q, s, packed, colsum, emulated, xla = _w8a8_case(m, k, n)
    assert packed.shape == (-(-n // 16), -(-k // 4), 64) and colsum.shape == (-(-n // 16) * 16,)
    y = _int8_matmul(x, packed, colsum, s)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), emulated, rtol=1e-6, atol=1e-6)
    # and the XLA int8 path computes the same product
    np.testing.assert_allclose(np.asarray(y), xla, rtol=1e-5, atol=1e-5)


def test_every_path_gives_the_same_bits():
    """Exact integers and one float epilogue: the paths agree bit for bit,
    weights of -128 included (|w| = 128 in VPMADDUBSW's unsigned operand)."""
    rng = np.random.default_rng(7)
    m, k, n = 13, 200, 120
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).at[3].mul(50.0)
    q = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8).at[:8].set(-128)
    s = jnp.asarray(rng.uniform(0.01, 0.02, n), jnp.float32)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    emulated = _emulate(x, q, s)
    outs = {}
    for name in ISAS:
        with cpu_testing.forced_isa(name):
            outs[name] = np.asarray(_int8_matmul(x, packed, colsum, s))
        np.testing.assert_allclose(outs[name], emulated, rtol=1e-6, atol=1e-6, err_msg=name)
    for name in ISAS:
        np.testing.assert_array_equal(outs[name], outs[ISAS[0]], err_msg=name)


def test_rows_do_not_depend_on_the_batch(isa):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((9, 64)), jnp.float32).at[2].mul(100.0)
    q, s = quantize_weight(jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    full = np.asarray(_int8_matmul(x, packed, colsum, s))
    for i in range(9):
        one = np.asarray(_int8_matmul(x[i:i + 1], packed, colsum, s))
        np.testing.assert_array_equal(one[0], full[i])


def test_zero_rows_and_leading_dims(isa):
    q, s = quantize_weight(jnp.ones((8, 16), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    y = cpu_int8.int8_matmul_cpu(jnp.zeros((2, 3, 8), jnp.float32), packed, colsum, s)
    assert y.shape == (2, 3, 16) and not np.asarray(y).any()


def test_rejects_mismatched_weight():
    q, s = quantize_weight(jnp.ones((8, 16), jnp.float32), axis=0)
    packed, colsum = cpu_int8.pack_int8_weight(q)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_int8.int8_matmul_cpu(jnp.ones((1, 12), jnp.float32), packed, colsum, s)


@functools.lru_cache(maxsize=None)
def _weight_only_case(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q, s = quantize_weight(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), axis=0)
    ref = np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64))
    return x, q, s, cpu_int8.pad_int8_weight(q), ref


@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (3, 64, 16), (6, 72, 200), (10, 40, 96),
                                   (11, 72, 200), (33, 40, 96)])
def test_weight_only_equals_float_of_dequantized(isa, m, k, n):
    x, q, s, w, ref = _weight_only_case(m, k, n)
    assert w.shape == (k, -(-n // 16) * 16)
    y = _weight_matmul(x, w, s)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_int8.int8_weight_matmul_cpu(x[:, :-1], w, s)


def test_weight_only_with_a_page_sized_row_stride(isa):
    """Np a multiple of 2 KiB (rows alias in the caches; the kernel copies a
    tile's columns first) and more rows than one row tile."""
    x, q, s, w, ref = _weight_only_case(9, 24, 4096)
    np.testing.assert_allclose(np.asarray(_weight_matmul(x, w, s)), ref, rtol=1e-4, atol=1e-4)


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


def test_stacked_weights_are_read_in_place_at_the_layer(isa):
    """A stack of weights plus a (traced) layer index equals that layer's own weights."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 40)), jnp.float32)
    qs = [quantize_weight(jnp.asarray(rng.standard_normal((40, 24)), jnp.float32), axis=0)
          for _ in range(3)]
    packs = [cpu_int8.pack_int8_weight(q) for q, _ in qs]
    packed = jnp.stack([p for p, _ in packs])
    colsum = jnp.stack([c for _, c in packs])
    scale = jnp.stack([s for _, s in qs])
    padded = jnp.stack([cpu_int8.pad_int8_weight(q) for q, _ in qs])
    w8a8 = jax.jit(lambda i: cpu_int8.int8_matmul_cpu(x, packed, colsum, scale, layer=i))
    wo = jax.jit(lambda i: cpu_int8.int8_weight_matmul_cpu(x, padded, scale, layer=i))
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(w8a8(i)), np.asarray(
            cpu_int8.int8_matmul_cpu(x, packs[i][0], packs[i][1], qs[i][1])))
        np.testing.assert_array_equal(np.asarray(wo(i)), np.asarray(
            cpu_int8.int8_weight_matmul_cpu(x, padded[i], qs[i][1])))
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(w8a8(3))
