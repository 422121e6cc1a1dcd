"""``serialized_named_tensors`` decoding: every accepted format, and the refusals."""

from __future__ import annotations

import base64
import io
import os
import pickle

import numpy as np
import pytest
import torch

from serving.api.weight_payload import PayloadError, decode_named_tensors


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickled_torch_and_numpy(protocol):
    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    f32 = torch.randn(2, 5)[:, 1:]  # a non-contiguous view
    out = decode_named_tensors(_b64(pickle.dumps([("a", bf16), ("b", f32)], protocol=protocol)))
    assert np.array_equal(out["a"].astype(np.float32), bf16.float().numpy())
    assert np.array_equal(out["b"], f32.numpy())
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(decode_named_tensors(_b64(pickle.dumps({"n": arr}, protocol=protocol)),
                                               "pickle")["n"], arr)


def test_safetensors_torch_save_json_and_lists():
    from safetensors.numpy import save
    from safetensors.torch import save as torch_save

    x = np.random.rand(2, 3).astype(np.float32)
    assert np.array_equal(decode_named_tensors(_b64(save({"x": x})))["x"], x)
    bf16 = torch.randn(4).to(torch.bfloat16)
    got = decode_named_tensors(_b64(torch_save({"y": bf16})))["y"]
    assert got.dtype.name == "bfloat16" and np.array_equal(got.astype(np.float32),
                                                           bf16.float().numpy())
    buf = io.BytesIO()
    torch.save([("z", torch.ones(2))], buf)
    assert decode_named_tensors(_b64(buf.getvalue()))["z"].tolist() == [1.0, 1.0]
    merged = decode_named_tensors([_b64(save({"x": x})), _b64(save({"w": x}))])
    assert set(merged) == {"x", "w"}
    js = decode_named_tensors({"a": [[1, 2]], "b": {"data": _b64(np.ones(2, "<f4").tobytes()),
                                                    "dtype": "float32", "shape": [2]}})
    assert js["a"].shape == (1, 2) and js["b"].tolist() == [1.0, 1.0]
    assert decode_named_tensors({}) == {} and decode_named_tensors([]) == {}


def test_refusals(tmp_path):
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing.reductions import reduce_tensor

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = [
        (_b64(pickle.dumps([("a", Evil())])), "refused to unpickle"),
        (_b64(bytes(ForkingPickler.dumps([("a", reduce_tensor(torch.zeros(2)))]))),
         "CUDA IPC handle"),
        (_b64(pickle.dumps([("a", 3)])), "not a tensor"),
        (_b64(pickle.dumps([("a", np.array([object()]))])), "refused to unpickle"),
        (_b64(b"plain bytes"), "cannot tell the payload's format"),
        ("not base64!", "not valid base64"),
        (5, "must be a base64 string"),
        ({"a": "x"}, "not a nested list of numbers"),
        ({"a": {"data": "AA==", "dtype": "object", "shape": [1]}}, "unsupported dtype"),
    ]
    for payload, words in bad:
        with pytest.raises(PayloadError, match=words):
            decode_named_tensors(payload)
    with pytest.raises(PayloadError, match="flattened buckets"):
        decode_named_tensors("AA==", "flattened_bucket")
    assert not marker.exists()
