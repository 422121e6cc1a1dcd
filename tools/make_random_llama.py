"""Writes a random-weight Llama checkpoint (Hugging Face folder, safetensors) with a tokenizer.

For serving benchmarks at a realistic size without downloading weights: the
defaults are a ~1B-class Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads,
MLP 5632, vocab 32000, untied: 0.85e9 parameters, 1.7 GB in bfloat16; about
20 s to write on 2 CPU cores). The
tokenizer is SmolLM2's (the embedded GGUF's, as the engine tests use) cut to
``--vocab-size`` ids: its BPE vocabulary is ordered by merge, so keeping the
ids below the cut and the merges whose result is below it leaves a consistent
tokenizer (ids 0-16 are SmolLM2's special tokens, ``<|im_end|>`` = 2 is EOS).
A vocabulary larger than SmolLM2's 49152 keeps the whole tokenizer.

Examples::

    # ~1B (the device check's second serving model)
    python tools/make_random_llama.py --out /tmp/llama-1b
    # tiny, for tests
    python tools/make_random_llama.py --out /tmp/tiny --hidden-size 64 --num-layers 2 \\
        --num-heads 4 --num-kv-heads 2 --intermediate-size 96 --vocab-size 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SMOLLM2_VOCAB = 49152


def truncate_bpe(tokenizer_json: dict, vocab_size: int) -> dict:
    """A byte-level BPE ``tokenizer.json`` cut to ids ``< vocab_size``.

    Raises:
      ValueError: not a BPE model, or a kept merge uses a dropped token.
    """
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, got {model.get('type')!r}")
    vocab = {tok: i for tok, i in model["vocab"].items() if i < vocab_size}
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a + b in vocab:
            if a not in vocab or b not in vocab:
                raise ValueError(f"merge {a!r} + {b!r} keeps its result but drops a part")
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json.get("added_tokens", [])
                                      if t["id"] < vocab_size]
    return tokenizer_json


def write_tokenizer(out: Path, vocab_size: int) -> int:
    """Saves SmolLM2's tokenizer into ``out``, cut to ``vocab_size``; returns its size."""
    from model.default import default_model_path
    from model.tokenizer import load_tokenizer

    load_tokenizer(default_model_path(), "gguf").save_pretrained(str(out))
    if vocab_size < SMOLLM2_VOCAB:
        if vocab_size < 256 + 17:
            raise ValueError("--vocab-size must keep the 17 special tokens and 256 bytes "
                             "(>= 273)")
        path = out / "tokenizer.json"
        data = truncate_bpe(json.loads(path.read_text(encoding="utf-8")), vocab_size)
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(out)))


def make_config(a):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        head_dim=a.hidden_size // a.num_heads, max_position_embeddings=a.max_position_embeddings,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)


def write_model(a) -> dict:
    """Builds the random model and saves config + safetensors; returns a summary."""
    import torch
    import transformers

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = make_config(a)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(a.seed)
    # Allocate without transformers' (slow, 1B-element) init, then draw N(0, std).
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, a.init_std)
    model.eval()
    # (non-persistent buffers such as rotary inv_freq are left unset: not saved)
    num_params = sum(p.numel() for p in model.parameters())
    t_build = time.perf_counter() - t0
    model.save_pretrained(str(out), safe_serialization=True)
    t_save = time.perf_counter() - t0 - t_build
    tok_len = None if a.no_tokenizer else write_tokenizer(out, a.vocab_size)
    return {"out": str(out), "num_params": num_params, "dtype": a.dtype,
            "vocab_size": a.vocab_size, "tokenizer_len": tok_len,
            "build_s": round(t_build, 2), "save_s": round(t_save, 2),
            "total_s": round(time.perf_counter() - t0, 2),
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write (created)")
    ap.add_argument("--hidden-size", type=int, default=2048)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--num-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--intermediate-size", type=int, default=5632)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--max-position-embeddings", type=int, default=4096)
    ap.add_argument("--tie-word-embeddings", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true", help="weights and config only")
    ap.add_argument("--json", dest="json_out", default=None, help="write the summary here")
    a = ap.parse_args(argv)
    if a.hidden_size % a.num_heads or a.num_heads % a.num_kv_heads:
        ap.error("--hidden-size must divide by --num-heads, and --num-heads by --num-kv-heads")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = write_model(a)
    print(json.dumps(summary, indent=2))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
