"""Sleep/wake-up and weight updates reach every replica of a ``--data-parallel-size 2`` server.

One server (two simulated CPU devices) serves a tiny random Llama; every check
sends the same prompt four times in one SGLang batch, which the least-loaded
placement spreads over both replicas, and compares each answer with a greedy
loop in transformers on the checkpoint that should be serving.
"""

from __future__ import annotations

import base64
import shutil

import httpx
import pytest

from tests.server.conftest import launch
from tests.server.native_launch import assert_json_error

pytestmark = pytest.mark.slow

ARGS = ["--max-num-seqs", "4", "--max-model-len", "128", "--max-num-batched-tokens", "64",
        "--decode-buckets", "4", "--prefill-buckets", "64", "--num-gpu-blocks-override", "64",
        "--disable-log-requests", "--log-level", "warning", "--data-parallel-size", "2"]
PROMPT = [1, 17, 42, 5, 99, 23]
MAX_NEW = 6


def _greedy(model) -> list[int]:
    import torch

    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(MAX_NEW):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Llamas (seeds 0 and 1, each with SmolLM2's tokenizer), one of other shapes,
    and each one's greedy continuation of PROMPT."""
    import transformers

    from model.default import default_model_path
    from model.tokenizer import load_tokenizer
    from tests.model.tiny_hf import hf_config, save_hf_model

    root = tmp_path_factory.mktemp("dp-weights")
    tok_dir = root / "tokenizer"
    load_tokenizer(default_model_path(), "gguf").save_pretrained(tok_dir)
    out = {}
    for seed in (0, 1):
        path = root / f"tiny-{seed}"
        model = save_hf_model("llama", path, seed=seed)
        for f in tok_dir.iterdir():
            shutil.copy(f, path / f.name)
        out[seed] = (path, model, _greedy(model))
    assert out[0][2] != out[1][2], "the two checkpoints should answer differently"
    other = hf_config("llama")
    other.intermediate_size = 32
    transformers.AutoModelForCausalLM.from_config(other).save_pretrained(root / "narrow")
    out["narrow"] = root / "narrow"
    return out


@pytest.fixture(scope="module")
def client(models):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
        with launch("real", ["--model", str(models[0][0])], base_args=ARGS) as server:
            with httpx.Client(base_url=server.url, timeout=300) as c:
                yield c


def _answers(client) -> list[list[int]]:
    resp = client.post("/generate", json={"input_ids": [PROMPT] * 4, "sampling_params": {
        "max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}})
    assert resp.status_code == 200, resp.text
    return [r["output_ids"] for r in resp.json()]


def test_serves_on_two_replicas(client, models):
    info = client.get("/get_server_info").json()
    assert info["data_parallel_size"] == 2
    assert _answers(client) == [models[0][2]] * 4


def test_update_weights_from_disk_every_replica(client, models):
    ok = client.post("/update_weights_from_disk", json={"model_path": str(models[1][0])})
    assert ok.json() == {"success": True, "message": "Succeeded to update model weights."}
    assert _answers(client) == [models[1][2]] * 4
    bad = client.post("/update_weights_from_disk", json={"model_path": str(models["narrow"])})
    assert bad.status_code == 400 and bad.json()["success"] is False
    assert bad.json()["message"].endswith("Rolling back to original weights.")
    assert _answers(client) == [models[1][2]] * 4


def test_update_weights_from_tensors_every_replica(client, models):
    """Seed 0's tensors sent back over LMDeploy's route, in two safetensors calls."""
    from safetensors.torch import save

    state = models[0][1].state_dict()
    names = sorted(state)
    half = len(names) // 2
    for part, finished in ((names[:half], False), (names[half:], True)):
        payload = base64.b64encode(save({n: state[n].contiguous() for n in part})).decode()
        resp = client.post("/update_weights", json={"serialized_named_tensors": payload,
                                                    "finished": finished})
        assert resp.status_code == 200 and resp.json() is None, resp.text
        if not finished:
            assert _answers(client) == [models[1][2]] * 4  # staged, not yet serving
    assert _answers(client) == [models[0][2]] * 4
    bad = base64.b64encode(save({"lm_head.weight": state["lm_head.weight"][:3]})).decode()
    assert_json_error(client.post("/update_weights", json={"serialized_named_tensors": bad,
                                                           "finished": True}))
    assert _answers(client) == [models[0][2]] * 4


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wakeup_every_replica(client, models, level):
    before = _answers(client)
    assert client.post("/sleep", params={"level": level}).status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": True}
    assert_json_error(client.post("/generate", json={"input_ids": PROMPT}), 503, 503)
    assert client.post("/wakeup").status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": False}
    # level 2 reloads from the last model_path (seed 1); level 1 keeps what served
    assert _answers(client) == (before if level == 1 else [models[1][2]] * 4)
