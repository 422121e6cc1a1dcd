"""The C++ CPU attention kernel against the pure-jnp reference.

Random ragged batches over page sizes, GQA ratios, head dims (80 is not a
multiple of the kernel's 16 lanes), cache dtypes (float32, bfloat16 and the
engine's uint16 bfloat16 storage), sliding windows, soft caps, prefill longer
than the kernel's 16-query block, few sequences (work split by kv head) and
many (whole pages per item). Both sides accumulate in float32, so float32
agrees to 2e-5; bfloat16 outputs differ by at most their rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.cpu import attention as cpu_attention
from pallas_kernels.reference import BF16_STORAGE, ragged_paged_attention_ref, to_storage
from pallas_kernels.testing import make_attention_case

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="no C++ compiler to build the CPU kernel")


def _compare(case, *, window=None, cap=None, storage=None, layer=None):
    kc, vc = case.k_cache, case.v_cache
    if storage is not None:
        kc, vc = to_storage(kc, storage), to_storage(vc, storage)
    layer = case.layer if layer is None else layer
    args = (case.q, kc, vc, layer, case.block_tables, case.seq_lens, case.query_start_loc)
    kw = dict(max_q_len=case.max_q_len, sm_scale=case.q.shape[-1] ** -0.5,
              sliding_window=window, soft_cap=cap)
    out = jax.jit(lambda *a: cpu_attention.ragged_paged_attention_cpu(*a, **kw))(*args)
    ref = ragged_paged_attention_ref(*args, **kw)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    n = case.num_valid_tokens
    tol = 2e-5 if case.q.dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out[:n], np.float32), np.asarray(ref[:n], np.float32),
                               atol=tol, rtol=tol)
    assert not np.asarray(out[n:], np.float32).any(), "padding rows must be zero"


# (page_size, num_kv_heads, group, head_dim, dtype, window, cap)
CONFIGS = [
    (16, 3, 3, 64, jnp.float32, None, None),     # SmolLM2's heads
    (16, 2, 1, 80, jnp.float32, 7, None),         # head dim with a remainder
    (32, 1, 8, 128, jnp.float32, None, 30.0),
    (8, 4, 4, 256, jnp.bfloat16, 20, 5.0),
    (16, 2, 2, 64, jnp.bfloat16, None, None),
]


@pytest.mark.parametrize("ps,hkv,group,head_dim,dtype,window,cap", CONFIGS)
def test_mixed_ragged_batch(ps, hkv, group, head_dim, dtype, window, cap):
    """Decode, a prefill of exactly a page, chunked prefill, decode deep in context."""
    case = make_attention_case([1, ps, 5, 1, 37], [1, ps, ps + 1, 2 * ps + 3, 70],
                               page_size=ps, num_kv_heads=hkv, group=group,
                               head_dim=head_dim, dtype=dtype, pad_seqs=2)
    _compare(case, window=window, cap=cap)


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(seed):
    """Random lengths; 24 sequences so items take whole pages (all kv heads)."""
    rng = np.random.default_rng(seed)
    kv = rng.integers(1, 90, size=24)
    q = [int(rng.integers(1, k + 1)) if rng.random() < 0.3 else 1 for k in kv]
    case = make_attention_case(q, [int(k) for k in kv], page_size=16, num_kv_heads=3,
                               group=3, head_dim=64, seed=seed, pad_seqs=3)
    _compare(case, window=int(rng.integers(5, 40)) if seed % 2 else None)


def test_bf16_bits_storage_and_traced_layer():
    """The engine's uint16 bfloat16 storage and a layer index passed as a tracer."""
    case = make_attention_case([3, 1], [40, 17], page_size=16, num_kv_heads=2, group=2,
                               head_dim=64, dtype=jnp.bfloat16)
    _compare(case, storage=BF16_STORAGE, layer=jnp.int32(case.layer))


def test_long_prefill_many_query_blocks():
    case = make_attention_case([100], [130], page_size=16, num_kv_heads=1, group=4,
                               head_dim=64, dtype=jnp.float32, pages_per_seq=10)
    _compare(case, window=33)


def test_dispatch_routes_cpu_backend():
    assert dispatch.resolve_backend("auto") == "cpu"
    case = make_attention_case([2, 1], [18, 9], page_size=16, num_kv_heads=2, group=2)
    args = (case.q, case.k_cache, case.v_cache, 1, case.block_tables, case.seq_lens,
            case.query_start_loc)
    lowered = jax.jit(lambda *a: dispatch.ragged_paged_attention(
        *a[:3], 1, *a[4:], max_q_len=2, sm_scale=0.125, backend="cpu")).lower(*args)
    assert cpu_attention.TARGET in lowered.as_text()
    # A cache dtype the kernel does not take goes to the reference.
    f16 = case.k_cache.astype(jnp.float16)
    out = dispatch.ragged_paged_attention(case.q, f16, f16, 1, *args[4:], max_q_len=2,
                                          sm_scale=0.125, backend="cpu")
    assert out.shape == case.q.shape


def test_rejects_bad_shapes():
    case = make_attention_case([1], [4], page_size=16, num_kv_heads=2, group=2)
    with pytest.raises(ValueError, match="seq_lens"):
        cpu_attention.ragged_paged_attention_cpu(
            case.q, case.k_cache, case.v_cache, 0, case.block_tables, case.seq_lens[:1],
            case.query_start_loc, max_q_len=1, sm_scale=1.0)


def test_layer_out_of_range_is_an_error():
    case = make_attention_case([1], [4], page_size=16, num_kv_heads=2, group=2)
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(cpu_attention.ragged_paged_attention_cpu(
            case.q, case.k_cache, case.v_cache, jnp.int32(7), case.block_tables,
            case.seq_lens, case.query_start_loc, max_q_len=1, sm_scale=1.0))
