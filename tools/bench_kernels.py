"""Microbenchmark of the paged-attention and KV-write kernels.

Reports achieved bandwidth — bytes of KV cache the kernel must read (attention)
or write (KV write) divided by the median wall time — against the device's
peak HBM bandwidth where known (see ``PEAK_BANDWIDTH``). Runs anywhere: on CPU
use ``--backend xla`` (the default ``auto`` resolves to it) with small shapes.

Example (the command behind BENCHMARKS.md's "Kernels" section)::

    python tools/bench_kernels.py --backend xla --num-seqs 8 --context-len 1024 \
        --q-len 1 --num-q-heads 9 --num-kv-heads 3 --head-dim 64 --page-size 16

``--cpu-isas`` times the C++ CPU kernels instead, once per forced code path
(``pallas_kernels/cpu/ffi.py``: ``all`` is every path this CPU runs): paged
attention over the batch above, then the W8A8 and weight-only int8 matmuls
of ``--int8-shapes``; e.g. SmolLM2's decode at 32 sequences::

    python tools/bench_kernels.py --cpu-isas all --num-seqs 32 --context-len 256 \
        --int8-shapes 32x576x1536,32x576x49152
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch

logger = logging.getLogger("bench_kernels")

# Peak HBM bandwidth in bytes/s by (lower-cased) device_kind substring.
PEAK_BANDWIDTH = {
    "h200": 4.8e12,
    "h100": 3.35e12,  # SXM
    "tpu v5 lite": 819e9,  # v5e
    "tpu v5e": 819e9,
    "tpu v5p": 2.76e12,
    "tpu v5": 2.76e12,
    "tpu v6 lite": 1.64e12,  # v6e
    "tpu v6e": 1.64e12,
}


def peak_bandwidth(device_kind: str) -> float | None:
    """Peak bytes/s for a ``jax.Device.device_kind``, or None when unknown (CPU)."""
    kind = device_kind.lower()
    for key, peak in PEAK_BANDWIDTH.items():
        if key in kind:
            return peak
    return None


def _time(fn, args, warmup: int, iters: int) -> float:
    """Median seconds per call of a compiled ``fn``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(a):
    """A decode/prefill batch: ``num_seqs`` sequences of ``context_len`` tokens,
    the last ``q_len`` of them new; pages shuffled over the cache."""
    dtype = jnp.dtype(a.dtype)
    pages_per_seq = -(-a.context_len // a.page_size)
    num_pages = 1 + a.num_seqs * pages_per_seq
    rng = np.random.default_rng(0)
    tables = rng.permutation(np.arange(1, num_pages)).reshape(a.num_seqs, pages_per_seq)
    num_tokens = a.num_seqs * a.q_len
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    shape = (a.num_layers, num_pages, a.page_size, a.num_kv_heads, a.head_dim)
    kv_new_shape = (num_tokens, a.num_kv_heads, a.head_dim)
    slots = (tables[:, -1:] * a.page_size + (np.arange(a.q_len) % a.page_size)).reshape(-1)
    return dict(
        q=jax.random.normal(keys[0], (num_tokens, a.num_q_heads, a.head_dim)).astype(dtype),
        k_cache=jax.random.normal(keys[1], shape).astype(dtype),
        v_cache=jax.random.normal(keys[2], shape).astype(dtype),
        k_new=jax.random.normal(keys[3], kv_new_shape).astype(dtype),
        v_new=jax.random.normal(keys[4], kv_new_shape).astype(dtype),
        block_tables=jnp.asarray(tables, jnp.int32),
        seq_lens=jnp.full((a.num_seqs,), a.context_len, jnp.int32),
        query_start_loc=jnp.arange(a.num_seqs + 1, dtype=jnp.int32) * a.q_len,
        slot_mapping=jnp.asarray(slots, jnp.int32),
    )


def run(a) -> list[dict]:
    """Times both kernels; returns one result row per kernel."""
    backend = dispatch.resolve_backend(a.backend)
    x = _inputs(a)
    itemsize = jnp.dtype(a.dtype).itemsize
    attn = jax.jit(lambda q, k, v, bt, sl, qsl: dispatch.ragged_paged_attention(
        q, k, v, jnp.int32(a.num_layers - 1), bt, sl, qsl, max_q_len=a.q_len,
        sm_scale=a.head_dim ** -0.5, backend=backend))
    write = jax.jit(lambda k, v, kn, vn, s: dispatch.write_kv(
        k, v, jnp.int32(a.num_layers - 1), kn, vn, s, backend=backend),
        donate_argnums=(0, 1))
    # Bytes the kernel must move: the K and V of every context token read,
    # or the new tokens' K and V written.
    kv_read = 2 * a.num_seqs * a.context_len * a.num_kv_heads * a.head_dim * itemsize
    kv_written = 2 * x["k_new"].size * itemsize
    t_attn = _time(attn, (x["q"], x["k_cache"], x["v_cache"], x["block_tables"],
                          x["seq_lens"], x["query_start_loc"]), a.warmup, a.iters)

    caches = [x["k_cache"], x["v_cache"]]

    def write_once(kn, vn, s):
        caches[:] = write(caches[0], caches[1], kn, vn, s)
        return caches[0]

    t_write = _time(write_once, (x["k_new"], x["v_new"], x["slot_mapping"]),
                    a.warmup, a.iters)
    device = jax.devices()[0]
    peak = peak_bandwidth(device.device_kind)
    rows = []
    for name, nbytes, secs in (("ragged_paged_attention", kv_read, t_attn),
                               ("write_kv", kv_written, t_write)):
        bw = nbytes / secs
        rows.append(dict(kernel=name, backend=backend, device=device.device_kind,
                         time_us=secs * 1e6, bytes=nbytes, gb_per_s=bw / 1e9,
                         peak_fraction=None if peak is None else bw / peak))
    return rows


def _int8_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"32x576x1536,1x576x49152"`` -> [(M, K, N), ...]."""
    shapes = []
    for part in text.split(","):
        dims = tuple(int(d) for d in part.lower().split("x"))
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError(f"int8 shape {part!r}: expected MxKxN")
        shapes.append(dims)
    return shapes


def run_cpu_isas(a) -> list[dict]:
    """Times the C++ CPU kernels on each forced path; one row per (kernel, path)."""
    from pallas_kernels.cpu import attention as cpu_attention
    from pallas_kernels.cpu import ffi
    from pallas_kernels.cpu import int8 as cpu_int8

    if not ffi.available():
        raise RuntimeError(f"the CPU kernels are unavailable: {ffi.build_error()}")
    names = ffi.supported_cpu_isas() if a.cpu_isas == "all" else a.cpu_isas.split(",")
    x = _inputs(a)
    attn = jax.jit(lambda q, k, v, bt, sl, qsl: cpu_attention.ragged_paged_attention_cpu(
        q, k, v, jnp.int32(a.num_layers - 1), bt, sl, qsl, max_q_len=a.q_len,
        sm_scale=a.head_dim ** -0.5))
    attn_args = (x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"],
                 x["query_start_loc"])
    w8a8, weight_only = jax.jit(cpu_int8.int8_matmul_cpu), jax.jit(cpu_int8.int8_weight_matmul_cpu)
    rng = np.random.default_rng(0)
    mats = []
    for m, k, n in _int8_shapes(a.int8_shapes):
        q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
        scale = jnp.asarray(rng.uniform(0.005, 0.02, n), jnp.float32)
        act = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        mats.append((f"{m}x{k}x{n}", (act, *cpu_int8.pack_int8_weight(q), scale),
                     (act, cpu_int8.pad_int8_weight(q), scale)))
    rows = []
    try:
        for name in names:
            path = ffi.set_cpu_isa(name)
            shape = f"{a.num_seqs}x{a.context_len} q{a.q_len} {a.dtype}"
            timings = [("paged_attention", shape, _time(attn, attn_args, a.warmup, a.iters))]
            for label, packed_args, padded_args in mats:
                timings.append(("int8_w8a8", label, _time(w8a8, packed_args, a.warmup, a.iters)))
                timings.append(("int8_weight_only", label,
                                _time(weight_only, padded_args, a.warmup, a.iters)))
            rows += [dict(kernel=kernel, isa=name, path=path, shape=shape_, time_us=secs * 1e6)
                     for kernel, shape_, secs in timings]
    finally:
        ffi.set_cpu_isa()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=dispatch.BACKENDS,
                   help="attention backend (auto: pallas on TPU/GPU, xla on CPU)")
    p.add_argument("--num-seqs", type=int, default=8, help="sequences in the batch")
    p.add_argument("--context-len", type=int, default=1024,
                   help="tokens of context per sequence (incl. the new ones)")
    p.add_argument("--q-len", type=int, default=1, help="new tokens per sequence (1 = decode)")
    p.add_argument("--num-q-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-layers", type=int, default=2,
                   help="layers in the stacked cache (the last one is read/written)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cpu-isas", default=None, metavar="NAMES",
                   help="time the C++ CPU kernels on these forced paths instead (comma "
                        "separated JAX_SERVE_CPU_ISA names, or 'all')")
    p.add_argument("--int8-shapes", default="32x576x1536,32x576x49152", metavar="MxKxN,...",
                   help="matmul shapes for --cpu-isas")
    a = p.parse_args(argv)
    if a.q_len > a.context_len:
        p.error("--q-len must not exceed --context-len")
    try:
        _int8_shapes(a.int8_shapes)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cpu_isas:
        logger.info("%-18s %-14s %-18s %-26s %10s", "kernel", "isa", "path", "shape", "time_us")
        for r in run_cpu_isas(a):
            logger.info("%-18s %-14s %-18s %-26s %10.1f", r["kernel"], r["isa"], r["path"],
                        r["shape"], r["time_us"])
        return
    logger.info("%-24s %-12s %-22s %10s %12s %10s %8s", "kernel", "backend", "device",
                "time_us", "bytes", "GB/s", "of_peak")
    for r in run(a):
        frac = "n/a" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"
        logger.info("%-24s %-12s %-22s %10.1f %12d %10.2f %8s", r["kernel"], r["backend"],
                    r["device"][:22], r["time_us"], r["bytes"], r["gb_per_s"], frac)


if __name__ == "__main__":
    main()
