"""Ragged paged attention on the CPU through a C++ XLA FFI kernel.

The kernel (``csrc/paged_attention_cpu.cc``) reads KV pages in place; the
pure-jnp reference gathers them first, which XLA on the CPU runs as an element
loop followed by tiny batched matmuls (see the kernel's header for numbers).

The shared library is compiled on first use with the machine's C++ compiler
(``-O3 -march=native``) into ``~/.cache/jax-serve/kernels`` (override with
``JAX_SERVE_KERNEL_CACHE``), keyed by the source, the flags, jaxlib's version
and the CPU, and loaded from there afterwards. Where no compiler works,
``available()`` is False and the ``auto`` backend falls back to the reference.
``JAX_SERVE_CPU_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pallas_kernels.common import validate_attention_inputs

logger = logging.getLogger(__name__)

TARGET = "jax_serve_paged_attention_cpu"
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "paged_attention_cpu.cc"
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
_CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint16))


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _library_path() -> pathlib.Path:
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), jaxlib.__version__.encode(),
                 platform.machine().encode(), _cpu_signature().encode()):
        key.update(part)
    root = os.environ.get("JAX_SERVE_KERNEL_CACHE") or os.path.expanduser(
        "~/.cache/jax-serve/kernels")
    return pathlib.Path(root) / f"paged_attention_cpu-{key.hexdigest()[:16]}.so"


def _compile(out: pathlib.Path) -> None:
    compiler = os.environ.get("CXX", "g++")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent first uses never load
    # a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def available() -> bool:
    """Builds (once per machine) and registers the kernel; False if that fails."""
    if os.environ.get("JAX_SERVE_CPU_KERNELS", "1") == "0":
        return False
    path = _library_path()
    try:
        if not path.exists():
            _compile(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PagedAttentionCpu),
                                    platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU attention kernel unavailable, using the XLA reference: %s", detail)
        return False
    return True


def supports(q, k_cache) -> bool:
    """Whether the kernel takes these dtypes (q any float; cache f32 or bf16 bits)."""
    return jnp.dtype(k_cache.dtype) in _CACHE_DTYPES and jnp.issubdtype(q.dtype, jnp.floating)


def ragged_paged_attention_cpu(q, k_cache, v_cache, layer, block_tables, seq_lens,
                               query_start_loc, *, max_q_len, sm_scale,
                               sliding_window=None, soft_cap=None):
    """Causal ragged paged attention; same contract as the reference.

    Args:
      q: [num_tokens, num_q_heads, head_dim] (computed in float32).
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim]
        float32, bfloat16 or uint16 (bfloat16 bits).
      layer: int or int32 scalar; the layer to read.
      block_tables: [num_seqs, pages_per_seq] int32.
      seq_lens: [num_seqs] int32.
      query_start_loc: [num_seqs + 1] int32.
      max_q_len: static bound on query lengths (validated; the kernel reads
        the real lengths from ``query_start_loc``).
      sm_scale, sliding_window, soft_cap: as in the reference.

    Returns:
      [num_tokens, num_q_heads, head_dim] in q's dtype; padding rows are zero.
    """
    validate_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                              max_q_len=max_q_len, sliding_window=sliding_window,
                              soft_cap=soft_cap)
    if not available():
        raise RuntimeError("the CPU attention kernel could not be built; see the log")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_cache, v_cache, jnp.asarray(layer, jnp.int32),
               block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32),
               query_start_loc.astype(jnp.int32),
               sm_scale=np.float32(sm_scale), sliding_window=np.int64(sliding_window or 0),
               soft_cap=np.float32(soft_cap or 0.0))
    return out.astype(q.dtype)
