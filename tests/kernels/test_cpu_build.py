"""The CPU kernels' build: it must succeed where it can, run anywhere, say why not.

The kernel tests skip where the library is unavailable; this file is what
fails CI when a compiler is present and the build breaks (the compiler's
stderr in the message). It also checks the choice of code path: the names,
the downgrade rules, ``JAX_SERVE_CPU_ISA`` at load, and that the portable
configuration (what aarch64 compiles) still compiles.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import jax
import pytest

from pallas_kernels.cpu import ffi
from pallas_kernels.cpu import testing as cpu_testing

_CAN_BUILD = (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")
              and shutil.which(ffi._compiler()) is not None)
_DISABLED = os.environ.get("JAX_SERVE_CPU_KERNELS", "1") == "0"
needs_build = pytest.mark.skipif(not _CAN_BUILD or _DISABLED,
                                 reason="no compiler here, or JAX_SERVE_CPU_KERNELS=0")


@needs_build
def test_kernels_build_where_a_compiler_is_present():
    assert ffi.available(), f"the CPU kernels failed to build:\n{ffi.build_error()}"
    assert ffi.build_error() is None


def test_build_is_for_the_baseline_cpu():
    """No -march=native: one library runs on every CPU of the architecture."""
    assert not any(f.startswith(("-march", "-mavx", "-mtune=native"))
                   for f in ffi._COMPILE_FLAGS + ffi._LINK_FLAGS)


def test_library_key_follows_flags_and_compiler(monkeypatch):
    base = ffi._library_path()
    monkeypatch.setattr(ffi, "_COMPILE_FLAGS", ffi._COMPILE_FLAGS + ("-DX",))
    flags = ffi._library_path()
    monkeypatch.setenv("CXX", "clang++")
    assert len({base, flags, ffi._library_path()}) == 3


def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    cxx = tmp_path / "broken-cxx"
    cxx.write_text("#!/bin/sh\necho 'error: boom in the compiler' >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    out = tmp_path / "cache" / "lib.so"
    with pytest.raises(subprocess.CalledProcessError) as e:
        ffi._compile(out)
    assert "boom in the compiler" in ffi._describe(e.value)
    assert not out.exists() and os.listdir(out.parent) == []  # no partial files left


@needs_build
@pytest.mark.parametrize("config", ["-DJAX_SERVE_PORTABLE_ONLY", "-DJAX_SERVE_NO_AVX_VNNI"])
def test_reduced_configurations_compile(config):
    """The sources with the x86 paths compiled out (as on aarch64), and
    without AVX-VNNI (as with GCC before 11)."""
    for src in ffi._sources():
        proc = subprocess.run(
            [ffi._compiler(), "-std=c++17", "-O0", "-c", "-o", os.devnull, config,
             "-I", jax.ffi.include_dir(), "-I", str(ffi._CSRC), str(src)],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{src.name} {config}:\n{proc.stderr}"


def test_isa_resolution():
    none, avx2 = 0, ffi._FEAT_AVX2
    avx2_vnni = avx2 | ffi._FEAT_AVX_VNNI
    everything = avx2_vnni | ffi._FEAT_AVX512 | ffi._FEAT_AVX512_VNNI
    resolve = ffi._resolve
    assert resolve("auto", none, downgrade=False) == (0, False)
    assert resolve("auto", avx2, downgrade=False) == (1, False)
    assert resolve("auto", avx2_vnni, downgrade=False) == (1, True)
    assert resolve("auto", everything, downgrade=False) == (2, True)
    assert resolve("avx2", everything, downgrade=False) == (1, True)
    assert resolve("avx2-novnni", everything, downgrade=False) == (1, False)
    assert resolve("avx512-novnni", everything, downgrade=False) == (2, False)
    assert resolve("scalar", everything, downgrade=False) == (0, False)
    with pytest.raises(ValueError, match="lacks it"):
        resolve("avx512", avx2_vnni, downgrade=False)
    # JAX_SERVE_CPU_ISA downgrades instead, keeping a -novnni choice
    assert resolve("avx512", avx2_vnni, downgrade=True) == (1, True)
    assert resolve("avx512-novnni", avx2_vnni, downgrade=True) == (1, False)
    assert resolve("avx2", none, downgrade=True) == (0, False)
    with pytest.raises(ValueError, match="expected one of"):
        resolve("avx3", everything, downgrade=True)


@needs_build
def test_set_cpu_isa_and_names():
    assert ffi.cpu_isa() in ffi._PATH_NAMES.values()
    assert set(cpu_testing.cpuinfo_isas(vnni_variants=True)) <= set(ffi.supported_cpu_isas())
    with pytest.raises(ValueError, match="expected one of"):
        ffi.set_cpu_isa("avx3")
    try:
        assert ffi.set_cpu_isa("scalar") == "scalar"
    finally:
        ffi.set_cpu_isa()
    if "avx512" not in ffi.supported_cpu_isas():
        with pytest.raises(ValueError, match="lacks it"):
            ffi.set_cpu_isa("avx512")


@needs_build
def test_env_var_picks_the_path_at_load(tmp_path):
    """JAX_SERVE_CPU_ISA is read when the library loads, and logged once."""
    want = cpu_testing.cpuinfo_isas()[-2] if len(cpu_testing.cpuinfo_isas()) > 1 else "scalar"
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from pallas_kernels.cpu import ffi\nprint('PATH', ffi.cpu_isa())\n")
    env = dict(os.environ, JAX_SERVE_CPU_ISA=want, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(ffi._CSRC.parents[2]))
    assert proc.returncode == 0, proc.stderr
    expected = cpu_testing._expected_path(want, cpu_testing.cpuinfo_flags())
    assert f"PATH {expected}" in proc.stdout
    assert f"CPU kernels: {expected} path" in proc.stderr
    env["JAX_SERVE_CPU_ISA"] = "avx3"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(ffi._CSRC.parents[2]))
    assert proc.returncode != 0 and "JAX_SERVE_CPU_ISA='avx3'" in proc.stderr


@needs_build
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="checks x86-64 machine code with objdump")
def test_only_the_vector_paths_use_vector_instructions():
    """Baseline code (the handlers, the portable path, std::vector's members)
    has no AVX, and only the VNNI functions use vpdpbusd, so the library
    runs on any x86-64 CPU whatever this one has."""
    import re

    assert ffi.available(), ffi.build_error()
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C",
                           str(ffi._library_path())], capture_output=True, text=True,
                          check=True, timeout=300).stdout
    func, bad = "", set()
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            func = header.group(1)
        elif re.search(r"%[yz]mm\d|%k[0-7]\b", line) and not re.search(r"::avx(2|512)::", func):
            bad.add(func)
        elif "vpdpbusd" in line and "micro_tile_vnni" not in func:
            bad.add(func)
    assert not bad, sorted(bad)[:10]
