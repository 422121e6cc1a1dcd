"""The engine contract: what the HTTP layer may call, and what ``AsyncEngine`` drives.

Two layers, each a ``typing.Protocol`` (structural: implementations do not
inherit from them, and ``sharding.data_parallel`` imports nothing from
``serving``):

* :class:`EngineCore` -- a synchronous engine stepped by one thread:
  ``LLMEngine`` (one replica) and ``DataParallelEngine`` (several).
  ``AsyncEngine`` runs one on its loop thread.
* :class:`EngineClient` -- the asyncio-facing engine the app is built
  around: ``AsyncEngine`` (generation), ``PoolingEngine`` (embed / score /
  classify) and the tests' ``FakeEngine``. ``task`` says which of the two
  capability sets below it serves; the other one raises
  :class:`~serving.engine.errors.UnsupportedOperationError`.

Every error an engine raises on purpose is one of ``serving.engine.errors``;
the app maps each to one status (``serving.api.errors.from_engine_error``).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Protocol, Sequence, runtime_checkable

from serving.engine.errors import (EngineError, EngineNotReadyError,  # noqa: F401 (re-exported)
                                   EngineOverloadedError, RequestFailedError,
                                   UnsupportedOperationError, ValidationError)
from serving.engine.types import RequestOutput, SamplingParams


@runtime_checkable
class EngineCore(Protocol):
    """A synchronous engine: ``submit``/``abort`` from any thread, the rest on one.

    Attributes:
        config: the EngineConfig.
        tokenizer, model_config, max_model_len, model_path: of the loaded model.
        hf_config: the checkpoint's Hugging Face config as a dict ({} if none).
        replicas: the ``LLMEngine`` replicas behind it (itself for one), for
            the admin operations that touch device state: each has ``state``
            (its weights, owned by its runner), ``read_checkpoint(path)``,
            ``place(host_state)``, ``swap_state(state, model_path)``,
            ``release()`` and ``restore(host_state)``.
    """

    config: Any
    tokenizer: Any
    model_config: Any
    max_model_len: int
    model_path: str
    hf_config: dict

    @property
    def replicas(self) -> Sequence[Any]: ...

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Checks a request against the model (raises ValidationError); returns
        the params with ``max_tokens`` resolved."""

    def submit(self, request_id: str, prompt_token_ids: list[int],
               params: SamplingParams) -> None:
        """Queues a validated request (any thread)."""

    def abort(self, request_id: str) -> None:
        """Aborts a request (any thread); its pages are freed at the next step."""

    def num_queued(self) -> int:
        """Sequences submitted or waiting but not yet running (load shedding)."""

    def num_running(self) -> int:
        """Sequences running (holding KV pages)."""

    def has_work(self) -> bool: ...

    def step(self) -> list[RequestOutput]:
        """One scheduling + device step; a snapshot of every request it touched."""

    def stats(self) -> dict: ...

    def precompile(self) -> float:
        """Compiles every step program; returns the seconds spent."""

    def startup_report(self) -> dict:
        """``load_s``, ``tokenizer_s``, ``prepare_s``, ``programs``, ``programs_from_cache``."""

    def flush_prefix_cache(self) -> bool:
        """Drops the prefix cache; False (nothing done) while requests run."""


@runtime_checkable
class EngineClient(Protocol):
    """The engine as the HTTP app sees it (one per app, built by ``serving.main``).

    Attributes:
        task: "generate", "embed", "score" or "classify": what the loaded model serves.
        config: the EngineConfig (reported by ``/get_server_info``).
        tokenizer: a transformers tokenizer.
        model_config: the model's ``ModelConfig`` (``vocab_size``, ...).
        hf_config: the checkpoint's Hugging Face config as a dict ({} if none).
        max_model_len: the context length.
        model_path: where the weights came from.
    """

    task: str
    config: Any
    tokenizer: Any
    model_config: Any
    hf_config: dict
    max_model_len: int
    model_path: str

    # ---- life cycle and state
    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def is_ready(self) -> bool: ...

    def is_sleeping(self) -> bool: ...

    def stats(self) -> dict: ...

    def startup_info(self) -> dict:
        """Seconds per start-up phase and programs built ({} when not measured)."""

    # ---- generation (task "generate")
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Validates and queues one request; returns its stream of cumulative
        snapshots, the last with ``finished=True``.

        Raises:
            ValidationError, EngineNotReadyError, EngineOverloadedError,
            UnsupportedOperationError.
        """

    def abort(self, request_id: str) -> None: ...

    # ---- pooling (tasks "embed", "score", "classify"); ``id2label`` names the
    # classifier's labels and ``normalize`` says whether embeddings are
    # L2-normalised by default
    id2label: dict
    normalize: bool

    async def embed(self, inputs: list, normalize: Optional[bool] = None) -> Any: ...

    async def score(self, pairs: list[tuple[str, str]]) -> Any: ...

    async def classify(self, inputs: list) -> Any: ...

    async def token_embeddings(self, inputs: list, normalize: bool = False) -> list: ...

    def count_tokens(self, inputs: list, pairs: bool = False) -> list[int]: ...

    # ---- admin (a pooling engine raises UnsupportedOperationError for sleep,
    # wake-up and weight updates)
    async def health_check(self) -> None:
        """Runs one tiny request end to end (generation: one greedy token).

        Raises:
            EngineNotReadyError, RequestFailedError (or the error the request hit).
        """

    def flush_cache(self) -> bool:
        """Drops cached state (the prefix cache); False while requests run."""

    def sleep(self, level: int = 1) -> None:
        """Frees device memory (level 1 keeps a host copy of the weights).

        Raises:
            RuntimeError: requests are running (retry later; not an EngineError).
        """

    def wake_up(self) -> None: ...

    def update_weights_from_disk(self, model_path: str) -> tuple[bool, str]:
        """``(success, message)``; on failure the old weights keep serving."""

    def update_weights_from_tensors(self, tensors: dict, finished: bool = True
                                    ) -> tuple[bool, str]:
        """Stages Hugging Face-named tensors; swaps them in when ``finished``."""

    def drop_staged_weights(self) -> None: ...
