"""tools/device_check.sh on CPU: the command line, the JSON it writes, the stages
that run without a GPU; tools/make_random_llama.py at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device_check.sh"
STAGES = ["install", "kernels", "bandwidth", "serving"]


def _check(*argv, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert [x["name"] for x in s["stages"]] == STAGES
    return s


def _stage(s: dict, name: str) -> dict:
    return next(x for x in s["stages"] if x["name"] == name)


def test_help():
    p = _check("-h")
    assert p.returncode == 0
    assert p.stdout.startswith("usage: tools/device_check.sh")
    for flag in ("--out", "--skip-install", "--only", "--budget-s", "--dry-run"):
        assert flag in p.stdout


@pytest.mark.parametrize("argv,message", [
    (["--bogus"], "unknown option: --bogus"),
    (["--only", "everything"], "--only takes kernels, bandwidth or serving"),
    (["--budget-s", "soon"], "--budget-s takes a positive integer"),
    (["--out"], "--out needs a value"),
])
def test_bad_command_line_is_a_usage_error(argv, message, tmp_path):
    p = _check("--dry-run", *argv)
    assert p.returncode == 2
    assert message in p.stderr and "usage:" in p.stderr
    p = _check("--dry-run", "--out", str(tmp_path / "dc"), *argv)
    assert p.returncode == 2 and message in p.stderr
    assert not (tmp_path / "dc").exists()  # nothing written before the usage error


def test_dry_run_plans_every_stage_and_runs_nothing(tmp_path):
    out = tmp_path / "dc"
    p = _check("--dry-run", "--out", str(out))
    assert p.returncode == 0, p.stderr
    s = _summary(out)
    assert s["dry_run"] is True and s["budget_s"] == 540
    assert [x["status"] for x in s["stages"]] == ["planned"] * 4
    # the planned timeouts split the budget and stay inside it
    timeouts = [x["timeout_s"] for x in s["stages"]]
    assert all(t > 0 for t in timeouts) and sum(timeouts) <= 540
    cmds = {x["name"]: x["commands"] for x in s["stages"]}
    assert cmds["install"] == [f"{sys.executable} -m pip install -e .\\[cuda12\\]"]
    assert "JAX_SERVE_GPU_TESTS=1" in cmds["kernels"][0]
    assert "tests/kernels/test_attention_kernels.py -k gpu_compiled" in cmds["kernels"][0]
    assert all("tools/bench_kernels.py" in c for c in cmds["bandwidth"])
    serving = " ".join(cmds["serving"])
    for part in ("serving.main", "make_random_llama.py", "--concurrency 1 ",
                 "--concurrency 32 ", "--input-len 128 --output-len 128 --ignore-eos"):
        assert part in serving
    # every command was printed; nothing ran, so no stage wrote its files
    assert p.stdout.count("[serving]") == len(cmds["serving"])
    assert sorted(f.name for f in out.iterdir() if f.is_file()) == ["summary.json"]


def test_only_as_list_and_skip_install(tmp_path):
    out = tmp_path / "dc"
    p = _check("--dry-run", "--skip-install", "--only", "kernels,serving", "--only",
               "kernels", "--budget-s", "100", "--out", str(out))
    assert p.returncode == 0, p.stderr
    s = _summary(out)
    got = {x["name"]: (x["status"], x["reason"]) for x in s["stages"]}
    assert got == {"install": ("skipped", "--skip-install"),
                   "kernels": ("planned", None), "bandwidth": ("skipped", "not in --only"),
                   "serving": ("planned", None)}
    assert sum(x["timeout_s"] for x in s["stages"]) <= 100


def test_bandwidth_runs_on_cpu(tmp_path):
    out = tmp_path / "dc"
    p = _check("--only", "bandwidth", "--skip-install", "--quick", "--budget-s", "90",
               "--out", str(out))
    assert p.returncode == 0, p.stderr
    s = _summary(out)
    bw = _stage(s, "bandwidth")
    assert bw["status"] == "ok" and 0 < bw["timeout_s"] <= 90
    assert str(out / "bandwidth.json") in bw["files"]
    res = json.loads((out / "bandwidth.json").read_text())
    assert res["platform"] == "cpu"
    (cfg,) = res["configs"]
    assert {r["kernel"] for r in cfg["rows"]} == {"ragged_paged_attention", "write_kv"}
    assert all(r["gb_per_s"] > 0 for r in cfg["rows"])
    assert s["jax"]["backend"] == "cpu"
    assert s["nvidia_smi"] is None or isinstance(s["nvidia_smi"], str)


def test_a_stage_over_its_budget_is_a_timeout_and_fails_the_check(tmp_path):
    out = tmp_path / "dc"
    p = _check("--only", "bandwidth", "--skip-install", "--quick", "--budget-s", "1",
               "--out", str(out))
    assert p.returncode == 1
    bw = _stage(_summary(out), "bandwidth")
    assert bw["status"] == "timeout" and "1s timeout" in bw["reason"]


def test_kernels_without_a_gpu_are_skipped_with_the_reason(tmp_path):
    out = tmp_path / "dc"
    p = _check("--only", "kernels", "--skip-install", "--out", str(out))
    assert p.returncode == 0, p.stderr
    k = _stage(_summary(out), "kernels")
    assert k["status"] == "skipped" and "needs a GPU" in k["reason"]
    res = json.loads((out / "kernels.json").read_text())
    assert res["counts"]["skipped"] >= 1 and res["counts"]["passed"] == 0
    assert all("gpu_compiled" in t["name"] for t in res["tests"])


def test_make_random_llama_tiny_is_loadable(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "llama"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_llama.py"),
                        "--out", str(out), "--hidden-size", "64", "--num-layers", "2",
                        "--num-heads", "4", "--num-kv-heads", "2", "--intermediate-size", "96",
                        "--vocab-size", "512", "--json", str(tmp_path / "m.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["vocab_size"] == info["tokenizer_len"] == 512
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads,
            cfg.vocab_size) == (64, 2, 2, 512)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode("the cat sat", add_special_tokens=False)
    assert ids and max(ids) < 512 and tok.decode(ids) == "the cat sat"
    from model.loader import load_model

    loaded = load_model(str(out), with_tokenizer=False)
    assert loaded.config.vocab_size == 512 and loaded.format == "hf"


def test_truncate_bpe_keeps_merges_consistent():
    from tools.make_random_llama import truncate_bpe

    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "abb": 3},
                    "merges": [["a", "b"], ["ab", "b"]]},
          "added_tokens": [{"id": 0, "content": "a"}, {"id": 3, "content": "abb"}]}
    got = truncate_bpe(tj, 3)
    assert got["model"]["vocab"] == {"a": 0, "b": 1, "ab": 2}
    assert got["model"]["merges"] == [["a", "b"]]
    assert [t["id"] for t in got["added_tokens"]] == [0]
