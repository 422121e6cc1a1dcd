"""The engine's compiled prefill and decode steps lower for TPU and CUDA from the CPU.

The whole step (forward over the paged cache with the Pallas kernels selected,
logits, on-device sampling) is exported with ``jax.export`` for each target
platform, at SmolLM2-135M's shapes and at a head_dim-128 (Llama-3-8B-like)
configuration, without weights: only shapes and dtypes are used.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import pytest
from jax import export

from model.api import abstract_model
from model.attention import AttentionMetadata, KVCache
from model.config import ModelConfig
from pallas_kernels.export_utils import disabled_checks_for
from model import stacked
from serving.engine.runner import LOGPROB_WIDTH, _run_step
from serving.engine.sampling_tensors import default_sampling_tensors

SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
               hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
               rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
HD128 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
             hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
             rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)

FEED = 32  # rows of sampled tokens fed to the next step (max_num_seqs)
PLATFORM_BACKEND = {"tpu": "pallas_tpu", "cuda": "pallas_gpu"}
MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _spec(x):
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)


def _step_args(cfg: ModelConfig, kind: str, size: int, pages: int, backend: str, dtype):
    graphdef, state = abstract_model(cfg, dtype)
    page_size, num_pages = 16, 64
    kv = KVCache(*(jax.ShapeDtypeStruct((cfg.num_layers, num_pages, page_size, cfg.num_kv_heads,
                                         cfg.head_dim), dtype),) * 2)
    num_seqs = size if kind == "decode" else 1
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    md = AttentionMetadata(block_tables=i32(num_seqs, pages), seq_lens=i32(num_seqs),
                           query_start_loc=i32(num_seqs + 1), slot_mapping=i32(size),
                           max_q_len=1 if kind == "decode" else size, attention_backend=backend)
    st = jax.tree.map(_spec, default_sampling_tensors(
        num_seqs, vocab_size=cfg.vocab_size, max_model_len=pages * page_size,
        max_logprobs=LOGPROB_WIDTH))
    scan, params = stacked.stack(graphdef, state)  # the engine's form: layers as a loop
    return scan, (params, kv, i32(size), i32(size), i32(FEED), i32(size), md, i32(num_seqs),
                  st)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name,hf,kind,size,pages,dtype", [
    ("smollm2", SMOLLM2, "decode", 8, 8, jnp.float32),
    ("smollm2", SMOLLM2, "prefill", 64, 8, jnp.float32),
    ("hd128", HD128, "decode", 16, 16, jnp.bfloat16),
    ("hd128", HD128, "prefill", 128, 16, jnp.bfloat16),
])
def test_engine_step_exports(platform, name, hf, kind, size, pages, dtype):
    cfg = ModelConfig.from_hf(hf)
    graphdef, args = _step_args(cfg, kind, size, pages, PLATFORM_BACKEND[platform], dtype)
    fn = jax.jit(partial(_run_step, graphdef, FEED), donate_argnums=(1,))
    exp = export.export(fn, platforms=(platform,),
                        disabled_checks=disabled_checks_for([platform]))(*args)
    text = exp.mlir_module()
    assert MARKERS[platform] in text, f"{name} {kind}: kernel custom call missing for {platform}"
    out_shapes = [o.shape for o in exp.out_avals]
    assert (size if kind == "decode" else 1,) in out_shapes  # sampled tokens
