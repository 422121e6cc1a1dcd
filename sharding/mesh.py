"""Device meshes for tensor and data parallelism.

``make_mesh(tp, dp)`` lays ``dp * tp`` devices out as a ``(data, tensor)``
mesh with ``AxisType.Auto`` axes, so XLA (GSPMD) inserts the collectives a
sharded matmul needs (jax 0.10's default ``Explicit`` axes would raise
``ShardingTypeError`` on a sharded contracting dimension). Each data-parallel
replica runs on one row of that mesh: ``replica_mesh(mesh, i)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sharding.axes import MESH_AXES


def make_mesh(tp: int = 1, dp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Builds a ``(data=dp, tensor=tp)`` mesh with Auto axis types.

    Args:
      tp: tensor-parallel size (devices per replica).
      dp: data-parallel size (replicas).
      devices: devices to use, in order; default ``jax.devices()`` (all
        processes' devices in a multi-host run). The first ``dp * tp`` are used.

    Raises:
      ValueError: fewer than ``dp * tp`` devices, or a size below 1.
    """
    if tp < 1 or dp < 1:
        raise ValueError(f"tensor and data parallel sizes must be >= 1, got tp={tp} dp={dp}")
    devices = list(jax.devices() if devices is None else devices)
    need = tp * dp
    if len(devices) < need:
        raise ValueError(f"tp={tp} x dp={dp} needs {need} devices but only {len(devices)} "
                         f"are visible ({devices[0].platform if devices else 'none'})")
    grid = np.asarray(devices[:need], dtype=object).reshape(dp, tp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def replica_mesh(mesh: Mesh, index: int) -> Mesh:
    """The ``(data=1, tensor=tp)`` sub-mesh of data-parallel replica ``index``."""
    grid = mesh.devices[index:index + 1]
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))
