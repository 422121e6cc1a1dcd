"""Helpers for sharding tests: N simulated CPU devices in a subprocess, a tiny Qwen3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def device_env(num_devices: int = 8) -> dict:
    """A fresh environment whose jax sees ``num_devices`` CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# token-id prompts (SmolLM2's vocabulary; the tiny Qwen3 shares its tokenizer)
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 2683, 549, 2016, 30, 216],
           [1, 416, 253, 1123, 24, 2, 7, 9, 31, 77], [1, 5248, 42, 12]]


def engine_memory(model: str, specs: list[str], timeout: float = 900) -> dict[str, dict]:
    """Runs ``engine_memory.py`` for ``["tp:dp", ...]``; returns results keyed by spec."""
    proc = subprocess.run([sys.executable, str(HERE / "engine_memory.py"), model, *specs],
                          env=device_env(8), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return {f"{r['tp']}:{r['dp']}": r for r in lines}


def convert_default_model(folder: Path) -> Path:
    """SmolLM2 (the embedded GGUF, dequantized) as a float32 converted folder.

    Servers start faster from it than from the GGUF (no GGUF parsing of the
    tokenizer and weights per process); the weights are the same float32 values.
    """
    from model.default import default_model_path
    from tools.convert_hf import convert

    return convert(default_model_path(), folder, "float32")


def make_tiny_qwen3(folder: Path, tokenizer_from: Path | None = None) -> Path:
    """A random 2-layer Qwen3 (16 q heads, 8 KV heads) with SmolLM2's tokenizer.

    Args:
      folder: where to write it.
      tokenizer_from: a folder holding SmolLM2's tokenizer files (e.g.
        ``convert_default_model``'s); default: load it from the embedded GGUF.
    """
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from model.loader import load_model

    tok = (AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from is not None
           else load_model(None, with_tokenizer=True).tokenizer)
    config = Qwen3Config(vocab_size=49152, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=32, max_position_embeddings=512, initializer_range=0.2,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
