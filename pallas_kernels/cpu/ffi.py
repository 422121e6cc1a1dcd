"""Builds and registers the C++ XLA FFI kernels for the CPU (``csrc/*.cc``).

One shared library holds every handler. It is compiled on first use with the
machine's C++ compiler (``$CXX``, default ``g++``) into
``~/.cache/jax-serve/kernels`` (override with ``JAX_SERVE_KERNEL_CACHE``),
keyed by the sources, the flags, the compiler, jaxlib's version and the
architecture, and loaded from there afterwards; concurrent first uses build
side by side and rename into place. Where no compiler works, ``available()``
is False, ``build_error()`` says why, and callers keep their pure-JAX paths.
``JAX_SERVE_CPU_KERNELS=0`` turns the kernels off.

The library is built for the baseline of the architecture (no
``-march=native``), so one build runs on every x86-64 CPU; each kernel is
compiled three times inside it (AVX-512, AVX2+FMA, portable; see
``csrc/cpu_isa.h``) and the handlers pick a path per call. By default
(``JAX_SERVE_CPU_ISA=auto``) that is the best the CPU has, VNNI's int8 dot
product included where present (AVX512-VNNI, or AVX-VNNI on ymm); the
variable forces one of ``ISAS``:

- ``avx512``, ``avx2``: that path, with its VNNI dot product if the CPU has it;
- ``avx512-novnni``, ``avx2-novnni``: that path with the ``vpmaddubsw`` int8
  dot product, as the plain names run on CPUs without VNNI (Skylake-X, Zen 3);
  forcing it tests that code on CPUs with VNNI;
- ``scalar``: the portable loops (what non-x86 machines always run).

A forced path the CPU lacks is logged as a warning and downgraded to the
best one below it; an unknown value is a ``ValueError``. ``set_cpu_isa``
switches paths at run time (tests, benchmarks) and raises for a path the CPU
lacks; ``cpu_isa()`` names the path that runs. The per-path compilation uses
GCC's target pragmas (g++ 9 or later); another compiler's errors show in
``build_error()``.
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
_COMPILE_FLAGS = ("-O3", "-fopenmp-simd", "-std=c++17", "-fPIC")
_LINK_FLAGS = ("-shared",)
# handler symbol in the library -> FFI target name
TARGETS = {
    "PagedAttentionCpu": "jax_serve_paged_attention_cpu",
    "Int8MatmulCpu": "jax_serve_int8_matmul_cpu",
    "Int8WeightMatmulCpu": "jax_serve_int8_weight_matmul_cpu",
}

# JAX_SERVE_CPU_ISA / set_cpu_isa names -> (level, vnni); vnni None: if the CPU has it.
ISAS = {
    "auto": None,
    "avx512": (2, None),
    "avx512-novnni": (2, False),
    "avx2": (1, None),
    "avx2-novnni": (1, False),
    "scalar": (0, False),
}
# bits of jax_serve_cpu_features() (csrc/cpu_isa.h)
_FEAT_AVX2, _FEAT_AVX_VNNI, _FEAT_AVX512, _FEAT_AVX512_VNNI = 1, 2, 4, 8
_LEVEL_FEATURE = {1: (_FEAT_AVX2, _FEAT_AVX_VNNI), 2: (_FEAT_AVX512, _FEAT_AVX512_VNNI)}
_PATH_NAMES = {(0, False): "scalar", (1, False): "avx2+fma", (1, True): "avx2+fma+avx_vnni",
               (2, False): "avx512", (2, True): "avx512+vnni"}

_state: dict = {"lib": None, "error": None}


def _sources() -> list[pathlib.Path]:
    return sorted(_CSRC.glob("*.cc"))


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _library_path() -> pathlib.Path:
    key = hashlib.sha256()
    for src in sorted(_CSRC.iterdir()):
        key.update(src.name.encode() + src.read_bytes())
    for part in (" ".join(_COMPILE_FLAGS + _LINK_FLAGS), _compiler(), jaxlib.__version__,
                 platform.machine()):
        key.update(part.encode())
    root = os.environ.get("JAX_SERVE_KERNEL_CACHE") or os.path.expanduser(
        "~/.cache/jax-serve/kernels")
    return pathlib.Path(root) / f"jax_serve_cpu-{key.hexdigest()[:16]}.so"


def _compile(out: pathlib.Path) -> None:
    """Compiles the sources side by side (one process each), then links."""
    compiler = _compiler()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as objdir:
            objs, procs = [], []
            for src in _sources():
                obj = os.path.join(objdir, src.stem + ".o")
                objs.append(obj)
                procs.append((src, subprocess.Popen(
                    [compiler, *_COMPILE_FLAGS, "-I", jax.ffi.include_dir(), "-I", str(_CSRC),
                     "-c", str(src), "-o", obj],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            errors = []
            for src, proc in procs:
                try:
                    _, err = proc.communicate(timeout=600)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                if proc.returncode != 0:
                    errors.append(f"{src.name}:\n{err}")
            if errors:
                raise subprocess.CalledProcessError(1, compiler, stderr="\n".join(errors))
            subprocess.run([compiler, *_LINK_FLAGS, *objs, "-o", tmp],
                           check=True, capture_output=True, text=True, timeout=600)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _describe(e: Exception) -> str:
    """An exception from the build or load, with the compiler's stderr if any."""
    detail = getattr(e, "stderr", None) or str(e)
    return f"{type(e).__name__}: {detail}"


def _load(path: pathlib.Path) -> ctypes.CDLL:
    lib = ctypes.cdll.LoadLibrary(str(path))
    lib.jax_serve_cpu_features.restype = ctypes.c_int
    lib.jax_serve_get_isa.restype = ctypes.c_int
    lib.jax_serve_set_isa.restype = ctypes.c_int
    lib.jax_serve_set_isa.argtypes = (ctypes.c_int, ctypes.c_int)
    return lib


def _env_isa() -> str:
    name = os.environ.get("JAX_SERVE_CPU_ISA", "auto").strip().lower() or "auto"
    if name not in ISAS:
        raise ValueError(f"JAX_SERVE_CPU_ISA={name!r}: expected one of {', '.join(ISAS)}")
    return name


def _has_level(level: int, features: int) -> bool:
    return level == 0 or bool(features & _LEVEL_FEATURE[level][0])


def _runnable(features: int) -> list[str]:
    return [n for n, c in ISAS.items() if c is not None and _has_level(c[0], features)]


def _resolve(name: str, features: int, *, downgrade: bool) -> tuple[int, bool]:
    """(level, vnni) for an ``ISAS`` name. A level the CPU lacks is a ValueError,
    or with ``downgrade`` the best level below it (the caller warns)."""
    if name not in ISAS:
        raise ValueError(f"CPU ISA {name!r}: expected one of {', '.join(ISAS)}")
    level, vnni = ISAS[name] or (2, None)  # auto: the best there is
    if ISAS[name] is not None and not downgrade and not _has_level(level, features):
        raise ValueError(f"CPU ISA {name!r}: this CPU lacks it (it runs "
                         f"{', '.join(_runnable(features))})")
    while not _has_level(level, features):
        level -= 1
    if level == 0:
        return 0, False
    has_vnni = bool(features & _LEVEL_FEATURE[level][1])
    return level, has_vnni if vnni is None else vnni


def _path_name(lib: ctypes.CDLL) -> str:
    v = lib.jax_serve_get_isa()
    return _PATH_NAMES[(v & 0xFF, bool(v >> 8 & 1))]


def _set(lib: ctypes.CDLL, name: str, *, downgrade: bool) -> None:
    level, vnni = _resolve(name, lib.jax_serve_cpu_features(), downgrade=downgrade)
    if lib.jax_serve_set_isa(level, int(vnni)) != 0:
        raise ValueError(f"CPU ISA {name!r}: the library refused it")


@functools.cache
def available() -> bool:
    """Builds (once per machine) and registers the kernels; False if that fails."""
    if os.environ.get("JAX_SERVE_CPU_KERNELS", "1") == "0":
        _state["error"] = "disabled by JAX_SERVE_CPU_KERNELS=0"
        return False
    env = _env_isa()  # a typo fails before the build
    path = _library_path()
    try:
        if not path.exists():
            _compile(path)
        lib = _load(path)
        for symbol, target in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        _state["error"] = _describe(e)
        logger.warning("CPU FFI kernels unavailable, using the pure-JAX paths: %s",
                       _state["error"])
        return False
    _set(lib, env, downgrade=True)
    _state["lib"], _state["error"] = lib, None
    if ISAS[env] is not None and not _has_level(ISAS[env][0], lib.jax_serve_cpu_features()):
        logger.warning("JAX_SERVE_CPU_ISA=%s: this CPU lacks it; using %s", env, _path_name(lib))
    logger.info("CPU kernels: %s path (%s)", _path_name(lib), path.name)
    return True


def build_error() -> str | None:
    """Why ``available()`` is False (the compiler's stderr, or the load error); None if not."""
    available()
    return _state["error"]


def cpu_isa() -> str:
    """The path the kernels run: ``avx512+vnni``, ``avx512``, ``avx2+fma+avx_vnni``,
    ``avx2+fma``, ``scalar``, or ``unavailable``."""
    return _path_name(_state["lib"]) if available() else "unavailable"


def supported_cpu_isas() -> list[str]:
    """The ``ISAS`` names (``auto`` aside) this CPU can run; [] without the kernels."""
    if not available():
        return []
    return _runnable(_state["lib"].jax_serve_cpu_features())


def set_cpu_isa(name: str | None = None) -> str:
    """Forces a path (an ``ISAS`` name; None: back to ``JAX_SERVE_CPU_ISA``'s).

    Global to the process, like the variable, and it applies to programs
    already compiled: the handlers read it once per call, so calls in flight
    finish on the old path. Returns ``cpu_isa()``.

    Raises:
      RuntimeError: the kernels are unavailable.
      ValueError: an unknown name, or a path this CPU cannot run.
    """
    if not available():
        raise RuntimeError(f"the CPU kernels are unavailable: {build_error()}")
    if name is None:
        _set(_state["lib"], _env_isa(), downgrade=True)
    else:
        _set(_state["lib"], name, downgrade=False)
    return cpu_isa()
