"""tools/bench_kernels.py runs on CPU (xla backend) and knows device peaks."""

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
