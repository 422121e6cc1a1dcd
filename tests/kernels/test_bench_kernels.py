"""tools/bench_kernels.py runs on CPU (xla backend), knows device peaks, and times
the C++ CPU kernels per code path."""

import pytest

from pallas_kernels.cpu import ffi

from tools import bench_kernels


def test_peak_table():
    assert bench_kernels.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench_kernels.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench_kernels.peak_bandwidth("TPU v5 lite") == 819e9
    assert bench_kernels.peak_bandwidth("TPU v6 lite") == 1.64e12
    assert bench_kernels.peak_bandwidth("cpu") is None


def test_bench_runs_on_cpu(caplog):
    caplog.set_level("INFO")
    bench_kernels.main(["--backend", "xla", "--num-seqs", "2", "--context-len", "32",
                        "--q-len", "2", "--warmup", "1", "--iters", "2",
                        "--dtype", "float32"])
    text = caplog.text
    assert "ragged_paged_attention" in text and "write_kv" in text and "n/a" in text


@pytest.mark.skipif(not ffi.available(), reason="no C++ compiler to build the CPU kernels")
def test_bench_times_every_cpu_path(caplog):
    caplog.set_level("INFO")
    bench_kernels.main(["--cpu-isas", "all", "--num-seqs", "2", "--context-len", "32",
                        "--int8-shapes", "2x64x48", "--warmup", "1", "--iters", "2",
                        "--dtype", "float32"])
    lines = [ln for ln in caplog.text.splitlines() if "2x64x48" in ln or "2x32" in ln]
    assert len(lines) == 3 * len(ffi.supported_cpu_isas())
    assert any("scalar" in ln and "int8_w8a8" in ln for ln in lines)
    assert ffi.cpu_isa() == ffi.set_cpu_isa()  # the path is back to the default
