"""KV page budget per device: a cache split over the tensor axis fits tp-times the pages."""

from __future__ import annotations

import types

import pytest

from model.config import ModelConfig
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from sharding.memory import kv_page_bytes_per_device
from sharding.specs import ShardingPlan

QWEN3_TINY = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=49152,
                  hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=32,
                  max_position_embeddings=512)
SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
               hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               max_position_embeddings=8192, tie_word_embeddings=True)


def test_page_bytes_per_device():
    cfg = ModelConfig.from_hf(QWEN3_TINY)
    one = kv_page_bytes_per_device(cfg, 16, "float32")
    assert one == 2 * 2 * 16 * 8 * 32 * 4
    assert kv_page_bytes_per_device(cfg, 16, "bfloat16") == one // 2
    for tp in (2, 4, 8):
        assert kv_page_bytes_per_device(cfg, 16, "float32", ShardingPlan.build(cfg, tp)) \
            == one // tp
    # more devices than KV heads: the cache is replicated, every device holds all of it
    assert kv_page_bytes_per_device(cfg, 16, "float32", ShardingPlan.build(cfg, 16)) == one


def test_smollm2_cache_is_replicated():
    cfg = ModelConfig.from_hf(SMOLLM2)
    one = kv_page_bytes_per_device(cfg, 16, "bfloat16")
    for tp in (2, 4, 8):
        assert kv_page_bytes_per_device(cfg, 16, "bfloat16", ShardingPlan.build(cfg, tp)) == one


def _planned_pages(hf: dict, tp: int, budget: int) -> int:
    """``LLMEngine._plan_num_pages`` on a stand-in engine (no weights, no devices)."""
    cfg = ModelConfig.from_hf(hf)
    plan = ShardingPlan.build(cfg, tp) if tp > 1 else None
    stub = types.SimpleNamespace(
        config=EngineConfig(max_num_seqs=1024, kv_cache_memory_bytes=budget),
        model_config=cfg, max_model_len=512, page_size=16, dtype="float32", kv_dtype="float32",
        layout=types.SimpleNamespace(plan=plan))
    return LLMEngine._plan_num_pages(stub)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_engine_plans_pages_per_shard(tp):
    budget = 8 << 20  # per device
    one = _planned_pages(QWEN3_TINY, 1, budget)
    assert one == budget // (2 * 2 * 16 * 8 * 32 * 4)
    assert _planned_pages(QWEN3_TINY, tp, budget) == tp * one
    assert _planned_pages(SMOLLM2, tp, 64 << 20) == _planned_pages(SMOLLM2, 1, 64 << 20)
