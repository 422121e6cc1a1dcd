"""Backend selection for the paged-attention entry points."""

from __future__ import annotations

import jax

from pallas_kernels.reference import ragged_paged_attention_ref, write_kv_ref

BACKENDS = ("auto", "xla")


def resolve_backend(backend: str = "auto") -> str:
    """Maps ``"auto"`` to the backend for the default JAX platform."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "xla"
    return backend


def ragged_paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens,
                           query_start_loc, *, max_q_len, sm_scale,
                           sliding_window=None, soft_cap=None, backend="auto"):
    """See ``reference.ragged_paged_attention_ref`` for shapes and semantics."""
    resolve_backend(backend)
    return ragged_paged_attention_ref(
        q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc,
        max_q_len=max_q_len, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap)


def write_kv(k_cache, v_cache, layer, k_new, v_new, slot_mapping, *, backend="auto"):
    """See ``reference.write_kv_ref`` for shapes and semantics."""
    resolve_backend(backend)
    return write_kv_ref(k_cache, v_cache, layer, k_new, v_new, slot_mapping)
