"""Load generator for any OpenAI-compatible completion server (jax-serve, vLLM, llama-server).

Sends synthetic prompts of exactly ``--input-len`` tokens (SmolLM2 tokenizer by
default), streams every response over SSE, timestamps every chunk and reports
time to first token (TTFT), inter-token latency (ITL, gap between successive
streamed tokens), time per output token (TPOT, (e2e - ttft) / (tokens - 1)),
end-to-end latency, output tokens/s, requests/s and failures.

Load is either closed-loop (``--concurrency N``: N requests always in flight)
or open-loop (``--request-rate R``: Poisson arrivals at R requests/s, optionally
capped by ``--concurrency``). Warm-up requests run first and are not measured.

Examples::

    # jax-serve on :8000, 32 requests in flight, 128-token prompts, 128 tokens out
    python tools/bench_serving.py --base-url http://127.0.0.1:8000 \\
        --concurrency 32 --num-prompts 96 --input-len 128 --output-len 128 --ignore-eos

    # llama.cpp's llama-server, Poisson arrivals at 2 req/s, JSON result
    python tools/bench_serving.py --base-url http://127.0.0.1:8080 --request-rate 2 \\
        --num-prompts 64 --ignore-eos --json out.json

Prompts: ``--prompt-format ids`` (default for /v1/completions) sends token-id
lists, which both jax-serve and llama-server accept, so the server sees
exactly input-len tokens; ``text`` sends a string built from single-token
words whose re-tokenization was checked to be exactly input-len tokens (chat
adds the template's tokens on top). Each prompt is different from its first
token on, so prefix caches do not help (use ``--shared-prefix-len`` to test them).

``--ignore-eos`` sends ``ignore_eos: true`` (vLLM/jax-serve and llama-server
both read it) and ``n_predict`` (llama-server's name for max_tokens) next to
``max_tokens``; ``min_tokens`` is also sent so vLLM-style servers cannot stop early.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import httpx


# --------------------------------------------------------------------------- prompts
def load_default_tokenizer():
    from model.default import default_model_path
    from model.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path(), "gguf")


def _word_pool(tok) -> list[int]:
    """Token ids that are a space + ASCII letters: they re-tokenize one to one."""
    pool = []
    for piece, tid in tok.get_vocab().items():
        if len(piece) >= 3 and piece[0] in ("\u0120", "\u2581") and piece[1:].isascii() \
                and piece[1:].isalpha() and piece[1:].islower():
            pool.append(tid)
    return sorted(pool)


def build_prompts(tok, n: int, input_len: int, seed: int, fmt: str,
                  shared_prefix_len: int = 0) -> list:
    """n prompts of exactly input_len tokens each (ids) or strings that encode to that."""
    rng = random.Random(seed)
    pool = _word_pool(tok)
    prefix = [rng.choice(pool) for _ in range(shared_prefix_len)]
    out = []
    for _ in range(n):
        for _attempt in range(50):
            ids = prefix + [rng.choice(pool) for _ in range(input_len - len(prefix))]
            if fmt == "ids":
                out.append(ids)
                break
            text = tok.decode(ids)
            if len(tok.encode(text, add_special_tokens=False)) == input_len:
                out.append(text)
                break
        else:
            raise RuntimeError("could not build a text prompt with the exact token count")
    return out


# --------------------------------------------------------------------------- requests
@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # seconds since start, per token chunk
    itl: list[float] = field(default_factory=list)


def make_payload(args, model: str, prompt) -> tuple[str, dict]:
    body: dict = {"model": model, "stream": True, "max_tokens": args.output_len,
                  "temperature": args.temperature,
                  "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body.update(ignore_eos=True, n_predict=args.output_len, min_tokens=args.output_len)
    if args.extra_body:
        body.update(json.loads(args.extra_body))
    if args.endpoint == "chat":
        content = prompt if isinstance(prompt, str) else None
        body["messages"] = [{"role": "user", "content": content}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _delta_text(choice: dict) -> Optional[str]:
    if "text" in choice:
        return choice.get("text")
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content")


async def one_request(client: httpx.AsyncClient, args, model: str, prompt) -> RequestResult:
    path, body = make_payload(args, model, prompt)
    res = RequestResult(start=time.perf_counter())
    usage_tokens = None
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - res.start
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])[:200]
                    return res
                if msg.get("usage"):
                    usage_tokens = msg["usage"].get("completion_tokens", usage_tokens)
                for choice in msg.get("choices") or []:
                    text = _delta_text(choice)
                    if text:  # a chunk that carries generated text = one or more tokens
                        res.chunk_times.append(now)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.e2e = time.perf_counter() - res.start
    if not res.chunk_times:
        res.error = "no tokens streamed"
        return res
    res.ttft = res.chunk_times[0]
    res.itl = [b - a for a, b in zip(res.chunk_times, res.chunk_times[1:])]
    res.output_tokens = usage_tokens if usage_tokens else len(res.chunk_times)
    res.ok = True
    return res


# --------------------------------------------------------------------------- load
async def run_load(args, model: str, prompts: list, warmup_prompts: list
                   ) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=max(args.concurrency or 0, 256) + 8,
                          max_keepalive_connections=max(args.concurrency or 0, 256) + 8)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, timeout=httpx.Timeout(args.timeout),
                                 limits=limits, headers=headers) as client:
        if args.warmup:
            wn = max(1, args.warmup)
            warm = await asyncio.gather(*[one_request(client, args, model, w)
                                          for w in warmup_prompts[:wn]])
            bad = [w.error for w in warm if not w.ok]
            if bad:
                print(f"warm-up failures: {bad[:3]}", file=sys.stderr)
        sem = asyncio.Semaphore(args.concurrency) if args.concurrency else None
        rng = random.Random(args.seed + 1)

        async def limited(p):
            if sem is None:
                return await one_request(client, args, model, p)
            async with sem:
                return await one_request(client, args, model, p)

        t0 = time.perf_counter()
        tasks = []
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(limited(p)))
            if args.request_rate and math.isfinite(args.request_rate) and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft * 1e3 for r in ok]
    e2e = [r.e2e * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) * 1e3 / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]

    def stats(xs):
        return {"mean": statistics.fmean(xs) if xs else float("nan"),
                "p50": _pct(xs, 50), "p90": _pct(xs, 90), "p99": _pct(xs, 99)}

    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else float("nan"),
        "request_throughput": len(ok) / duration if duration > 0 else float("nan"),
        "mean_output_tokens": out_tokens / len(ok) if ok else 0,
        "streamed_chunks_per_request": statistics.fmean(len(r.chunk_times) for r in ok) if ok else 0,
        "ttft_ms": stats(ttft), "itl_ms": stats(itl), "tpot_ms": stats(tpot), "e2e_ms": stats(e2e),
    }


def print_table(s: dict, args, model: str) -> None:
    load = f"concurrency {args.concurrency}" if not args.request_rate else \
        f"rate {args.request_rate}/s" + (f" (max {args.concurrency} in flight)" if args.concurrency else "")
    print(f"== {args.base_url} model={model} endpoint={args.endpoint} {load} "
          f"in={args.input_len} out={args.output_len} ignore_eos={args.ignore_eos}")
    print(f"{'completed / failed':<28}{s['completed']} / {s['failed']}")
    for e in s["errors"]:
        print(f"  error: {e}")
    print(f"{'duration (s)':<28}{s['duration_s']:.2f}")
    print(f"{'output tokens':<28}{s['output_tokens']} (mean {s['mean_output_tokens']:.1f}/req, "
          f"{s['streamed_chunks_per_request']:.1f} chunks/req)")
    print(f"{'output tokens/s':<28}{s['output_tokens_per_s']:.2f}")
    print(f"{'requests/s':<28}{s['request_throughput']:.3f}")
    print(f"{'metric (ms)':<28}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for k, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")):
        v = s[k]
        print(f"{name:<28}{v['mean']:>10.1f}{v['p50']:>10.1f}{v['p90']:>10.1f}{v['p99']:>10.1f}")


def first_model(base_url: str, api_key: Optional[str]) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    ap.add_argument("--model", default=None, help="model name to send; default: first of /v1/models")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="requests in flight (closed loop); with --request-rate: a cap")
    ap.add_argument("--request-rate", type=float, default=None,
                    help="Poisson arrival rate in requests/s (open loop); default: all at once")
    ap.add_argument("--num-prompts", type=int, default=32, help="measured requests")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    ap.add_argument("--output-len", type=int, default=128, help="max_tokens")
    ap.add_argument("--shared-prefix-len", type=int, default=0,
                    help="first N prompt tokens are the same in every prompt")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="generate exactly output-len tokens (ignore_eos, n_predict, min_tokens)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--prompt-format", choices=["ids", "text"], default=None,
                    help="token-id list or text; default ids for completions, text for chat")
    ap.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests sent first (0: none)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None, help="write summary (+ args) here")
    ap.add_argument("--label", default="", help="free text stored in the JSON")
    args = ap.parse_args(argv)
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 1
    if args.prompt_format is None:
        args.prompt_format = "ids" if args.endpoint == "completions" else "text"
    if args.endpoint == "chat" and args.prompt_format == "ids":
        ap.error("chat needs --prompt-format text")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model = args.model or first_model(args.base_url, args.api_key)
    tok = load_default_tokenizer()
    # warm-up prompts are distinct from the measured ones (no prefix-cache hits from warm-up)
    prompts = build_prompts(tok, args.num_prompts + args.warmup, args.input_len, args.seed,
                            args.prompt_format, args.shared_prefix_len)
    warmup_prompts, prompts = prompts[:args.warmup], prompts[args.warmup:]
    results, duration = asyncio.run(run_load(args, model, prompts, warmup_prompts))
    s = summarize(results, duration)
    print_table(s, args, model)
    if args.json_out:
        with open(args.json_out, "w") as f:
            t0 = min((r.start for r in results), default=0.0)
            per_request = [{"start_s": round(r.start - t0, 4), "ttft_s": round(r.ttft, 4),
                            "e2e_s": round(r.e2e, 4), "output_tokens": r.output_tokens,
                            "error": r.error} for r in results]
            json.dump({"args": vars(args), "model": model, "summary": s,
                       "label": args.label, "requests": per_request}, f, indent=2)
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
