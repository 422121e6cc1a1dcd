"""KV-cache write: the TPU DMA kernel (interpret mode) and dispatch vs the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch
from pallas_kernels.reference import write_kv_ref
from pallas_kernels.tpu_write_kv import write_kv_tpu


def _inputs(dtype, page_size=16, num_kv_heads=3, head_dim=64):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (2, 6, page_size, num_kv_heads, head_dim)  # [L, P, ps, Hkv, D]
    k = jax.random.normal(keys[0], shape).astype(dtype)
    v = jax.random.normal(keys[1], shape).astype(dtype)
    # Decode slots, a run across a page boundary, two padding tokens -> page 0.
    slots = jnp.array([page_size + 1, 2 * page_size - 1, 2 * page_size, 5 * page_size + 3,
                       0, 0], jnp.int32)
    k_new = jax.random.normal(keys[2], (slots.shape[0], num_kv_heads, head_dim)).astype(dtype)
    v_new = jax.random.normal(keys[3], k_new.shape).astype(dtype)
    return k, v, k_new, v_new, slots


def _assert_same_outside_scratch(got, want):
    # Page 0 is scratch: padding tokens race there, its contents are unspecified.
    np.testing.assert_array_equal(np.asarray(got[:, 1:], np.float32),
                                  np.asarray(want[:, 1:], np.float32))


@pytest.mark.parametrize("dtype,page_size", [(jnp.float32, 16), (jnp.bfloat16, 32)])
def test_tpu_write_matches_reference(dtype, page_size):
    k, v, k_new, v_new, slots = _inputs(dtype, page_size)
    want = write_kv_ref(k, v, 1, k_new, v_new, slots)
    with pltpu.force_tpu_interpret_mode():
        got = write_kv_tpu(k, v, 1, k_new, v_new, slots)
    for g, w in zip(got, want):
        _assert_same_outside_scratch(g, w)
    # Layer 0 untouched.
    np.testing.assert_array_equal(np.asarray(got[0][0], np.float32), np.asarray(k[0], np.float32))


@pytest.mark.parametrize("backend", ["xla", "pallas_tpu_interpret", "pallas_gpu_interpret"])
def test_dispatch_write_under_jit_with_donation(backend):
    k, v, k_new, v_new, slots = _inputs(jnp.float32)
    want = write_kv_ref(k, v, 0, k_new, v_new, slots)
    step = jax.jit(lambda k, v, kn, vn, s: dispatch.write_kv(
        k, v, jnp.int32(0), kn, vn, s, backend=backend), donate_argnums=(0, 1))
    got = step(k, v, k_new, v_new, slots)
    for g, w in zip(got, want):
        _assert_same_outside_scratch(g, w)


def test_write_rejects_bad_shapes():
    k, v, k_new, v_new, slots = _inputs(jnp.float32)
    with pytest.raises(ValueError, match=r"slot_mapping \(5,\)"):
        write_kv_tpu(k, v, 0, k_new, v_new, slots[:5])
    with pytest.raises(ValueError, match=r"\(6, 2, 64\)"):
        write_kv_tpu(k, v, 0, k_new[:, :2], v_new[:, :2], slots)
