"""tools/bench_startup.py against a fake server (a few-line http.server), both runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_startup.py"

# Answers /health (503 for the first 0.3 s), /v1/models, /get_server_info (a
# "startup" object saying whether its caches were empty at launch, unless
# --no-startup) and a streaming /v1/completions. Marks its caches as used.
FAKE_SERVER = textwrap.dedent('''
    import argparse, json, os, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--compile-cache-dir", default=None)
    ap.add_argument("--no-startup", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    caches = [a.compile_cache_dir] + [os.environ.get(v) for v in (
        "JAX_SERVE_KERNEL_CACHE", "JAX_SERVE_TOKENIZER_CACHE", "JAX_SERVE_CACHE")]
    used = {c: bool(c and os.path.exists(os.path.join(c, "used"))) for c in caches}
    for c in caches:
        if c:
            os.makedirs(c, exist_ok=True)
            open(os.path.join(c, "used"), "w").close()
    warm = all(used.values())
    startup = {"load_s": 0.01, "tokenizer_s": 0.02, "trace_s": 0.0 if warm else 0.5,
               "compile_s": 0.0 if warm else 1.5, "ready_s": 0.3, "programs": 4,
               "compiles_after_ready": 0, "caches_were_warm": warm,
               "cache_dirs": caches}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, obj, status=200):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._json({}, 200 if time.time() - t0 > 0.3 else 503)
            elif self.path == "/v1/models":
                self._json({"data": [{"id": "fake"}]})
            elif self.path == "/get_server_info":
                self._json({"version": "0"} if a.no_startup else {"startup": startup})
            else:
                self._json({"error": "no"}, 404)

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            req = json.loads(self.rfile.read(n))
            assert req["stream"] and len(req["prompt"]) == 8, req
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(req["max_tokens"]):
                chunk = {"choices": [{"index": 0, "text": f" t{i}"}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\\n\\n".encode())
                self.wfile.flush()
                time.sleep(0.01)
            self.wfile.write(b"data: [DONE]\\n\\n")
            self.close_connection = True

    ThreadingHTTPServer(("127.0.0.1", a.port), H).serve_forever()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_server(tmp_path):
    path = tmp_path / "fake_server.py"
    path.write_text(FAKE_SERVER)
    return path


def _run(port, *argv, timeout=60):
    return subprocess.run([sys.executable, str(TOOL), "--port", str(port), "--prompt-len", "8",
                           "--timeout", "30", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cold_then_warm_share_one_fresh_cache(fake_server, tmp_path):
    port = _free_port()
    out, cache = tmp_path / "startup.json", tmp_path / "cache"
    p = _run(port, "--runs", "cold,warm", "--cache-dir", str(cache), "--json", str(out),
             "--log", str(tmp_path / "server.log"), "--",
             sys.executable, str(fake_server), "--port", str(port))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["cmd"][-2:] == ["--compile-cache-dir", str(cache / "xla")]
    assert [r["run"] for r in res["runs"]] == ["cold", "warm"]
    cold, warm = res["runs"]
    for r in (cold, warm):
        assert 0.3 <= r["ready_s"] <= r["first_token_s"]
        assert 0 < r["first_request_ttft_s"] < r["first_token_s"]
        assert r["phases"]["programs"] == 4 and r["phases"]["compiles_after_ready"] == 0
        assert r["compiles_after_first_request"] == 0
        assert set(r["phases"]) == {"load_s", "tokenizer_s", "trace_s", "compile_s", "ready_s",
                                    "programs", "compiles_after_ready"}
        assert Path(r["log"]).is_file()
    # every cache the server was told about lives under --cache-dir, empty at the cold start
    assert cold["startup"]["cache_dirs"] == [str(cache / d) for d in
                                             ("xla", "kernels", "tokenizer", "models")]
    assert cold["startup"]["caches_were_warm"] is False
    assert warm["startup"]["caches_were_warm"] is True
    assert cold["phases"]["compile_s"] > warm["phases"]["compile_s"]


def test_missing_startup_info_is_null_and_temp_cache_removed(fake_server, tmp_path):
    port = _free_port()
    out = tmp_path / "startup.json"
    p = _run(port, "--runs", "cold", "--json", str(out), "--",
             sys.executable, str(fake_server), "--port", str(port), "--no-startup")
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["startup"] is None and set(run["phases"].values()) == {None}
    assert run["first_token_s"] is not None
    assert not Path(res["cache_dir"]).exists()  # a temporary cache is removed


def test_single_launch_keeps_the_old_output(fake_server, tmp_path):
    port = _free_port()
    out = tmp_path / "one.json"
    p = _run(port, "--json", str(out), "--", sys.executable, str(fake_server),
             "--port", str(port))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert {"cmd", "ready_s", "first_token_s", "first_request_ttft_s"} <= set(res)
    assert res["phases"]["load_s"] == 0.01


def test_runs_refuse_bad_input(fake_server, tmp_path):
    port = _free_port()
    p = _run(port, "--runs", "cold,hot", "--", "true")
    assert p.returncode == 2 and "--runs" in p.stderr
    p = _run(port, "--runs", "cold", "--", "server", "--compile-cache-dir", "/tmp/x")
    assert p.returncode != 0 and "--compile-cache-dir" in p.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "f").write_text("x")
    p = _run(port, "--runs", "cold", "--cache-dir", str(full), "--", "true")
    assert p.returncode != 0 and "not empty" in p.stderr
    assert (full / "f").exists()


def test_a_failed_launch_is_recorded(tmp_path):
    port = _free_port()
    out = tmp_path / "fail.json"
    p = _run(port, "--runs", "cold", "--json", str(out), "--", sys.executable, "-c",
             "raise SystemExit(3)")
    assert p.returncode == 1
    (run,) = json.loads(out.read_text())["runs"]
    assert "exited with 3" in run["error"] and run["ready_s"] is None
