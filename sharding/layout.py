"""One engine replica's tensor-parallel layout: its mesh and the plan for its model.

``LLMEngine`` owns one ``TensorParallelLayout``; it hands
``layout.shardings_for`` to ``model.loader.load_model`` (each weight goes from
host numpy straight into its shards) and gives the runner ``layout.mesh`` and
``layout.kv_sharding()``. With no mesh (tp 1, one device) every method is a
no-op and the engine runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import jax
from jax.sharding import Mesh

from sharding.mesh import make_mesh
from sharding.specs import ShardingPlan, kv_cache_sharding, weight_shardings, weight_spec

logger = logging.getLogger(__name__)


class TensorParallelLayout:
    """The mesh of one replica and, once the model config is known, its plan.

    Args:
      mesh: a ``(data=1, tensor=tp)`` mesh, or None for single-device serving.
    """

    def __init__(self, mesh: Optional[Mesh]):
        self.mesh = mesh
        self.plan: Optional[ShardingPlan] = None

    @classmethod
    def for_engine(cls, tp: int, mesh: Optional[Mesh] = None) -> "TensorParallelLayout":
        """``mesh`` if given; else a tp-device mesh when ``tp > 1`` or several processes."""
        if mesh is None and (tp > 1 or jax.process_count() > 1):
            if jax.process_count() > 1 and tp != jax.device_count():
                raise ValueError(f"multi-host serving runs one replica over every device: "
                                 f"--tp-size must be {jax.device_count()} "
                                 f"({jax.process_count()} nodes), got {tp}")
            mesh = make_mesh(tp, 1)
        return cls(mesh)

    @property
    def tp(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["tensor"]

    def shardings_for(self, config):
        """``ModelConfig -> (path -> NamedSharding)`` for ``load_model``; None with no mesh."""
        if self.mesh is None:
            return None
        self.plan = ShardingPlan.build(config, self.tp)
        logger.info("tensor parallel %s on %s", self.plan.describe(),
                    [d.id for d in self.mesh.devices.flat])
        return weight_shardings(self.plan, self.mesh)

    def adopt(self, loaded):
        """Re-places an already loaded model's weights onto this layout."""
        if self.mesh is None:
            return loaded
        place = self.shardings_for(loaded.config)
        state = jax.tree_util.tree_map_with_path(
            lambda path, a: jax.device_put(a, place(_path_keys(path))), loaded.state)
        return dataclasses.replace(loaded, state=state)

    def kv_sharding(self):
        """The KV cache's sharding (a ``KVCache`` pytree prefix), or None with no mesh."""
        if self.mesh is None:
            return None
        return kv_cache_sharding(self.plan, self.mesh)


def _path_keys(path) -> tuple:
    keys = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        keys.append(key)
    return tuple(k for k in keys if k != "value")


__all__ = ["TensorParallelLayout", "weight_spec"]
