"""Compiled step programs on disk: a second start skips tracing, lowering and compiling.

XLA's persistent compilation cache (``--compile-cache-dir``) only skips the
back end: every start still traces and lowers each program. This cache keeps
the executables themselves (``jax.experimental.serialize_executable``) under
``<compile-cache-dir>/programs/<key>/``, where the key hashes everything a
program depends on: the model files (path, size, mtime), the engine settings
that shape the programs (dtype, KV dtype and pages, quantization, buckets,
backend, context length), the device kind and count, the mesh, jax's and
jaxlib's versions, and the source of every module that goes into a step
(``model/``, ``pallas_kernels/``, ``sharding/``, ``serving/engine/``). A change
in any of them is a new key, so a stale program is never loaded; a file that
fails to load is rebuilt and overwritten.

Executables are pickles that can run code when loaded: the directory is
created private (0700) and must stay trusted, like XLA's own cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import pickle
import tempfile
from typing import Optional

import jax
import jaxlib

logger = logging.getLogger(__name__)

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SOURCE_DIRS = ("model", "pallas_kernels", "sharding", "serving/engine")


def _source_digest() -> str:
    h = hashlib.sha256()
    for d in _SOURCE_DIRS:
        for p in sorted((_ROOT / d).rglob("*")):
            if p.suffix in (".py", ".cc", ".h") and p.is_file():
                h.update(str(p.relative_to(_ROOT)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def _model_files(path: str) -> list[tuple[str, int, int]]:
    p = pathlib.Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out


class ProgramCache:
    """Loads and stores serialized ``jax.stages.Compiled`` programs under one key."""

    def __init__(self, root: str | os.PathLike, key_parts: dict):
        digest = hashlib.sha256(repr(sorted(key_parts.items())).encode()).hexdigest()[:24]
        self.dir = pathlib.Path(os.path.expanduser(str(root))) / "programs" / digest
        self.key_parts = key_parts

    @classmethod
    def for_engine(cls, config, loaded, *, mesh, num_pages: int,
                   max_model_len: int) -> Optional["ProgramCache"]:
        """The cache of an ``LLMEngine``'s programs (None when the model has no files)."""
        try:
            files = _model_files(str(loaded.path))
        except OSError:
            return None
        devices = jax.devices()
        fields = dataclasses.asdict(config)
        shaping = {k: fields[k] for k in (
            "dtype", "kv_cache_dtype", "quantization", "max_num_seqs",
            "max_num_batched_tokens", "page_size", "attention_backend",
            "tensor_parallel_size", "data_parallel_size", "nnodes", "decode_buckets",
            "prefill_buckets")}
        key = dict(files=files, engine=shaping, num_pages=num_pages,
                   max_model_len=max_model_len, jax=jax.__version__,
                   jaxlib=jaxlib.__version__, platform=devices[0].platform,
                   device_kind=devices[0].device_kind, num_devices=len(devices),
                   mesh=None if mesh is None else (tuple(mesh.shape.items()),
                                                   tuple(d.id for d in mesh.devices.flat)),
                   source=_source_digest(), isa=os.environ.get("JAX_SERVE_CPU_ISA", "auto"))
        return cls(config.compile_cache_dir, key)

    def _path(self, name: str) -> pathlib.Path:
        return self.dir / f"{name}.bin"

    def load(self, name: str, args) -> Optional[jax.stages.Compiled]:
        """The program ``name`` if stored (``args``: the call's arguments, for checking)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self._path(name)
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            if in_tree != jax.tree_util.tree_structure((tuple(args), {})):
                raise ValueError("argument structure changed")
            return deserialize_and_load(payload, in_tree, out_tree)
        except Exception as exc:  # a torn or foreign file: rebuild it
            logger.warning("program cache: %s unusable (%s); rebuilding", path, exc)
            return None

    def drop(self, name: str) -> None:
        """Removes a stored program (one that failed to run)."""
        try:
            self._path(name).unlink()
        except OSError:
            pass

    def store(self, name: str, compiled: jax.stages.Compiled) -> None:
        """Writes ``compiled`` atomically; failures are logged, not raised."""
        from jax.experimental.serialize_executable import serialize

        try:
            payload, in_tree, out_tree = serialize(compiled)
            data = pickle.dumps((payload, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(name))
        except Exception as exc:
            logger.warning("program cache: could not store %s (%s)", name, exc)
