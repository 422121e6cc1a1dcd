"""Backend selection for the paged-attention entry points.

Backends (the values of the server's ``--attention-backend`` flag):

* ``"auto"``: the platform of the default JAX backend picks — ``tpu`` ->
  ``"pallas_tpu"``, ``gpu``/``cuda``/``rocm`` -> ``"pallas_gpu"``, anything else
  (CPU) -> ``"cpu"`` where its kernel builds, else ``"xla"``.
* ``"xla"``: the pure-jnp reference (``reference.py``).
* ``"cpu"``: the C++ FFI kernel (``cpu/attention.py``), which reads KV pages
  in place; cache dtypes it does not take go to the reference. The KV write
  is the reference's in-place scatter.
* ``"pallas_tpu"`` / ``"pallas_gpu"``: the Pallas kernels, compiled for the
  device (Mosaic / Triton).
* ``"pallas_tpu_interpret"`` / ``"pallas_gpu_interpret"``: the same kernel
  bodies run in Pallas interpret mode, so the engine can exercise them on CPU.

The choice is made at trace time from the backend string alone, before any
kernel is built: compiler parameters are per platform, and a kernel built for
one cannot be lowered for another. On GPU the KV write stays an XLA scatter:
with the cache donated, XLA already emits one in-place, bandwidth-bound
scatter kernel, and a Triton kernel would need the same aliasing for no gain.
"""

from __future__ import annotations

import contextlib
import logging

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.reference import ragged_paged_attention_ref, write_kv_ref

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xla", "cpu", "pallas_tpu", "pallas_gpu",
            "pallas_tpu_interpret", "pallas_gpu_interpret")


def resolve_backend(backend: str = "auto") -> str:
    """Maps ``"auto"`` to the backend for the default JAX platform.

    Raises:
      ValueError: for a name not in ``BACKENDS``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    from pallas_kernels.cpu import attention as cpu_attention
    return "cpu" if cpu_attention.available() else "xla"


def _tpu_context(backend: str):
    # Interpret mode for the TPU kernels is a context around the call (it also
    # simulates DMAs and semaphores), not a pallas_call argument.
    return pltpu.force_tpu_interpret_mode() if backend == "pallas_tpu_interpret" \
        else contextlib.nullcontext()


def ragged_paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens,
                           query_start_loc, *, max_q_len, sm_scale,
                           sliding_window=None, soft_cap=None, backend="auto"):
    """Causal ragged paged attention; see ``reference.ragged_paged_attention_ref``.

    Args:
      q: [num_tokens, num_q_heads, head_dim].
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      layer: layer of the stacked cache to read.
      block_tables: [num_seqs, pages_per_seq] int32.
      seq_lens: [num_seqs] int32.
      query_start_loc: [num_seqs + 1] int32.
      max_q_len, sm_scale, sliding_window, soft_cap: see the reference.
      backend: one of ``BACKENDS``.

    Returns:
      [num_tokens, num_q_heads, head_dim] in q's dtype.
    """
    backend = resolve_backend(backend)
    kwargs = dict(max_q_len=max_q_len, sm_scale=sm_scale,
                  sliding_window=sliding_window, soft_cap=soft_cap)
    args = (q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc)
    if backend == "cpu":
        from pallas_kernels.cpu import attention as cpu_attention
        if cpu_attention.supports(q, k_cache):
            return cpu_attention.ragged_paged_attention_cpu(*args, **kwargs)
        backend = "xla"
    if backend == "xla":
        return ragged_paged_attention_ref(*args, **kwargs)
    if backend.startswith("pallas_tpu"):
        from pallas_kernels.tpu_attention import ragged_paged_attention_tpu
        with _tpu_context(backend):
            return ragged_paged_attention_tpu(*args, **kwargs)
    from pallas_kernels.gpu_attention import ragged_paged_attention_gpu
    return ragged_paged_attention_gpu(
        *args, **kwargs, interpret=backend == "pallas_gpu_interpret")


def write_kv(k_cache, v_cache, layer, k_new, v_new, slot_mapping, *, backend="auto"):
    """Scatters new K/V into the cache; see ``reference.write_kv_ref``.

    Args:
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      layer: layer to write.
      k_new, v_new: [num_tokens, num_kv_heads, head_dim].
      slot_mapping: [num_tokens] int32 flat slots.
      backend: one of ``BACKENDS``; the GPU backends use the XLA scatter.

    Returns:
      The updated ``(k_cache, v_cache)``.
    """
    backend = resolve_backend(backend)
    if backend.startswith("pallas_tpu"):
        from pallas_kernels.tpu_write_kv import write_kv_tpu
        with _tpu_context(backend):
            return write_kv_tpu(k_cache, v_cache, layer, k_new, v_new, slot_mapping)
    return write_kv_ref(k_cache, v_cache, layer, k_new, v_new, slot_mapping)
