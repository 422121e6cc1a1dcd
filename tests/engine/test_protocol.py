"""The engine contract (``serving.engine.protocol``): every engine implements it, the
API-facing members are real attributes (nothing for the app to probe), and what an
engine cannot do raises ``UnsupportedOperationError``.

Tiny random Llama (two layers, SmolLM2's tokenizer) for the generation engines, the
packaged all-MiniLM-L6-v2 for the pooling engine.
"""

from __future__ import annotations

import numpy as np

import asyncio
import inspect
import pathlib
import shutil
import subprocess
import sys

import pytest

from serving.engine.config import EngineConfig
from serving.engine.errors import EngineNotReadyError, UnsupportedOperationError
from serving.engine.protocol import EngineClient, EngineCore
from serving.engine.types import SamplingParams

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPT = [1, 17, 42, 5, 99, 23]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from model.default import default_model_path
    from model.tokenizer import load_tokenizer
    from tests.model.tiny_hf import save_hf_model

    path = tmp_path_factory.mktemp("tiny_llama_protocol")
    save_hf_model("llama", path, seed=0)
    tok_dir = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(default_model_path(), "gguf").save_pretrained(tok_dir)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return str(path)


def _config(model_dir, **kw) -> EngineConfig:
    args = dict(model=model_dir, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
                precompile=False, compile_cache_dir=None, page_size=8, num_pages=24,
                decode_buckets=(4,), prefill_buckets=(16,))
    args.update(kw)
    return EngineConfig(**args)


@pytest.fixture(scope="module")
def replicas(model_dir):
    from serving.engine.engine import LLMEngine
    return [LLMEngine(_config(model_dir)), LLMEngine(_config(model_dir))]


def _greedy(core, rid: str) -> list[int]:
    params = core.validate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    core.submit(rid, PROMPT, params)
    final = None
    while core.has_work():
        for out in core.step():
            if out.finished:
                final = out
    return final.outputs[0].token_ids


def test_llm_engine_is_an_engine_core_and_the_runner_owns_the_weights(replicas):
    eng = replicas[0]
    assert isinstance(eng, EngineCore)
    assert eng.replicas == [eng]
    assert isinstance(eng.hf_config, dict) and eng.hf_config["model_type"] == "llama"
    assert eng.num_queued() == eng.num_running() == 0
    assert eng.flush_prefix_cache() is True
    # one owner: the runner (stacked weights, model/stacked.py); ``state`` and
    # ``loaded`` are views of them, nothing else holds the weights
    import jax
    leaves = jax.tree.leaves(eng.runner.params)
    assert sum(a.size for a in jax.tree.leaves(eng.state)) == sum(a.size for a in leaves)
    for a, b in zip(jax.tree.leaves(eng.state), jax.tree.leaves(eng.loaded.state)):
        assert (np.asarray(a) == np.asarray(b)).all()
    assert eng._checkpoint.state is None
    for name in ("on_output", "async_scheduling", "_inflight"):
        assert not hasattr(eng, name), name


def test_data_parallel_engine_is_an_engine_core(replicas):
    from sharding.data_parallel import DataParallelEngine

    dp = DataParallelEngine(replicas)
    assert isinstance(dp, EngineCore)
    assert dp.replicas == replicas and dp.hf_config == replicas[0].hf_config
    want = _greedy(replicas[0], "alone")
    assert _greedy(dp, "dp") == want
    assert dp.num_queued() == dp.num_running() == 0 and dp.flush_prefix_cache() is True


def test_async_engine_is_an_engine_client_with_no_probing(model_dir, replicas):
    from serving.engine.async_engine import AsyncEngine
    from sharding.data_parallel import DataParallelEngine

    eng = AsyncEngine(_config(model_dir), engine=DataParallelEngine(replicas))
    assert isinstance(eng, EngineClient)
    assert eng.task == "generate" and eng.id2label == {} and eng.normalize is False
    assert isinstance(eng.hf_config, dict) and eng.hf_config["model_type"] == "llama"
    assert eng.model_path == replicas[0].model_path and not eng.is_sleeping()

    async def generate(rid: str) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        last = None
        async for out in eng.generate(PROMPT, params, rid):
            last = out
        return last.outputs[0].token_ids

    async def scenario():
        await eng.start()
        try:
            await eng.health_check()
            before = await generate("a")
            for coro in (eng.embed(["x"]), eng.score([("a", "b")]), eng.classify(["x"]),
                         eng.token_embeddings(["x"])):
                with pytest.raises(UnsupportedOperationError, match="generation model"):
                    await coro
            with pytest.raises(UnsupportedOperationError):
                eng.count_tokens(["x"])
            assert eng.flush_cache() is True
            await asyncio.to_thread(eng.sleep, 1)  # every replica releases its weights
            assert eng.is_sleeping() and all(r.state is None for r in replicas)
            with pytest.raises(EngineNotReadyError):
                eng.add_request("z", PROMPT, SamplingParams(max_tokens=1))
            await asyncio.to_thread(eng.wake_up)
            assert await generate("b") == before
            ok, msg = await asyncio.to_thread(eng.update_weights_from_disk, model_dir)
            assert ok, msg
            assert await generate("c") == before
        finally:
            await eng.shutdown()

    asyncio.run(scenario())


def test_pooling_engine_is_an_engine_client_that_refuses_generation():
    from model.default import minilm_path
    from serving.engine.pooling_engine import PoolingEngine

    eng = PoolingEngine(str(minilm_path()), "embed")
    assert isinstance(eng, EngineClient)
    assert eng.task == "embed" and eng.normalize is True and eng.id2label == {}
    assert eng.hf_config["model_type"] == "bert"
    assert eng.flush_cache() is True and not eng.is_sleeping()
    with pytest.raises(UnsupportedOperationError, match="pooling model .*text generation"):
        eng.add_request("r", [1, 2], SamplingParams())
    for call in (lambda: eng.sleep(1), eng.wake_up, lambda: eng.update_weights_from_disk("x"),
                 lambda: eng.update_weights_from_tensors({}), eng.drop_staged_weights):
        with pytest.raises(UnsupportedOperationError):
            call()


def test_fake_engine_is_an_engine_client_raising_the_engine_errors():
    from tests.server.fake_engine import FakeEngine, load_default_tokenizer

    eng = FakeEngine(load_default_tokenizer())
    assert isinstance(eng, EngineClient)
    assert eng.task == "generate" and eng.hf_config == {} and eng.normalize is False

    async def scenario():
        await eng.health_check()
        with pytest.raises(UnsupportedOperationError):
            await eng.embed(["x"])
        eng.sleep(1)
        with pytest.raises(EngineNotReadyError):
            eng.add_request("r", [1, 2], SamplingParams(max_tokens=2))
        eng.wake_up()
        assert eng.is_ready()

    asyncio.run(scenario())
    with pytest.raises(UnsupportedOperationError):
        eng.update_weights_from_disk("x")


def test_async_engine_reaches_the_core_only_through_the_contract():
    """No ``_inbox``/``scheduler``/``runner`` reaches and no ``getattr`` probes of the core."""
    from serving.engine import async_engine

    src = inspect.getsource(async_engine)
    for reach in ("._inbox", ".scheduler", ".runner", ".loaded", "getattr(self.engine",
                  '"engines"'):
        assert reach not in src, reach


def test_guided_and_types_import_one_way():
    """``types`` uses ``guided`` (GuideSpec, check_guide); ``guided`` never imports ``types``."""
    code = ("import sys; import serving.engine.guided; "
            "assert 'serving.engine.types' not in sys.modules; "
            "from serving.engine.types import GuideSpec; "
            "from serving.engine.guided import GuideSpec as G; assert GuideSpec is G")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
