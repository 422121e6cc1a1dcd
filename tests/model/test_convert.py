"""tools/convert_hf.py: HF folder / GGUF -> config.json + tokenizer + orbax/.

The converted folder must give bit-identical weights and logits to its source.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

from model import api  # noqa: E402
from model.attention import AttentionMetadata, KVCache  # noqa: E402
from model.default import default_model_path, minilm_path  # noqa: E402
from model.loader import load_model  # noqa: E402
from tests.model.tiny_hf import save_hf_model  # noqa: E402
from tools.convert_hf import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
TOKENS = [1, 5, 9, 17, 33, 64, 100, 127, 3, 2, 50]


def _logits(loaded, tokens=TOKENS) -> np.ndarray:
    """Prefill logits of one sequence, every position: [len(tokens), vocab]."""
    config, page_size = loaded.config, 16
    num_pages = -(-len(tokens) // page_size)
    dtype = jax.tree.leaves(loaded.state)[0].dtype
    cache = KVCache.zeros(config.num_layers, num_pages + 1, page_size, config.num_kv_heads,
                          config.head_dim, dtype)
    pos = np.arange(len(tokens))
    md = AttentionMetadata(
        block_tables=jnp.arange(1, num_pages + 1, dtype=jnp.int32)[None],
        seq_lens=jnp.asarray([len(tokens)], jnp.int32),
        query_start_loc=jnp.asarray([0, len(tokens)], jnp.int32),
        slot_mapping=jnp.asarray(page_size + pos, jnp.int32),
        max_q_len=len(tokens))
    hidden, _ = api.forward(loaded.graphdef, loaded.state, jnp.asarray(tokens, jnp.int32),
                            jnp.asarray(pos, jnp.int32), cache, md)
    return np.asarray(api.compute_logits(loaded.graphdef, loaded.state, hidden))


def _assert_same_weights(a, b):
    leaves_a = jax.tree_util.tree_leaves_with_path(a.state)
    leaves_b = dict(jax.tree_util.tree_leaves_with_path(b.state))
    assert len(leaves_a) == len(leaves_b)
    for path, value in leaves_a:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(leaves_b[path]),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama folder with a borrowed (MiniLM) tokenizer + chat template."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    save_hf_model("llama", folder)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_tiny_llama_float32_is_bit_identical(tiny_llama, tmp_path):
    out = tmp_path / "converted"
    assert main([str(tiny_llama), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "orbax").is_dir()
    source = load_model(tiny_llama)
    converted = load_model(out)
    assert converted.format == "orbax"
    assert converted.config == source.config
    _assert_same_weights(source, converted)
    np.testing.assert_array_equal(_logits(converted), _logits(source))
    assert converted.tokenizer.chat_template == TEMPLATE
    assert converted.tokenizer("hello world").input_ids == source.tokenizer("hello world").input_ids


def test_tiny_llama_bfloat16(tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    assert main([str(tiny_llama), str(out), "--dtype", "bfloat16"]) == 0
    from model.orbax_io import read_orbax

    config, pure = read_orbax(out)
    assert config["torch_dtype"] == "bfloat16"
    assert {leaf.dtype.name for leaf in jax.tree.leaves(pure)} == {"bfloat16"}
    bf16 = _logits(load_model(out, "bfloat16", with_tokenizer=False)).astype(np.float32)
    f32 = _logits(load_model(tiny_llama, with_tokenizer=False))
    np.testing.assert_allclose(bf16, f32, atol=0.1, rtol=0.05)


def test_refuses_existing_checkpoint_and_bad_input(tiny_llama, tmp_path, capsys):
    out = tmp_path / "twice"
    assert main([str(tiny_llama), str(out)]) == 0
    assert main([str(tiny_llama), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(tiny_llama), str(out), "--force"]) == 0
    assert main([str(tmp_path / "absent"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(out), str(tmp_path / "y")]) == 2  # already converted
    assert "already a converted" in capsys.readouterr().err


def test_help_via_subprocess():
    result = subprocess.run([sys.executable, "tools/convert_hf.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ("SOURCE", "OUT_DIR", "--dtype", "bfloat16", ".gguf"):
        assert word.lower() in result.stdout.lower(), word


@pytest.mark.slow
def test_smollm2_gguf_is_bit_identical(tmp_path):
    source_path = default_model_path()
    out = tmp_path / "smollm2"
    assert main([source_path, str(out)]) == 0
    source = load_model(source_path)
    converted = load_model(out)
    assert converted.config == source.config
    _assert_same_weights(source, converted)
    np.testing.assert_array_equal(_logits(converted), _logits(source))
    assert converted.tokenizer.chat_template == source.tokenizer.chat_template
    messages = [{"role": "user", "content": "Hi there"}]
    assert (converted.tokenizer.apply_chat_template(messages, tokenize=False)
            == source.tokenizer.apply_chat_template(messages, tokenize=False))
