"""Throughput of transformers' ``generate`` (torch, CPU) on the embedded SmolLM2 GGUF.

The peer for BENCHMARKS.md: a batch of N synthetic prompts of exactly
``--input-len`` tokens (same construction as tools/bench_serving.py), greedy,
``min_new_tokens = max_new_tokens = --output-len`` (ignore-EOS semantics), KV
cache on. Reports per batch size: wall time of prefill + decode, output
tokens/s (N * output_len / wall) and the time of a 1-token generate (~prefill).

    python tools/bench_hf_generate.py --batch-sizes 1,8,32 --json hf.json

The GGUF weights are dequantized to ``--dtype`` (float32 default) by
transformers. ``--threads`` sets torch's intra-op threads (default: all cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file; default: embedded SmolLM2")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (median)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)

    import os

    import torch
    from transformers import AutoModelForCausalLM

    from model.default import default_model_path
    from tools.bench_serving import build_prompts, load_default_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    folder, name = os.path.split(path)
    dtype = getattr(torch, args.dtype)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
    load_s = time.perf_counter() - t
    tok = load_default_tokenizer()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows = []
    with torch.inference_mode():
        for bs in sizes:
            prompts = build_prompts(tok, bs * (args.repeats + 1), args.input_len, args.seed + bs, "ids")
            runs, prefill = [], []
            for r in range(args.repeats + 1):  # run 0 is warm-up
                ids = torch.tensor(prompts[r * bs:(r + 1) * bs], dtype=torch.long)
                mask = torch.ones_like(ids)
                t = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1,
                               do_sample=False, pad_token_id=pad_id)
                p = time.perf_counter() - t
                t = time.perf_counter()
                out = model.generate(ids, attention_mask=mask, max_new_tokens=args.output_len,
                                     min_new_tokens=args.output_len, do_sample=False,
                                     pad_token_id=pad_id)
                wall = time.perf_counter() - t
                assert out.shape[1] - ids.shape[1] == args.output_len, out.shape
                if r:
                    runs.append(wall)
                    prefill.append(p)
            wall = statistics.median(runs)
            row = {"batch": bs, "wall_s": wall, "output_tokens_per_s": bs * args.output_len / wall,
                   "first_token_s": statistics.median(prefill),
                   "per_step_ms": 1e3 * wall / args.output_len}
            rows.append(row)
            print(f"batch {bs:>3}: {row['output_tokens_per_s']:8.1f} tok/s  wall {wall:7.2f} s  "
                  f"first token {row['first_token_s'] * 1e3:7.1f} ms  step {row['per_step_ms']:6.1f} ms",
                  flush=True)
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_s": load_s, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
