"""``python -m serving.main``: serve a model over the OpenAI-compatible HTTP API.

Flags are spelled as in vLLM (``vllm serve``), with SGLang's spellings as
aliases (``--model-path``, ``--tp-size``, ``--context-length``, ...). With no
flags the embedded default model (SmolLM2-135M-Instruct) is served on
``0.0.0.0:8000``: like vLLM, an unset ``--host`` listens on every interface.

Start-up: load the model (the port is not open yet), open the port, compile
every bucket (``/health`` answers 503 meanwhile, requests get 503), then log
``ready`` with the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from serving.config import ServerConfig
from serving.engine.config import DTYPES, EngineConfig

logger = logging.getLogger("serving.main")

# What /v1/models reports for the embedded default model when no name is given.
DEFAULT_SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line, vLLM names first and SGLang aliases second."""
    ap = argparse.ArgumentParser(prog="python -m serving.main",
                                 description="jax-serve: OpenAI-compatible LLM server in JAX")
    ap.add_argument("model_tag", nargs="?", default=None,
                    help="model to serve (positional form, as `vllm serve MODEL`)")
    g = ap.add_argument_group("model")
    g.add_argument("--model", "--model-path", dest="model", default=None,
                   help="HF folder, GGUF file or converted folder; default: embedded SmolLM2")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) the API accepts in `model`; the first is reported")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--kv-cache-dtype", default=None, choices=DTYPES,
                   help="KV cache storage; auto: the model's dtype. bfloat16 halves the cache's "
                        "bytes (llama.cpp's default cache is float16)")
    g.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int,
                   default=None)
    g.add_argument("--chat-template", default=None,
                   help="chat template: a file path or the Jinja template itself")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("engine")
    g.add_argument("--max-num-seqs", "--max-running-requests", dest="max_num_seqs", type=int,
                   default=None)
    g.add_argument("--max-num-batched-tokens", "--chunked-prefill-size",
                   dest="max_num_batched_tokens", type=int, default=None)
    g.add_argument("--block-size", "--page-size", dest="page_size", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", "--mem-fraction-static",
                   dest="gpu_memory_utilization", type=float, default=None)
    g.add_argument("--num-gpu-blocks-override", dest="num_pages", type=int, default=None,
                   help="absolute number of KV-cache pages")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None)
    g.add_argument("--disable-radix-cache", dest="enable_prefix_caching",
                   action="store_false", help="SGLang spelling of --no-enable-prefix-caching")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=None)
    g.add_argument("--attention-backend", default="auto",
                   help="auto, xla, cpu, pallas_tpu, pallas_gpu (or *_interpret); auto: Pallas on "
                        "TPU/GPU, the C++ kernel on CPU (the pure-JAX reference xla if it "
                        "cannot build)")
    g.add_argument("--quantization", "-q", choices=["w8a8_int8"], default=None,
                   help="w8a8_int8: int8 MLP/embedding/LM-head weights with per-token int8 "
                        "activations (SGLang's name); default: none")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule step N+1 while step N runs on the device (default on)")
    g.add_argument("--tensor-parallel-size", "--tp-size", "--tp", dest="tensor_parallel_size",
                   type=int, default=1)
    g.add_argument("--data-parallel-size", "--dp-size", "--dp", dest="data_parallel_size",
                   type=int, default=1)
    g.add_argument("--nnodes", type=int, default=1, help="processes in a multi-host mesh")
    g.add_argument("--node-rank", type=int, default=0, help="this process (0 serves HTTP)")
    g.add_argument("--dist-init-addr", default=None,
                   help="HOST:PORT of the jax.distributed coordinator (rank 0's host)")
    g.add_argument("--max-queue-size", "--max-queue-len", dest="max_queue_size", type=int,
                   default=None, help="waiting requests beyond this get 503 + Retry-After")
    g.add_argument("--disable-precompile", action="store_true",
                   help="compile buckets lazily on first use instead of at start-up")
    g.add_argument("--compile-cache-dir", default=None,
                   help="persistent XLA compilation cache ('' disables)")
    g.add_argument("--decode-buckets", type=_int_list, default=None,
                   help="comma-separated decode batch sizes to compile")
    g.add_argument("--prefill-buckets", type=_int_list, default=None,
                   help="comma-separated prefill token counts to compile")
    g = ap.add_argument_group("server")
    g.add_argument("--host", default=None, help="interface to bind; default: all interfaces")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require this key (default: $JAX_SERVE_API_KEY, then $VLLM_API_KEY)")
    g.add_argument("--admin-api-key", default=None,
                   help="key the admin routes need instead of --api-key (weight updates, "
                        "sleep/wakeup, flush_cache, abort_request, set_log_level, terminate; "
                        "default: $JAX_SERVE_ADMIN_API_KEY)")
    g.add_argument("--root-path", default="")
    g.add_argument("--enable-request-id-headers", action="store_true")
    g.add_argument("--disable-log-requests", action="store_true")
    g.add_argument("--max-log-len", type=int, default=200)
    g.add_argument("--response-role", default="assistant")
    g.add_argument("--log-level", "--uvicorn-log-level", dest="log_level", default="info",
                   type=str.lower, choices=LOG_LEVELS)
    g.add_argument("--task", default="auto",
                   choices=["auto", "generate", "embed", "embedding", "score", "classify",
                            "reward"],
                   help="model task; auto: from the checkpoint's architecture")
    g.add_argument("--is-embedding", action="store_true",
                   help="SGLang spelling: serve a pooling (embedding/score) model")
    g.add_argument("--api-dialect", default="vllm", choices=["vllm", "sglang", "lmdeploy"],
                   help="shape of routes two sources share (/rerank: vLLM/Jina or SGLang list; "
                        "/generate bodies with only shared fields: LMDeploy under lmdeploy, "
                        "else SGLang)")
    g.add_argument("--enable-access-log", action="store_true",
                   help="log every HTTP request line (off by default)")
    return ap


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template``: a readable file's contents, else the string itself.

    Raises:
        ValueError: the value looks like a path (no Jinja markup) but no file exists.
    """
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if not any(mark in value for mark in ("{{", "{%", "{#")):
        raise ValueError(f"--chat-template {value!r}: no such file, and not a Jinja template")
    return value


def build_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Maps parsed flags onto EngineConfig and ServerConfig (unset flags keep defaults)."""
    model = args.model or args.model_tag
    engine_kw = dict(model=model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                     max_model_len=args.max_model_len,
                     max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens,
                     page_size=args.page_size, gpu_memory_utilization=args.gpu_memory_utilization,
                     num_pages=args.num_pages, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                     enable_prefix_caching=args.enable_prefix_caching,
                     enable_chunked_prefill=args.enable_chunked_prefill,
                     attention_backend=args.attention_backend,
                     async_scheduling=args.async_scheduling,
                     quantization=args.quantization,
                     tensor_parallel_size=args.tensor_parallel_size,
                     data_parallel_size=args.data_parallel_size, seed=args.seed,
                     nnodes=args.nnodes, node_rank=args.node_rank,
                     dist_init_addr=args.dist_init_addr,
                     max_queue_size=args.max_queue_size, decode_buckets=args.decode_buckets,
                     prefill_buckets=args.prefill_buckets)
    engine_kw = {k: v for k, v in engine_kw.items() if v is not None or k == "model"}
    if args.disable_precompile:
        engine_kw["precompile"] = False
    if args.compile_cache_dir is not None:
        engine_kw["compile_cache_dir"] = args.compile_cache_dir or None
    engine_config = EngineConfig(**engine_kw)
    api_key = args.api_key or os.environ.get("JAX_SERVE_API_KEY") or os.environ.get(
        "VLLM_API_KEY") or None
    names = tuple(args.served_model_name or ())
    if not names:
        names = (model,) if model else (DEFAULT_SERVED_NAME,)
    server_config = ServerConfig(host=args.host, port=args.port, served_model_names=names,
                                 api_key=api_key,
                                 admin_api_key=args.admin_api_key or os.environ.get(
                                     "JAX_SERVE_ADMIN_API_KEY") or None,
                                 chat_template=read_chat_template(args.chat_template),
                                 response_role=args.response_role,
                                 enable_request_id_headers=args.enable_request_id_headers,
                                 disable_log_requests=args.disable_log_requests,
                                 max_log_len=args.max_log_len, root_path=args.root_path,
                                 api_dialect=args.api_dialect)
    return engine_config, server_config


def _setup_logging(level: str) -> None:
    num = logging.DEBUG if level in ("debug", "trace") else getattr(logging, level.upper())
    logging.basicConfig(level=num, stream=sys.stderr,
                        format="%(levelname)s %(asctime)s [%(name)s] %(message)s")


async def serve(engine_config: EngineConfig, server_config: ServerConfig,
                enable_access_log: bool = False, native: Optional[dict] = None) -> int:
    """Loads the engine, serves HTTP until SIGINT/SIGTERM, and returns an exit code."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HypercornConfig

    from serving.api.app import create_app
    from serving.engine.pooling_engine import build_client

    native = native or {}
    # AsyncEngine for generation, PoolingEngine for embed/score/classify checkpoints
    engine = build_client(engine_config, native.get("task", "auto"),
                          native.get("is_embedding", False))
    app = create_app(engine, server_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hc = HypercornConfig()
    host = server_config.host or "0.0.0.0"
    hc.bind = [f"[{host}]:{server_config.port}" if ":" in host else f"{host}:{server_config.port}"]
    hc.root_path = server_config.root_path
    hc.accesslog = logging.getLogger("hypercorn.access") if enable_access_log else None
    hc.graceful_timeout = 5.0
    server = asyncio.create_task(hypercorn_serve(app, hc, shutdown_trigger=stop.wait))
    code = 0
    try:
        start = asyncio.create_task(engine.start())
        done, _ = await asyncio.wait({start, server}, return_when=asyncio.FIRST_COMPLETED)
        if server in done:  # the port could not be bound, or a signal came first
            start.cancel()
            server.result()
            return 0
        start.result()
        shown = server_config.host or "0.0.0.0"
        logger.info("jax-serve ready: serving %s on http://%s:%d (OpenAI API under /v1)",
                    app.extensions["jax_serve"].model_name, shown, server_config.port)
        await server
    except Exception:
        logger.exception("server failed")
        code = 1
    finally:
        stop.set()
        if not server.done():
            await server
        await engine.shutdown()
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m serving.main``."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        engine_config, server_config = build_configs(args)
    except ValueError as exc:
        logger.error("bad arguments: %s", exc)
        return 2
    if engine_config.nnodes > 1:
        from sharding.distributed import initialize, run_follower
        initialize(engine_config.nnodes, engine_config.node_rank, engine_config.dist_init_addr)
        if engine_config.node_rank > 0:
            from serving.engine.engine import LLMEngine
            return run_follower(LLMEngine(engine_config), engine_config)
    native = dict(task=args.task, is_embedding=args.is_embedding)
    if args.task == "auto" and not args.is_embedding:
        from serving.engine.pooling_engine import detect_task
        if detect_task(engine_config.model) != "generate":  # a pooling checkpoint
            native["task"] = detect_task(engine_config.model)
    return asyncio.run(serve(engine_config, server_config, args.enable_access_log, native))


if __name__ == "__main__":
    sys.exit(main())
