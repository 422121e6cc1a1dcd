"""``jax.export`` helpers for lowering Pallas kernels for TPU/GPU from any host.

Triton custom calls carry no cross-version compatibility guarantee, so
``jax.export`` refuses to serialize them unless that safety check is disabled;
Mosaic TPU custom calls are on jax's allow-list and need nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax import export

# Custom-call target that Pallas' Triton lowering emits (jax 0.10.2).
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def disabled_checks_for(platforms: Sequence[str]) -> list:
    """The ``jax.export`` safety checks to disable for these platforms."""
    if any(p in ("cuda", "rocm", "gpu") for p in platforms):
        return [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    return []


def export_for(fn: Callable, args: Sequence, platforms: Sequence[str]) -> export.Exported:
    """Lowers ``fn(*args)`` for ``platforms`` with ``jax.export``.

    Args:
      fn: a function (jitted or not) of array arguments.
      args: arrays or ``jax.ShapeDtypeStruct``s (only shapes/dtypes are used).
      platforms: e.g. ``["tpu"]`` or ``["cuda"]``.

    Returns:
      The ``jax.export.Exported``; ``.mlir_module()`` holds the lowered module
      and ``.serialize()`` succeeds.
    """
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return export.export(jitted, platforms=tuple(platforms),
                         disabled_checks=disabled_checks_for(platforms))(*specs)
