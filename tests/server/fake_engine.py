"""A small stand-in for ``AsyncEngine``, for fast tests of the HTTP layer.

It implements ``serving.engine.protocol.EngineClient`` (task "generate") and
raises the errors of ``serving.engine.errors``, so the app's error mapping
sees what a real engine raises. It "generates" a deterministic token
sequence from the prompt (and the seed when sampling), honours max_tokens, n,
logprobs, stop strings and abort, and counts KV pages like the real engine so
leak tests mean something. Sleep toggles a flag; weight updates are refused
(there are no weights).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import types
from typing import Optional

from serving.engine.errors import (EngineNotReadyError, RequestFailedError,
                                   UnsupportedOperationError, ValidationError)
from serving.engine.types import (CompletionOutput, Logprob, RequestMetrics, RequestOutput,
                                  SamplingParams)


class FakeEngine:
    """``EngineClient`` over a toy token generator.

    Args:
        tokenizer: a transformers tokenizer.
        max_model_len: context length.
        num_pages: KV pages in the pool (16 tokens each).
        step_delay: seconds between generated tokens.
    """

    PAGE = 16
    task = "generate"

    def __init__(self, tokenizer, max_model_len: int = 512, num_pages: int = 256,
                 step_delay: float = 0.002):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_path = "fake/model"
        self.model_config = types.SimpleNamespace(vocab_size=len(tokenizer), model_type="llama",
                                                  architecture="LlamaForCausalLM")
        self.config = None  # no EngineConfig: /get_server_info reports the server's only
        self.hf_config: dict = {}
        self.id2label: dict = {}
        self.normalize = False
        self._ready = True
        self._sleeping = False
        self._health_ids = itertools.count()
        self._num_pages = num_pages
        self._held: dict[str, int] = {}
        self._aborted: set[str] = set()
        self._prompt_total = 0
        self._gen_total = 0
        self.step_delay = step_delay
        self.aborted_ids: list[str] = []

    async def start(self) -> None:
        self._ready = True

    def startup_info(self) -> dict:
        return {}

    def is_ready(self) -> bool:
        return self._ready and not self._sleeping

    def is_sleeping(self) -> bool:
        return self._sleeping

    def stats(self) -> dict:
        used = sum(self._held.values())
        return {"num_running": len(self._held), "num_waiting": 0,
                "num_total_pages": self._num_pages, "num_free_pages": self._num_pages - used,
                "kv_cache_usage": used / self._num_pages, "prompt_tokens_total": self._prompt_total,
                "generation_tokens_total": self._gen_total, "num_preemptions_total": 0,
                "prefix_cache_hit_rate": 0.0}

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)
        self.aborted_ids.append(request_id)
        self._held.pop(request_id, None)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if not self.is_ready():
            raise EngineNotReadyError("The engine is not ready" +
                                      (" (sleeping)" if self._sleeping else ""))
        total = len(prompt_token_ids) + (params.max_tokens or 0)
        if len(prompt_token_ids) >= self.max_model_len or total > self.max_model_len:
            raise ValidationError("prompt", f"prompt of {len(prompt_token_ids)} tokens and "
                                            f"max_tokens {params.max_tokens} exceed "
                                            f"max_model_len {self.max_model_len}")
        self._held[request_id] = math.ceil(total / self.PAGE) * params.best_of
        self._prompt_total += len(prompt_token_ids)
        return self._run(request_id, list(prompt_token_ids), params)

    def _token(self, prompt: list[int], params: SamplingParams, i: int, step: int) -> int:
        salt = 0 if params.greedy else (params.seed or 0) * 31 + i * 7
        return 200 + (sum(prompt) * 13 + step * 101 + salt) % 20000

    async def _run(self, rid: str, prompt: list[int], params: SamplingParams):
        n = params.n
        outs = [CompletionOutput(index=i, token_ids=[], logprobs=[] if params.logprobs is not None
                                 else None) for i in range(n)]
        metrics = RequestMetrics(arrival_time=0.0)
        plp = None
        if params.prompt_logprobs is not None:
            plp = [None] + [{t: Logprob(-1.0, 1, None)} for t in prompt[1:]]
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt))
        try:
            for step in range(max_tokens):
                await asyncio.sleep(self.step_delay)
                if rid in self._aborted:
                    for o in outs:
                        o.finish_reason = o.finish_reason or "abort"
                    yield RequestOutput(rid, prompt, outs, True, plp, metrics)
                    return
                for o in outs:
                    if o.finished:
                        continue
                    tok = self._token(prompt, params, o.index, step)
                    o.token_ids.append(tok)
                    self._gen_total += 1
                    if o.logprobs is not None:
                        entry = {tok: Logprob(-0.5, 1, None)}
                        for k in range(params.logprobs):
                            entry.setdefault(tok + k + 1, Logprob(-1.0 - k, k + 2, None))
                        o.logprobs.append(entry)
                    o.text = self.tokenizer.decode(o.token_ids,
                                                   skip_special_tokens=params.skip_special_tokens)
                    for s in params.stop:
                        pos = o.text.find(s)
                        if pos >= 0:
                            o.text = o.text[:pos + (len(s) if params.include_stop_str_in_output
                                                    else 0)]
                            o.finish_reason, o.stop_reason = "stop", s
                            break
                    if not o.finished and len(o.token_ids) >= max_tokens:
                        o.finish_reason = "length"
                done = all(o.finished for o in outs)
                yield RequestOutput(rid, prompt, [CompletionOutput(**vars(o)) for o in outs],
                                    done, plp, metrics)
                if done:
                    return
        finally:
            self._held.pop(rid, None)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str):
        """Like ``AsyncEngine.generate``: yields snapshots; aborts if the caller stops early."""
        stream = self.add_request(request_id, prompt_token_ids, params)
        try:
            async for out in stream:
                yield out
        finally:
            if request_id in self._held:
                self.abort(request_id)

    async def health_check(self) -> None:
        last = None
        async for out in self.generate([1], SamplingParams(max_tokens=1, temperature=0.0),
                                       f"health-check-{next(self._health_ids)}"):
            last = out
        if last is None or not last.outputs[0].token_ids:
            raise RequestFailedError("health check failed: no token generated")

    def flush_cache(self) -> bool:
        return True

    def sleep(self, level: int = 1) -> None:
        if self._held:
            raise RuntimeError(f"cannot sleep while {len(self._held)} requests run")
        self._sleeping = True

    def wake_up(self) -> None:
        self._sleeping = False

    def _no_weights(self) -> UnsupportedOperationError:
        return UnsupportedOperationError("FakeEngine has no weights to update.")

    def update_weights_from_disk(self, model_path: str) -> tuple[bool, str]:
        raise self._no_weights()

    def update_weights_from_tensors(self, tensors: dict, finished: bool = True
                                    ) -> tuple[bool, str]:
        raise self._no_weights()

    def drop_staged_weights(self) -> None:
        """Nothing is ever staged."""

    # ---- pooling: a generation engine serves none
    def _no_pooling(self) -> UnsupportedOperationError:
        return UnsupportedOperationError(f"This server runs a generation model "
                                         f"({self.model_path}); pooling is not available.")

    async def embed(self, inputs: list, normalize: Optional[bool] = None):
        raise self._no_pooling()

    async def score(self, pairs: list):
        raise self._no_pooling()

    async def classify(self, inputs: list):
        raise self._no_pooling()

    async def token_embeddings(self, inputs: list, normalize: bool = False) -> list:
        raise self._no_pooling()

    def count_tokens(self, inputs: list, pairs: bool = False) -> list[int]:
        raise self._no_pooling()

    async def shutdown(self) -> None:
        self._ready = False


def load_default_tokenizer():
    """The embedded default model's tokenizer (cached by model.tokenizer)."""
    from model.default import default_model_path
    from model.tokenizer import load_tokenizer
    return load_tokenizer(default_model_path(), "gguf")
