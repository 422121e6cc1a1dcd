"""Builds and registers the C++ XLA FFI kernels for the CPU (``csrc/*.cc``).

One shared library holds every handler. It is compiled on first use with the
machine's C++ compiler (``-O3 -march=native``: AVX-512 VNNI where the CPU has
it, portable loops where not) into ``~/.cache/jax-serve/kernels`` (override
with ``JAX_SERVE_KERNEL_CACHE``), keyed by the sources, the flags, jaxlib's
version and the CPU, and loaded from there afterwards; concurrent first uses
build side by side and rename into place. Where no compiler works,
``available()`` is False and callers keep their pure-JAX paths.
``JAX_SERVE_CPU_KERNELS=0`` turns the kernels off.
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
import jaxlib

logger = logging.getLogger(__name__)

_CSRC = pathlib.Path(__file__).parent / "csrc"
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
# handler symbol in the library -> FFI target name
TARGETS = {
    "PagedAttentionCpu": "jax_serve_paged_attention_cpu",
    "Int8MatmulCpu": "jax_serve_int8_matmul_cpu",
    "Int8WeightMatmulCpu": "jax_serve_int8_weight_matmul_cpu",
}


def _sources() -> list[pathlib.Path]:
    return sorted(_CSRC.glob("*.cc"))


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
    for src in sorted(_CSRC.iterdir()):
        key.update(src.name.encode() + src.read_bytes())
    for part in (" ".join(_FLAGS), jaxlib.__version__, platform.machine(), _cpu_signature()):
        key.update(part.encode())
    root = os.environ.get("JAX_SERVE_KERNEL_CACHE") or os.path.expanduser(
        "~/.cache/jax-serve/kernels")
    return pathlib.Path(root) / f"jax_serve_cpu-{key.hexdigest()[:16]}.so"


def _compile(out: pathlib.Path) -> None:
    compiler = os.environ.get("CXX", "g++")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-I", jax.ffi.include_dir(), "-I", str(_CSRC),
                        *map(str, _sources()), "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=600)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def available() -> bool:
    """Builds (once per machine) and registers the kernels; False if that fails."""
    if os.environ.get("JAX_SERVE_CPU_KERNELS", "1") == "0":
        return False
    path = _library_path()
    try:
        if not path.exists():
            _compile(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for symbol, target in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU FFI kernels unavailable, using the pure-JAX paths: %s", detail)
        return False
    return True
