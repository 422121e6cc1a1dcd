"""Pallas attention kernels (interpret mode) against the pure-jnp reference.

Every case runs both kernel bodies on CPU: the TPU kernel under
``pltpu.force_tpu_interpret_mode()`` (simulated HBM/VMEM/DMA/semaphores) and
the Triton-style GPU kernel with ``interpret=True``. The cases cover page sizes
16/32, GQA ratios 1/3/4/8, head dims 64/128/256, float32/bfloat16, ragged
lengths (1, exactly a page, a page plus one, several pages), mixed
prefill + chunked-prefill + decode batches with padding sequences and padding
tokens, sliding window and soft-cap — a covering set, not the full product.

``JAX_SERVE_GPU_TESTS=1`` adds the GPU kernel compiled for the device (Triton,
``interpret=False``) to the same cases, as kernel ``gpu_compiled`` and backend
``pallas_gpu_compiled``; they skip unless ``jax.default_backend() == "gpu"``.
Select them with ``-k gpu_compiled`` (``tools/device_check.sh`` does).

Tolerances (max abs error over valid rows, outputs ~N(0, 1/len)):
* float32: 2e-5 abs + 2e-5 rel — both sides accumulate in float32.
* bfloat16: 3e-2 abs + 3e-2 rel — the kernels feed bf16 probabilities to the
  P·V matmul (as on the MXU / tensor cores) and round the output to bf16.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch
from pallas_kernels.common import q_block_seq_ranges
from pallas_kernels.gpu_attention import ragged_paged_attention_gpu
from pallas_kernels.reference import ragged_paged_attention_ref
from pallas_kernels.testing import make_attention_case
from pallas_kernels.tpu_attention import ragged_paged_attention_tpu

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _run_tpu(*args, **kw):
    with pltpu.force_tpu_interpret_mode():
        return ragged_paged_attention_tpu(*args, **kw)


def _run_gpu(*args, **kw):
    return ragged_paged_attention_gpu(*args, **kw, interpret=True)


def _run_gpu_compiled(*args, **kw):
    return ragged_paged_attention_gpu(*args, **kw, interpret=False)


KERNELS = {"tpu": _run_tpu, "gpu": _run_gpu, "gpu_compiled": _run_gpu_compiled}
GPU_TESTS = os.environ.get("JAX_SERVE_GPU_TESTS") == "1"
_ON_GPU = pytest.mark.skipif(
    not GPU_TESTS or jax.default_backend() != "gpu",
    reason="JAX_SERVE_GPU_TESTS=1 needs a GPU as the default JAX backend")
KERNEL_NAMES = ["tpu", "gpu"] + (
    [pytest.param("gpu_compiled", marks=_ON_GPU)] if GPU_TESTS else [])


def _mixed_lens(ps):
    """Decode at len 1, full prefill of exactly a page, chunked prefill into
    page+1, decode at 2 pages + 3."""
    return [1, ps, 5, 1], [1, ps, ps + 1, 2 * ps + 3]


def _check(kernel, case, dtype, *, sliding_window=None, soft_cap=None, **tiles):
    c = case
    args = (c.q, c.k_cache, c.v_cache, c.layer, c.block_tables, c.seq_lens,
            c.query_start_loc)
    kw = dict(max_q_len=c.max_q_len, sm_scale=c.q.shape[-1] ** -0.5,
              sliding_window=sliding_window, soft_cap=soft_cap)
    ref = ragged_paged_attention_ref(*args, **kw)
    out = KERNELS[kernel](*args, **kw, **tiles)
    assert out.shape == c.q.shape and out.dtype == c.q.dtype
    n = c.num_valid_tokens
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out[:n], np.float32),
                               np.asarray(ref[:n], np.float32), atol=tol, rtol=tol)


# (page_size, group, head_dim, dtype, sliding_window, soft_cap)
FAST = [
    (16, 1, 64, jnp.float32, None, None),
    (32, 3, 128, jnp.bfloat16, 20, 30.0),
    (16, 4, 64, jnp.bfloat16, None, 5.0),
]
SLOW = [
    (16, 8, 128, jnp.float32, 7, None),
    (32, 4, 256, jnp.float32, None, None),
    (16, 3, 256, jnp.bfloat16, 17, 20.0),
    (32, 8, 64, jnp.float32, None, 10.0),
]


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("ps,group,head_dim,dtype,window,cap", FAST)
def test_mixed_batch(kernel, ps, group, head_dim, dtype, window, cap):
    q_lens, kv_lens = _mixed_lens(ps)
    case = make_attention_case(q_lens, kv_lens, page_size=ps, num_kv_heads=2,
                               group=group, head_dim=head_dim, dtype=dtype)
    _check(kernel, case, dtype, sliding_window=window, soft_cap=cap,
           queries_per_block=8, pages_per_block=2)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("ps,group,head_dim,dtype,window,cap", SLOW)
def test_mixed_batch_more_configs(kernel, ps, group, head_dim, dtype, window, cap):
    q_lens, kv_lens = _mixed_lens(ps)
    case = make_attention_case(q_lens, kv_lens, page_size=ps, num_kv_heads=1,
                               group=group, head_dim=head_dim, dtype=dtype, seed=1)
    _check(kernel, case, dtype, sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_decode_only_default_tiling(kernel):
    """SmolLM2-like heads (9 q / 3 kv), decode batch, default tiles."""
    case = make_attention_case([1, 1, 1], [1, 16, 17], page_size=16, num_kv_heads=3,
                               group=3, head_dim=64, dtype=jnp.bfloat16, pad_seqs=2)
    _check(kernel, case, jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_long_prefill_small_tiles(kernel):
    """A prefill longer than a query block, pages_per_block not dividing the table."""
    case = make_attention_case([19, 1], [19, 40], page_size=16, num_kv_heads=2,
                               group=1, head_dim=64, dtype=jnp.float32, pages_per_seq=5)
    _check(kernel, case, jnp.float32, sliding_window=9, queries_per_block=8,
           pages_per_block=2)


@pytest.mark.parametrize("backend", ["xla", "pallas_tpu_interpret", "pallas_gpu_interpret"] + (
    [pytest.param("pallas_gpu", id="pallas_gpu_compiled", marks=_ON_GPU)] if GPU_TESTS else []))
def test_dispatch_under_jit(backend):
    case = make_attention_case([3, 1], [18, 16], page_size=16, num_kv_heads=2, group=2,
                               head_dim=64)

    @functools.partial(jax.jit, static_argnames="backend")
    def step(q, k, v, bt, sl, qsl, *, backend):
        return dispatch.ragged_paged_attention(
            q, k, v, jnp.int32(1), bt, sl, qsl, max_q_len=3, sm_scale=0.125,
            backend=backend)

    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
            case.query_start_loc)
    out = step(*args, backend=backend)
    ref = step(*args, backend="xla")
    n = case.num_valid_tokens
    np.testing.assert_allclose(out[:n], ref[:n], atol=2e-5, rtol=2e-5)


def test_resolve_backend():
    assert dispatch.resolve_backend("auto") in ("cpu", "xla")  # CPU here (xla: no compiler)
    assert dispatch.resolve_backend("pallas_gpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="unknown attention backend"):
        dispatch.resolve_backend("flash")


@pytest.mark.parametrize("fn", [ragged_paged_attention_tpu, ragged_paged_attention_gpu])
def test_wrappers_reject_bad_shapes(fn):
    case = make_attention_case([1], [4], page_size=16, num_kv_heads=2, group=2, head_dim=64)
    kw = dict(max_q_len=1, sm_scale=1.0)
    with pytest.raises(ValueError, match=r"\(4, 3, 64\)"):
        fn(case.q[:, :3], case.k_cache, case.v_cache, 0, case.block_tables,
           case.seq_lens, case.query_start_loc, **kw)
    with pytest.raises(ValueError, match="seq_lens"):
        fn(case.q, case.k_cache, case.v_cache, 0, case.block_tables,
           case.seq_lens[:1], case.query_start_loc, **kw)


def test_q_block_seq_ranges():
    qsl = jnp.array([0, 3, 3, 12, 13, 13], jnp.int32)  # seq 1 and 4 empty
    got = np.asarray(q_block_seq_ranges(qsl, num_q_blocks=3, queries_per_block=8))
    # Block 0: tokens 0-7 -> seqs 0..2; block 1: tokens 8-12 -> seqs 2..3;
    # block 2: padding only -> empty range.
    assert got[0].tolist() == [0, 2]
    assert got[1].tolist() == [2, 3]
    assert got[2][1] < got[2][0]


@pytest.mark.slow
def test_jax_rpa_fails_in_interpret_mode():
    """Why we ship our own TPU kernel: jax 0.10.2's ragged_paged_attention loads
    through a reshaped ref, which TPU interpret mode cannot index. Fails loudly
    (strict) once jax fixes it, so the choice can be revisited."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ragged_paged_attention as jax_rpa)
    q = jnp.ones((8, 8, 128), jnp.float32)
    kv = jnp.ones((8, 16, 4, 128), jnp.float32)  # [pages, page, 2 * Hkv, D]
    with pytest.raises(Exception, match="ReshapeTransform"):
        with pltpu.force_tpu_interpret_mode():
            jax.block_until_ready(jax_rpa(
                q, kv, jnp.array([8, 0], jnp.int32), jnp.array([[1, 2], [0, 0]], jnp.int32),
                jnp.array([0, 8, 8], jnp.int32), jnp.array([1], jnp.int32),
                num_kv_pages_per_block=1, num_queries_per_block=8))
