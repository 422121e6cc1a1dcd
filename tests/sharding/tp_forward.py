"""Subprocess script: a tensor-parallel forward with the Pallas kernels under shard_map.

Run by ``test_attention_shard_map.py`` with 8 simulated CPU devices. A tiny
random Qwen3-style model (qk-norm) runs one ragged step (a 6-token prefill, a
3-token prefill over 2 cached tokens, a 1-token decode over 4 cached tokens)
on a tp mesh through ``sharding.step.jit_step``, and the logits and the
written KV cache are compared with the single-device XLA forward. With
``export``, the same sharded step is exported for TPU (TPU kernels) or CUDA
(GPU kernels). Prints one JSON line per case.

Usage: ``python tests/sharding/tp_forward.py BACKEND:TP:HQ:HKV [...] [export]``
"""

from __future__ import annotations

import json
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import api as model_api
from model.attention import AttentionMetadata, KVCache
from model.config import ModelConfig
from model.decoder import DecoderLM
from pallas_kernels.export_utils import TRITON_CUSTOM_CALL, disabled_checks_for
from sharding.layout import TensorParallelLayout, _path_keys
from sharding.mesh import make_mesh
from sharding.step import jit_step

PAGE_SIZE, NUM_PAGES, PAGES_PER_SEQ = 8, 12, 2
# interpret backend -> (export platform, compiled backend, kernel custom-call marker)
EXPORT = {"pallas_tpu_interpret": ("tpu", "pallas_tpu", "tpu_custom_call"),
          "pallas_gpu_interpret": ("cuda", "pallas_gpu", TRITON_CUSTOM_CALL)}


def tiny_config(num_heads: int, num_kv_heads: int) -> ModelConfig:
    return ModelConfig.from_hf(dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=32,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
        tie_word_embeddings=False))


def batch(backend: str):
    """Three sequences: query lengths 6, 3, 1 over contexts 6, 5, 5 (cached prefix)."""
    q_lens, ctx = [6, 3, 1], [6, 5, 5]
    tables = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    ids, pos, slots = [], [], []
    rng = np.random.default_rng(0)
    for s, (n, c) in enumerate(zip(q_lens, ctx)):
        p = np.arange(c - n, c)
        ids += list(rng.integers(0, 256, n))
        pos += list(p)
        slots += list(tables[s, p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    md = AttentionMetadata(block_tables=tables, seq_lens=np.array(ctx, np.int32),
                           query_start_loc=qsl, slot_mapping=np.array(slots, np.int32),
                           max_q_len=max(q_lens), attention_backend=backend)
    return np.array(ids, np.int32), np.array(pos, np.int32), md


def cache_with_prefix(config: ModelConfig) -> KVCache:
    """A cache whose pages already hold random K/V (the cached context)."""
    shape = (config.num_layers, NUM_PAGES, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    k, v = jax.random.normal(jax.random.key(1), (2, *shape), jnp.float32) * 0.5
    return KVCache(k, v)


def step(graphdef, state, kv, input_ids, positions, md):
    hidden, kv = model_api.forward(graphdef, state, input_ids, positions, kv, md)
    return model_api.compute_logits(graphdef, state, hidden), kv


def run(config, graphdef, state, backend: str, tp: int):
    ids, pos, md = batch(backend)
    kv = cache_with_prefix(config)
    if tp == 1:
        fn = jax.jit(partial(step, graphdef))
        logits, kv = fn(state, kv, ids, pos, md)
        return np.asarray(logits), jax.tree.map(np.asarray, kv), None
    layout = TensorParallelLayout(make_mesh(tp, 1))
    place = layout.shardings_for(config)
    state = jax.tree_util.tree_map_with_path(
        lambda path, a: jax.device_put(a, place(_path_keys(path))), state)
    kv_sh = layout.kv_sharding()
    kv = jax.device_put(kv, kv_sh)
    fn = jit_step(partial(step, graphdef), layout.mesh, state, kv_sh, num_host_inputs=3,
                  num_host_outputs=1, donate_argnums=())
    logits, kv_out = fn(state, kv, ids, pos, md)
    spec = str(kv_out.k.sharding.spec)
    return np.asarray(logits), jax.tree.map(np.asarray, kv_out), (fn, state, kv, ids, pos, md,
                                                                   spec)


def main(cases: list[str], export: bool) -> None:
    models = {}
    for case in cases:
        backend, tp, hq, hkv = case.split(":")
        tp, hq, hkv = int(tp), int(hq), int(hkv)
        if (hq, hkv) not in models:
            config = tiny_config(hq, hkv)
            graphdef, state = nnx.split(DecoderLM(config, rngs=nnx.Rngs(0)))
            ref_logits, ref_kv, _ = run(config, graphdef, state, "xla", 1)
            models[(hq, hkv)] = config, graphdef, state, ref_logits, ref_kv
        config, graphdef, state, ref_logits, ref_kv = models[(hq, hkv)]
        logits, kv, extra = run(config, graphdef, state, backend, tp)
        out = {"case": case, "kv_spec": extra[-1],
               "logits_err": float(np.max(np.abs(logits - ref_logits))),
               "kv_err": float(max(np.max(np.abs(kv.k - ref_kv.k)),
                                   np.max(np.abs(kv.v - ref_kv.v)))),
               "argmax_equal": bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())}
        if export and backend in EXPORT:
            platform, target, marker = EXPORT[backend]
            fn, state_s, kv_s, ids, pos, md, _ = extra
            md = AttentionMetadata(md.block_tables, md.seq_lens, md.query_start_loc,
                                   md.slot_mapping, md.max_q_len, target)
            as_spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,  # noqa: E731
                                                     sharding=getattr(a, "sharding", None))
            exp = jax.export.export(fn, platforms=(platform,),
                                    disabled_checks=disabled_checks_for([platform]))(
                jax.tree.map(as_spec, state_s), jax.tree.map(as_spec, kv_s), as_spec(ids),
                as_spec(pos), jax.tree.map(as_spec, md))
            text = exp.mlir_module()
            # the cache the kernels see inside the manual computation: per-shard heads
            local = kv_s.k.addressable_shards[0].data.shape
            out["export"] = {"platform": platform, "kernel_calls": text.count(marker),
                             "manual": "manual_computation" in text,
                             "local_cache_type": "tensor<" + "x".join(map(str, local)) + "xf32>"
                             in text, "local_kv_heads": local[3],
                             "nr_devices": exp.nr_devices}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main([a for a in args if a != "export"], "export" in args)
