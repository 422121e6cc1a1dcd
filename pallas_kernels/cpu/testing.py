"""Test helpers for the CPU kernels' code paths (see ``ffi.py``).

``cpuinfo_isas`` reads what the kernel reports in ``/proc/cpuinfo``, apart
from the library's own detection, so a test parametrized over it fails, not
skips, where the library misses a path the CPU has.
"""

from __future__ import annotations

import contextlib
import platform

from pallas_kernels.cpu import ffi

# path -> the /proc/cpuinfo flags it needs (csrc/cpu_isa.cc checks the same)
_NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"},
    "avx2": {"avx2", "fma"},
}
_VNNI_FLAG = {"avx512": "avx512_vnni", "avx2": "avx_vnni"}
_PATH_NAME = {"avx512": ("avx512", "+vnni"), "avx2": ("avx2+fma", "+avx_vnni")}


def cpuinfo_flags() -> set[str]:
    """The ``flags`` line of /proc/cpuinfo as a set (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpuinfo_isas(*, vnni_variants: bool = False) -> list[str]:
    """The forced paths (``ffi.ISAS`` names) this CPU should run, best first.

    With ``vnni_variants``, also ``avx512-novnni`` / ``avx2-novnni`` where the
    CPU has that level's VNNI (elsewhere they are the plain path again).
    """
    flags = cpuinfo_flags() if platform.machine() in ("x86_64", "AMD64") else set()
    names = []
    for level in ("avx512", "avx2"):
        if _NEEDS[level] <= flags:
            names.append(level)
            if vnni_variants and _VNNI_FLAG[level] in flags:
                names.append(f"{level}-novnni")
    return names + ["scalar"]


def _expected_path(name: str, flags: set[str]) -> str:
    """``ffi.cpu_isa()``'s name for forced path ``name`` on a CPU with ``flags``."""
    if name == "scalar":
        return "scalar"
    level = name.removesuffix("-novnni")
    base, vnni = _PATH_NAME[level]
    return base + vnni if name == level and _VNNI_FLAG[level] in flags else base


@contextlib.contextmanager
def forced_isa(name: str):
    """Runs the block on path ``name``; back to ``JAX_SERVE_CPU_ISA``'s after.

    Raises ValueError (failing the test) where the library cannot run it.
    """
    path, expected = ffi.set_cpu_isa(name), _expected_path(name, cpuinfo_flags())
    if path != expected:
        ffi.set_cpu_isa()
        raise AssertionError(f"forced {name!r} but the kernels run {path!r} "
                             f"(/proc/cpuinfo says {expected!r})")
    try:
        yield path
    finally:
        ffi.set_cpu_isa()
