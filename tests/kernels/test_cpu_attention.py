"""The C++ CPU attention kernel against the pure-jnp reference, on every path.

Random ragged batches over page sizes, GQA ratios, head dims (80 is not a
multiple of the kernel's 16 lanes), cache dtypes (float32, bfloat16 and the
engine's uint16 bfloat16 storage), sliding windows, soft caps, prefill longer
than the kernel's 16-query block, few sequences (work split by kv head) and
many (whole pages per item). Both sides accumulate in float32, so float32
agrees to 2e-5; bfloat16 outputs differ by at most their rounding.

Each comparison runs on every code path the CPU has by /proc/cpuinfo
(AVX-512, AVX2+FMA, portable), forced at run time: a path the library fails
to offer is a failure, not a skip. The reference and the compiled kernel are
built once per case and shared by the paths (the path is picked per call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.cpu import attention as cpu_attention
from pallas_kernels.cpu import testing as cpu_testing
from pallas_kernels.reference import BF16_STORAGE, ragged_paged_attention_ref, to_storage
from pallas_kernels.testing import make_attention_case

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="no C++ compiler to build the CPU kernel")

ISAS = cpu_testing.cpuinfo_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Forces one code path for the test (fails where the library lacks it)."""
    with cpu_testing.forced_isa(request.param) as path:
        yield path


@functools.lru_cache(maxsize=None)
def _prepared(q_lens, kv_lens, case_kw, window, cap, storage, traced_layer):
    """(case, args, jitted kernel, reference) for one case, built once."""
    case = make_attention_case(list(q_lens), list(kv_lens), **dict(case_kw))
    kc, vc = case.k_cache, case.v_cache
    if storage is not None:
        kc, vc = to_storage(kc, storage), to_storage(vc, storage)
    layer = jnp.int32(case.layer) if traced_layer else case.layer
    args = (case.q, kc, vc, layer, case.block_tables, case.seq_lens, case.query_start_loc)
    kw = dict(max_q_len=case.max_q_len, sm_scale=case.q.shape[-1] ** -0.5,
              sliding_window=window, soft_cap=cap)
    kernel = jax.jit(lambda *a: cpu_attention.ragged_paged_attention_cpu(*a, **kw))
    ref = np.asarray(ragged_paged_attention_ref(*args, **kw), np.float32)
    return case, args, kernel, ref


def _compare(q_lens, kv_lens, *, window=None, cap=None, storage=None, traced_layer=False,
             **case_kw):
    case, args, kernel, ref = _prepared(tuple(q_lens), tuple(kv_lens),
                                        tuple(sorted(case_kw.items())), window, cap, storage,
                                        traced_layer)
    out = kernel(*args)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    n = case.num_valid_tokens
    tol = 2e-5 if case.q.dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out[:n], np.float32), ref[:n], atol=tol, rtol=tol)
    assert not np.asarray(out[n:], np.float32).any(), "padding rows must be zero"
    return np.asarray(out, np.float32)


# (page_size, num_kv_heads, group, head_dim, dtype, window, cap)
CONFIGS = [
    (16, 3, 3, 64, jnp.float32, None, None),     # SmolLM2's heads
    (16, 2, 1, 80, jnp.float32, 7, None),         # head dim with a remainder
    (32, 1, 8, 128, jnp.float32, None, 30.0),
    (8, 4, 4, 256, jnp.bfloat16, 20, 5.0),
    (16, 2, 2, 64, jnp.bfloat16, None, None),
]


@pytest.mark.parametrize("ps,hkv,group,head_dim,dtype,window,cap", CONFIGS)
def test_mixed_ragged_batch(isa, ps, hkv, group, head_dim, dtype, window, cap):
    """Decode, a prefill of exactly a page, chunked prefill, decode deep in context."""
    _compare([1, ps, 5, 1, 37], [1, ps, ps + 1, 2 * ps + 3, 70], window=window, cap=cap,
             page_size=ps, num_kv_heads=hkv, group=group, head_dim=head_dim, dtype=dtype,
             pad_seqs=2)


def _random_batch(seed):
    rng = np.random.default_rng(seed)
    kv = rng.integers(1, 90, size=24)
    q = [int(rng.integers(1, k + 1)) if rng.random() < 0.3 else 1 for k in kv]
    window = int(rng.integers(5, 40)) if seed % 2 else None
    return q, [int(k) for k in kv], window


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(isa, seed):
    """Random lengths; 24 sequences so items take whole pages (all kv heads)."""
    q, kv, window = _random_batch(seed)
    _compare(q, kv, window=window, page_size=16, num_kv_heads=3, group=3, head_dim=64,
             seed=seed, pad_seqs=3)


def test_bf16_bits_storage_and_traced_layer(isa):
    """The engine's uint16 bfloat16 storage and a layer index passed as a tracer."""
    _compare([3, 1], [40, 17], storage=BF16_STORAGE, traced_layer=True, page_size=16,
             num_kv_heads=2, group=2, head_dim=64, dtype=jnp.bfloat16)


def test_long_prefill_many_query_blocks(isa):
    _compare([100], [130], window=33, page_size=16, num_kv_heads=1, group=4, head_dim=64,
             dtype=jnp.float32, pages_per_seq=10)


def test_paths_are_switched_at_run_time():
    """One compiled program, every path: each agrees with the reference, and
    the vector paths' float32 rounding differs from the portable loops' (so
    the switch really changes the code that runs)."""
    q, kv, _ = _random_batch(0)
    outs = {}
    for name in ISAS:
        with cpu_testing.forced_isa(name):
            outs[name] = _compare(q, kv, page_size=16, num_kv_heads=3, group=3, head_dim=64,
                                  seed=0, pad_seqs=3)
    for name in ISAS[:-1]:
        assert not np.array_equal(outs[name], outs["scalar"]), name


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
