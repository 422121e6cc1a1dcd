"""Start-up time of a server: launch -> /health 200 (ready) -> first streamed token.

Launches the command after ``--``, polls ``--health-path`` every 0.1 s, then sends
one streaming completion (``--prompt-len`` token ids, 1..N output tokens) and
records when its first token arrives. Leaves the server running with
``--keep`` (prints its pid), else terminates it.

    # cold: a fresh JAX compilation cache dir
    python tools/bench_startup.py --port 8311 -- python -m serving.main --port 8311 \\
        --max-num-seqs 32 --max-model-len 512 --compile-cache-dir "$(mktemp -d)"
    # warm: run the same command again with the same cache dir
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import httpx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--health-path", default="/health")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--log", default=None, help="server stdout+stderr go here")
    ap.add_argument("--keep", action="store_true", help="leave the server running")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- server command")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        ap.error("give the server command after --")
    base = f"http://{args.host}:{args.port}"
    log = open(args.log, "w") if args.log else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ready = first = None
    try:
        while time.perf_counter() - t0 < args.timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(base + args.health_path, timeout=2).status_code == 200:
                    ready = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        if ready is None:
            raise RuntimeError("not ready before --timeout")
        model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
        body = {"model": model, "prompt": [1000 + i for i in range(args.prompt_len)],
                "max_tokens": args.max_tokens, "stream": True, "temperature": 0.0}
        t_req = time.perf_counter()
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=args.timeout) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data:") and '"text"' in line and first is None:
                    first = time.perf_counter() - t0
                    ttft = time.perf_counter() - t_req
        res = {"cmd": cmd, "ready_s": ready, "first_token_s": first, "first_request_ttft_s": ttft}
        print(json.dumps(res, indent=2))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(res, f, indent=2)
        if args.keep:
            print(f"server pid {proc.pid}", file=sys.stderr)
    finally:
        if not args.keep or ready is None or first is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
