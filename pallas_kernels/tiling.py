"""Default tile sizes for the Pallas attention kernels.

Tables are keyed by ``(head_dim, page_size, dtype_name)``; lookups fall back to
the nearest sensible default. Values are starting points chosen from the
kernels' VMEM / shared-memory footprint, not yet tuned on hardware (no
accelerator was available when they were written): re-tune with
``tools/bench_kernels.py`` on the target device.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes of one attention kernel launch.

    Attributes:
      queries_per_block: query tokens per grid step (rows = this * q heads per kv head).
      pages_per_block: KV pages fetched and reduced per online-softmax step.
      num_warps: Triton warps (GPU only).
      num_stages: Triton software-pipelining stages (GPU only).
    """

    queries_per_block: int
    pages_per_block: int
    num_warps: int = 4
    num_stages: int = 2


# (head_dim, page_size, dtype) -> Tiling. TPU: K/V tiles of
# pages_per_block * page_size rows x head_dim, double-buffered in VMEM.
_TPU_TABLE = {
    (64, 16, "bfloat16"): Tiling(32, 8),
    (64, 32, "bfloat16"): Tiling(32, 4),
    (128, 16, "bfloat16"): Tiling(32, 8),
    (128, 32, "bfloat16"): Tiling(32, 4),
    (256, 16, "bfloat16"): Tiling(16, 4),
    (256, 32, "bfloat16"): Tiling(16, 2),
    (64, 16, "float32"): Tiling(16, 8),
    (64, 32, "float32"): Tiling(16, 4),
    (128, 16, "float32"): Tiling(16, 4),
    (128, 32, "float32"): Tiling(16, 2),
    (256, 16, "float32"): Tiling(8, 4),
    (256, 32, "float32"): Tiling(8, 2),
}

# GPU (Triton): tiles live in registers/shared memory; keep
# rows * head_dim and keys * head_dim moderate. Power-of-two sizes only.
_GPU_TABLE = {
    (64, 16, "bfloat16"): Tiling(16, 4, num_warps=4, num_stages=2),
    (64, 32, "bfloat16"): Tiling(16, 2, num_warps=4, num_stages=2),
    (128, 16, "bfloat16"): Tiling(16, 4, num_warps=4, num_stages=2),
    (128, 32, "bfloat16"): Tiling(16, 2, num_warps=4, num_stages=2),
    (256, 16, "bfloat16"): Tiling(16, 2, num_warps=8, num_stages=2),
    (256, 32, "bfloat16"): Tiling(16, 1, num_warps=8, num_stages=2),
    (64, 16, "float32"): Tiling(16, 2, num_warps=4, num_stages=2),
    (64, 32, "float32"): Tiling(16, 1, num_warps=4, num_stages=2),
    (128, 16, "float32"): Tiling(16, 2, num_warps=4, num_stages=2),
    (128, 32, "float32"): Tiling(16, 1, num_warps=4, num_stages=2),
    (256, 16, "float32"): Tiling(8, 2, num_warps=8, num_stages=2),
    (256, 32, "float32"): Tiling(8, 1, num_warps=8, num_stages=2),
}


def _lookup(table: dict, head_dim: int, page_size: int, dtype) -> Tiling:
    name = jnp.dtype(dtype).name
    if name not in ("bfloat16", "float32"):
        name = "bfloat16"
    key = (head_dim, page_size, name)
    if key in table:
        return table[key]
    # Nearest head_dim / page_size present in the table.
    hd = min({k[0] for k in table}, key=lambda h: abs(h - head_dim))
    ps = min({k[1] for k in table}, key=lambda p: abs(p - page_size))
    return table[(hd, ps, name)]


def tpu_tiling(head_dim: int, page_size: int, dtype) -> Tiling:
    """Default TPU tiling for a KV cache of this head_dim/page_size/dtype."""
    return _lookup(_TPU_TABLE, head_dim, page_size, dtype)


def gpu_tiling(head_dim: int, page_size: int, dtype) -> Tiling:
    """Default GPU (Triton) tiling for a KV cache of this head_dim/page_size/dtype."""
    return _lookup(_GPU_TABLE, head_dim, page_size, dtype)
