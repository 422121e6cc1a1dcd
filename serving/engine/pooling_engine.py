"""The pooling engine: embedding, cross-encoder and classifier models behind the HTTP app.

It implements ``serving.engine.protocol.EngineClient`` for the tasks
"embed", "score" and "classify": coroutines ``embed``, ``score``,
``classify`` and ``token_embeddings``, plus the members every engine has
(``is_ready``, ``tokenizer``, ``model_config``, ``max_model_len``,
``model_path``, ``hf_config``, ``stats``, ``start``/``shutdown``,
``health_check``). Generation, sleep and weight updates raise
``UnsupportedOperationError``.

Requests are queued; a worker thread drains the queue, runs every queued job
of one kind as a single call into ``model.encoder_loader`` (length-sorted,
padded to power-of-two buckets, so a handful of shapes compile), and hands
each job its rows back on the event loop.

``detect_task`` picks the server mode from the checkpoint: a
``*ForSequenceClassification`` architecture -> "score" (one label, or a
sentence-transformers CrossEncoder) or "classify"; a BERT-family base model or
a sentence-transformers folder -> "embed"; anything else -> "generate".
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import numpy as np

from serving.engine.errors import EngineNotReadyError, UnsupportedOperationError
from serving.engine.loop_thread import LoopThread
from serving.engine.types import SamplingParams

logger = logging.getLogger(__name__)

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra")


def _hf_config(path: Optional[str]) -> dict:
    if path is None or not os.path.isdir(path):
        return {}
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def detect_task(path: Optional[str], task: str = "auto", is_embedding: bool = False) -> str:
    """"generate", "embed", "score" or "classify" for a model path and the CLI flags.

    Args:
        path: the model path (None: the embedded default, a generation model).
        task: ``--task``; "auto" decides from the checkpoint.
        is_embedding: SGLang's ``--is-embedding``: a pooling model (embed, or
            score/classify when the checkpoint has a classification head).
    """
    task = {"embedding": "embed", "reward": "classify"}.get(task, task)
    hf = _hf_config(path)
    archs = hf.get("architectures") or []
    seq_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    is_encoder = hf.get("model_type") in ENCODER_TYPES or (
        path is not None and os.path.isfile(os.path.join(path, "modules.json")))
    if task != "auto":
        return task
    if seq_cls and is_encoder:
        labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 1
        return "score" if labels == 1 or "sentence_transformers" in hf else "classify"
    if is_encoder or is_embedding:
        return "embed"
    return "generate"


@dataclasses.dataclass
class _Job:
    op: str  # "embed" | "score" | "classify" | "tokens"
    inputs: list  # texts, token-id lists, or (a, b) pairs
    options: tuple  # grouping key beyond op (e.g. normalize)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class PoolingEngine(LoopThread):
    """Runs a BERT-family encoder for embedding, scoring and classification.

    Args:
        model: path of a Hugging Face / sentence-transformers folder.
        task: "embed", "score" or "classify" (from ``detect_task``).
        dtype: "auto" (float32 on CPU, bfloat16 elsewhere), "float32" or "bfloat16".
        max_batch_size: rows per compiled call.
        config: the EngineConfig, reported by ``/get_server_info``.
    """

    def __init__(self, model: str, task: str, dtype: str = "auto", max_batch_size: int = 32,
                 config: Any = None):
        from model.encoder_loader import load_encoder

        if dtype == "auto":
            import jax
            dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        self.config = config
        self.is_decoder = not _is_encoder(model)
        if self.is_decoder:
            if task != "embed":
                raise ValueError(f"--task {task}: decoder models pool only as embedding "
                                 "models (last-token pooling)")
            from model.decoder_embed import load_decoder_embedder
            self.loaded = load_decoder_embedder(model, dtype)
        else:
            self.loaded = load_encoder(model, dtype)
        if task == "embed" and self.loaded.kind != "embedding":
            logger.info("%s has a classification head; serving it as %s", model,
                        self.loaded.kind)
            task = "score" if self.loaded.kind == "cross_encoder" else "classify"
        if task in ("score", "classify") and self.loaded.kind == "embedding":
            raise ValueError(f"--task {task} needs a *ForSequenceClassification checkpoint; "
                             f"{model} is an embedding model")
        self.task = task
        self.hf_config = _hf_config(model)
        self.model_path = str(model if model is not None else self.loaded.loaded.path)
        self.tokenizer = self.loaded.tokenizer
        self.model_config = self.loaded.config
        self.max_model_len = int(self.loaded.max_length)
        self.max_batch_size = max_batch_size
        self.id2label = dict(self.loaded.id2label)
        self._queue: collections.deque[_Job] = collections.deque()
        self._init_loop()
        self._counters = collections.Counter()
        self._last_step = 0.0

    # ---- the surface the HTTP app reads ---------------------------------------------
    @property
    def normalize(self) -> bool:
        """Whether ``embed`` L2-normalises by default (the model's pooling config)."""
        return bool(self.loaded.pooling.normalize)

    def startup_info(self) -> dict:
        return {}

    def is_ready(self) -> bool:
        return self._ready

    def is_sleeping(self) -> bool:
        return False

    async def start(self) -> None:
        """Compiles the smallest bucket (a warm-up) and starts the worker thread."""
        self._start_loop("pooling-loop")
        await self.health_check()

    def _unsupported(self, what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(f"This server runs a pooling model ({self.task}: "
                                         f"{self.model_path}); {what} is not available.")

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams):
        raise self._unsupported("text generation")

    def abort(self, request_id: str) -> None:
        """Pooling jobs are short; nothing to abort."""

    def flush_cache(self) -> bool:
        """Nothing cached between requests: always succeeds."""
        return True

    def sleep(self, level: int = 1) -> None:
        raise self._unsupported("sleep mode")

    def wake_up(self) -> None:
        raise self._unsupported("sleep mode")

    def update_weights_from_disk(self, model_path: str) -> tuple[bool, str]:
        raise self._unsupported("updating weights")

    def update_weights_from_tensors(self, tensors: dict, finished: bool = True
                                    ) -> tuple[bool, str]:
        raise self._unsupported("updating weights")

    def drop_staged_weights(self) -> None:
        raise self._unsupported("updating weights")

    def stats(self) -> dict:
        c = self._counters
        return {"num_running": 0, "num_waiting": len(self._queue), "num_total_pages": 0,
                "num_free_pages": 0, "num_cached_pages": 0, "kv_cache_usage": 0.0,
                "page_size": 1, "prompt_tokens_total": c["prompt_tokens"],
                "generation_tokens_total": 0, "num_preemptions_total": 0,
                "num_steps_total": c["steps"], "last_step_seconds": self._last_step,
                "requests_finished": {"stop": c["requests"]}}

    # ---- requests ----------------------------------------------------------------
    async def _submit(self, op: str, inputs: list, options: tuple = ()):
        if not self._ready:
            raise EngineNotReadyError("the pooling engine is not running")
        if self.is_decoder and op != "embed" and inputs:
            raise self._unsupported(f"{op} (it needs an encoder; this decoder is served "
                                    "for embeddings, last-token pooling)")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append(_Job(op, list(inputs), options, fut, loop))
        self._wake.set()
        return await fut

    async def embed(self, inputs: list, normalize: Optional[bool] = None) -> np.ndarray:
        """Pooled sentence vectors ``[B, H]`` for strings or token-id lists."""
        return await self._submit("embed", inputs, (normalize,))

    async def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Classification-head logits ``[B, num_labels]`` of text pairs."""
        return await self._submit("score", pairs)

    async def classify(self, inputs: list) -> np.ndarray:
        """Classification-head logits ``[B, num_labels]`` of single texts."""
        return await self._submit("classify", inputs)

    async def token_embeddings(self, inputs: list, normalize: bool = False) -> list[np.ndarray]:
        """Last-layer vector of every token: one ``[L_i, H]`` array per input."""
        return await self._submit("tokens", inputs, (normalize,))

    async def health_check(self) -> None:
        if self.task == "embed":
            await self.embed(["ping"])
        elif self.task == "score":
            await self.score([("ping", "pong")])
        else:
            await self.classify(["ping"])

    def count_tokens(self, inputs: list, pairs: bool = False) -> list[int]:
        """Tokens each input occupies (as the model sees it, truncation included)."""
        tok, cap = self.tokenizer, self.max_model_len
        if pairs:
            enc = tok([a for a, _ in inputs], [b for _, b in inputs], truncation=True,
                      max_length=cap)
            return [len(x) for x in enc["input_ids"]]
        return [min(len(x), cap) if not isinstance(x, str) else
                len(tok(x, truncation=True, max_length=cap)["input_ids"]) for x in inputs]

    # ---- the worker thread -----------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            if not self._queue:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            jobs = []
            while self._queue:
                jobs.append(self._queue.popleft())
            groups: dict[tuple, list[_Job]] = collections.defaultdict(list)
            for job in jobs:
                kind = "ids" if job.inputs and not isinstance(job.inputs[0], (str, tuple)) \
                    else "text"
                groups[(job.op, kind, job.options)].append(job)
            for (op, _, options), group in groups.items():
                self._run_group(op, options, group)

    def _run_group(self, op: str, options: tuple, jobs: list[_Job]) -> None:
        from model import encoder_loader as enc

        inputs = [x for job in jobs for x in job.inputs]
        t0 = time.perf_counter()
        try:
            if not inputs:
                results: Any = []
            elif op == "embed" and self.is_decoder:
                from model.decoder_embed import encode
                results = encode(self.loaded, inputs, batch_size=self.max_batch_size,
                                 normalize=options[0])
            elif op == "embed":
                results = enc.encode(self.loaded, inputs, batch_size=self.max_batch_size,
                                     normalize=options[0])
            elif op == "score":
                results = enc.score_pairs(self.loaded, inputs, batch_size=self.max_batch_size)
            elif op == "classify":
                results = enc.classify_texts(self.loaded, inputs,
                                             batch_size=self.max_batch_size)
            else:
                results = enc.token_embeddings(self.loaded, inputs,
                                               batch_size=self.max_batch_size,
                                               normalize=options[0])
        except Exception as exc:  # noqa: BLE001 - handed to every waiting job
            logger.exception("pooling %s failed for %d inputs", op, len(inputs))
            for job in jobs:
                job.loop.call_soon_threadsafe(_set, job.future, None, exc)
            return
        self._last_step = time.perf_counter() - t0
        self._counters["steps"] += 1
        self._counters["requests"] += len(jobs)
        start = 0
        for job in jobs:
            part = results[start:start + len(job.inputs)]
            start += len(job.inputs)
            job.loop.call_soon_threadsafe(_set, job.future, part, None)


def _set(fut: asyncio.Future, value, exc: Optional[BaseException]) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _is_encoder(model: Optional[str]) -> bool:
    hf = _hf_config(model)
    return hf.get("model_type") in ENCODER_TYPES or bool(
        model and os.path.isfile(os.path.join(model, "modules.json")))


def build_client(engine_config: Any, task: str = "auto", is_embedding: bool = False):
    """The ``EngineClient`` ``serving.main`` serves: AsyncEngine for generation, else
    PoolingEngine.

    Raises:
        ValueError: a pooling task on a checkpoint this server cannot pool.
    """
    model = engine_config.model
    chosen = detect_task(model, task, is_embedding)
    if chosen == "generate":
        from serving.engine.async_engine import AsyncEngine
        return AsyncEngine(engine_config)
    if not _is_encoder(model) and chosen != "embed":
        raise ValueError(f"--task {chosen}: {model or 'the default model'} is not a BERT-family "
                         "encoder; decoder models pool only as embedding models (--task embed)")
    logger.info("serving %s as a pooling model (task %s)", model, chosen)
    return PoolingEngine(model, chosen, engine_config.dtype,
                         max_batch_size=min(max(engine_config.max_num_seqs, 1), 64),
                         config=engine_config)
