"""Start-up time of a server: launch -> /health 200 (ready) -> first streamed token.

Launches the command after ``--``, polls ``--health-path`` every 0.1 s, then sends
one streaming completion (``--prompt-len`` token ids, 1..N output tokens) and
records when its first token arrives. After ready it reads the server's own
per-phase times, the ``"startup"`` object of ``GET /get_server_info`` (load,
tokenizer, trace, compile, ready, programs, compiles after ready; ``null``
where the server has none), and reads it again after the first request (were
there compiles on the first request?). Leaves the server running with
``--keep`` (prints its pid, also in the JSON), else terminates it.

``--runs cold,warm`` launches the command once per entry with the same cache
folder (``--cache-dir``, default a new temporary folder, removed at the end
unless given): the command gets ``--compile-cache-dir DIR/xla`` appended and the
environment ``JAX_SERVE_KERNEL_CACHE=DIR/kernels``,
``JAX_SERVE_TOKENIZER_CACHE=DIR/tokenizer`` and ``JAX_SERVE_CACHE=DIR/models``,
so a ``cold`` run starts with every cache empty (before it, those four
folders are removed, nothing else under DIR; a given ``--cache-dir`` must be
empty or new when the first run is cold) and a ``warm`` run reuses what the
runs before it wrote. The JSON then holds one
entry per run: ``run``, ``ready_s``, ``first_token_s``, ``first_request_ttft_s``,
``startup`` (the server's phases) and ``phases`` (the same keys, ``null`` when
missing).

The commands behind BENCHMARKS.md's start-up rows (cold then warm, back to back)::

    # the default command (embedded SmolLM2, defaults)
    python tools/bench_startup.py --port 8311 --runs cold,warm --json startup-default.json \\
        --log /tmp/startup-default.log -- python -m serving.main --port 8311

    # the fastest CPU flags
    python tools/bench_startup.py --port 8311 --runs cold,warm --json startup-fast.json \\
        --log /tmp/startup-fast.log -- python -m serving.main --port 8311 \\
        --quantization w8a8_int8 --kv-cache-dtype bfloat16

One launch, no cache handling (the command's own flags apply)::

    python tools/bench_startup.py --port 8311 -- python -m serving.main --port 8311 \\
        --max-num-seqs 32 --max-model-len 512 --compile-cache-dir "$(mktemp -d)"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx

# The keys of /get_server_info's "startup" object this tool reports as phases.
PHASES = ("load_s", "tokenizer_s", "trace_s", "compile_s", "ready_s", "programs",
          "compiles_after_ready")
# Cache folders under --cache-dir: (name, how the server is told).
CACHE_ENV = {"kernels": "JAX_SERVE_KERNEL_CACHE", "tokenizer": "JAX_SERVE_TOKENIZER_CACHE",
             "models": "JAX_SERVE_CACHE"}
RUN_KINDS = ("cold", "warm")


def _server_startup(base: str) -> dict | None:
    """The ``startup`` object of /get_server_info, or None (absent, error, not JSON)."""
    try:
        r = httpx.get(base + "/get_server_info", timeout=30)
        if r.status_code != 200:
            return None
        startup = r.json().get("startup")
        return startup if isinstance(startup, dict) else None
    except (httpx.HTTPError, ValueError):
        return None


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def launch_once(cmd: list[str], args, *, env: dict | None = None, log_path: str | None = None,
                keep: bool = False) -> dict:
    """One launch: ready, first token, the server's phases. Stops the server unless ``keep``.

    Raises:
      RuntimeError: the server exited, or was not ready / gave no token in ``--timeout``.
    """
    base = f"http://{args.host}:{args.port}"
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    ready = first = ttft = None
    ok = False
    try:
        while time.perf_counter() - t0 < args.timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}"
                                   + (f" (log: {log_path})" if log_path else ""))
            try:
                if httpx.get(base + args.health_path, timeout=2).status_code == 200:
                    ready = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        if ready is None:
            raise RuntimeError("not ready before --timeout")
        startup = _server_startup(base)
        model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
        body = {"model": model, "prompt": [1000 + i for i in range(args.prompt_len)],
                "max_tokens": args.max_tokens, "stream": True, "temperature": 0.0}
        t_req = time.perf_counter()
        left = max(1.0, args.timeout - (t_req - t0))
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=left) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data:") and '"text"' in line and first is None:
                    first = time.perf_counter() - t0
                    ttft = time.perf_counter() - t_req
        if first is None:
            raise RuntimeError("the first request streamed no token")
        after = _server_startup(base)
        res = {"cmd": cmd, "ready_s": ready, "first_token_s": first,
               "first_request_ttft_s": ttft, "startup": startup,
               "phases": {k: (startup or {}).get(k) for k in PHASES},
               "compiles_after_first_request": (after or {}).get("compiles_after_ready")}
        if keep:
            res["pid"] = proc.pid
        ok = True
        return res
    finally:
        if not (keep and ok):
            _stop(proc)
        if log is not subprocess.DEVNULL:
            log.close()


def _empty(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def run_series(cmd: list[str], args) -> dict:
    """``--runs``: each run launches ``cmd`` with caches under one folder."""
    if "--compile-cache-dir" in cmd or any(c.startswith("--compile-cache-dir=") for c in cmd):
        raise SystemExit("bench_startup: with --runs, leave --compile-cache-dir out of the "
                         "command (it is set to CACHE_DIR/xla)")
    made = args.cache_dir is None
    cache = args.cache_dir or tempfile.mkdtemp(prefix="jax-serve-startup-")
    if not made and not _empty(cache) and args.runs[0] == "cold":
        raise SystemExit(f"bench_startup: --cache-dir {cache} is not empty; a cold run needs "
                         "an empty or new folder")
    os.makedirs(cache, exist_ok=True)
    subdirs = {"xla": os.path.join(cache, "xla"),
               **{name: os.path.join(cache, name) for name in CACHE_ENV}}
    env = dict(os.environ)
    env.update({var: subdirs[name] for name, var in CACHE_ENV.items()})
    full_cmd = [*cmd, "--compile-cache-dir", subdirs["xla"]]
    runs = []
    try:
        for i, kind in enumerate(args.runs):
            if kind == "cold":
                for path in subdirs.values():  # only the folders this tool names
                    shutil.rmtree(path, ignore_errors=True)
            log_path = None
            if args.log:
                root, ext = os.path.splitext(args.log)
                log_path = f"{root}.{i}-{kind}{ext or '.log'}"
            last = i == len(args.runs) - 1
            entry = {"run": kind}
            try:
                entry.update(launch_once(full_cmd, args, env=env, log_path=log_path,
                                         keep=args.keep and last))
            except (RuntimeError, httpx.HTTPError) as e:
                entry.update(error=f"{type(e).__name__}: {e}", ready_s=None,
                             first_token_s=None, first_request_ttft_s=None, startup=None,
                             phases={k: None for k in PHASES})
            entry["log"] = log_path
            runs.append(entry)
            print(f"{kind}: ready {_fmt(entry.get('ready_s'))}, first token "
                  f"{_fmt(entry.get('first_token_s'))}" +
                  (f" ({entry['error']})" if "error" in entry else ""), file=sys.stderr)
    finally:
        if made and not args.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
    return {"cmd": full_cmd, "cache_dir": cache,
            "cache_env": {var: subdirs[name] for name, var in CACHE_ENV.items()},
            "runs": runs}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}s"


def _runs(text: str) -> list[str]:
    runs = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUN_KINDS]
    if not runs or bad:
        raise argparse.ArgumentTypeError(f"--runs takes a comma list of {RUN_KINDS}, got {text!r}")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--health-path", default="/health")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    ap.add_argument("--log", default=None,
                    help="server stdout+stderr go here (with --runs: LOG-stem.N-KIND.ext)")
    ap.add_argument("--keep", action="store_true", help="leave the (last) server running")
    ap.add_argument("--runs", type=_runs, default=None,
                    help="comma list of cold/warm launches sharing --cache-dir, e.g. cold,warm")
    ap.add_argument("--cache-dir", default=None,
                    help="with --runs: the cache folder (default: a new temporary one)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="with --runs: keep the temporary cache folder")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- server command")
    args = ap.parse_args(argv)
    # A SIGTERM (e.g. from `timeout`) unwinds through the finally blocks, so the
    # server (its own process group) is stopped rather than left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        ap.error("give the server command after --")
    if args.runs is None:
        if args.cache_dir:
            ap.error("--cache-dir needs --runs")
        res = launch_once(cmd, args, log_path=args.log, keep=args.keep)
        failed = False
    else:
        res = run_series(cmd, args)
        failed = any("error" in r for r in res["runs"])
    print(json.dumps(res, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    if args.keep and "pid" in (res if args.runs is None else (res["runs"] or [{}])[-1]):
        pid = res["pid"] if args.runs is None else res["runs"][-1]["pid"]
        print(f"server pid {pid}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
