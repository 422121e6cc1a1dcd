"""Helpers for sharding tests: subprocesses with N simulated CPU devices, a tiny Qwen3."""

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


def run_engine(model: str, specs: list[str], timeout: float = 900) -> dict[str, dict]:
    """Runs ``run_engine.py`` for ``["tp:dp", ...]``; returns results keyed by spec."""
    proc = subprocess.run([sys.executable, str(HERE / "run_engine.py"), model, *specs],
                          env=device_env(8), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return {f"{r['tp']}:{r['dp']}": r for r in lines}


def make_tiny_qwen3(folder: Path) -> Path:
    """A random 2-layer Qwen3 (16 q heads, 8 KV heads) with SmolLM2's tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from model.loader import load_model

    tok = load_model(None, with_tokenizer=True).tokenizer
    config = Qwen3Config(vocab_size=49152, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=32, max_position_embeddings=512, initializer_range=0.2,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
