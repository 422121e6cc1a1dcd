"""Error paths of GGUF and Orbax loading, and what their messages say."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.default import default_model_path
from model.gguf import read_gguf
from model.loader import load_model
from model.orbax_io import read_orbax


def test_missing_gguf_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(missing, with_tokenizer=False)


def test_corrupt_gguf_is_a_clear_value_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ValueError, match=r"junk\.gguf is not a valid GGUF file"):
        read_gguf(junk)
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        load_model(junk, with_tokenizer=False)


def test_truncated_gguf_is_a_clear_value_error(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        cut.write_bytes(f.read(1 << 20))  # header and metadata intact, tensors cut off
    with pytest.raises(ValueError, match=r"cut\.gguf is not a valid GGUF file"):
        read_gguf(cut)


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'bert'") as info:
        read_gguf(path)
    assert "llama" in str(info.value)  # lists what is supported


def test_orbax_folder_without_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"no orbax/ checkpoint in .*convert_hf\.py"):
        read_orbax(tmp_path)
    # the loader sees neither orbax/ nor safetensors and says what it looked for
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_model(tmp_path, with_tokenizer=False)


def test_orbax_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="converted model folder not found"):
        read_orbax(tmp_path / "absent")
    (tmp_path / "orbax").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_orbax(tmp_path)
