"""The engine serves SmolLM2 with the Pallas kernels forced on in interpret mode
(slow on CPU) and its greedy outputs equal the XLA path's."""

from __future__ import annotations

import pytest

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.types import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from model.loader import load_model
    return load_model(None)


def _greedy(loaded, backend: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    eng = LLMEngine(EngineConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
                                 precompile=False, compile_cache_dir=None,
                                 attention_backend=backend), loaded=loaded)
    for i, text in enumerate(prompts):
        ids = eng.tokenizer.encode(text)
        eng.submit(str(i), ids, eng.validate(ids, SamplingParams(temperature=0,
                                                                 max_tokens=max_tokens)))
    outs = {}
    while eng.has_work():
        for o in eng.step():
            outs[o.request_id] = o.outputs[0].token_ids
    return [outs[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("backend", ["pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_interpret_kernels_match_xla_path(smollm2, backend):
    # Two prompts in one batch: a 20-token one is chunked (16 + 4) to exercise
    # prefill over cached context, then both decode together.
    prompts = ["The capital of France is",
               "Here is a list of three colours, one per line, starting with red:"]
    ref = _greedy(smollm2, "xla", prompts, 3)
    assert _greedy(smollm2, backend, prompts, 3) == ref
