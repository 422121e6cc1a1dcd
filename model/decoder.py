"""One decoder-only LM class for the Llama, Mistral, Qwen2/3 and Gemma 3 families.

Family differences are config switches (``model/config.py``): q/k/v bias
(Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3), Gemma's (1 + w) norms with
post-attention / pre- and post-feed-forward norms, scaled embeddings, sliding
window layers with their own RoPE base, attention and final logit soft-capping.

q|k|v and gate|up are one matmul each (fused at load, ``model/fusion.py``);
the classes are float only (``model/quant.py`` swaps in int8 modules).

The forward pass works on a flat ragged batch of ``T`` tokens and the paged KV
cache stacked over layers; each layer's cache write is an in-place scatter
into the (donated) stacked cache at its layer index. ``__call__`` unrolls the
layers (reference loops, export tests); the engine runs the same layers as a
loop over stacked weights (``model/stacked.py``), so tracing and compiling a
step costs one layer (or one period of Gemma 3's local/global pattern).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import AttentionMetadata, KVCache
from model.config import ModelConfig
from model.layers import MLP, Embedding, Linear, RMSNorm, apply_rope, rope_inv_freq, rope_tables
from pallas_kernels.dispatch import ragged_paged_attention, write_kv
from sharding.attention import tensor_parallel_attention


class Attention(nnx.Module):
    """Grouped-query self-attention of one layer over the paged cache."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads
        self.head_dim = c.head_dim
        self.sm_scale = c.sm_scale
        self.sliding_window = c.layer_sliding_window(layer)
        self.soft_cap = c.attn_logit_softcapping
        self.rope_theta, self.rope_scaling = c.layer_rope(layer)
        self.group = c.num_heads // c.num_kv_heads  # q heads per KV head
        # q|k|v in one matmul, grouped by KV head: [hidden, Hkv, group + 2, D]
        # (model/fusion.py), so tensor parallelism can split the Hkv axis.
        self.qkv_proj = Linear(c.hidden_size, (c.num_kv_heads, self.group + 2, c.head_dim),
                               use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size,
                             use_bias=c.attention_out_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, gemma=c.is_gemma, dtype=dtype)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, gemma=c.is_gemma, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, positions: jax.Array, kv_cache: KVCache,
                 md: AttentionMetadata, rope_cache: dict | None = None, *,
                 layer: int | jax.Array) -> tuple[jax.Array, KVCache]:
        """``x: [T, hidden] -> ([T, hidden], updated cache)``.

        ``layer`` (an int, or a traced int32 under a loop over layers) picks
        this layer's slice of the stacked cache. ``rope_cache`` (trace-time
        dict) shares the RoPE cos/sin tables between layers with the same
        frequencies.
        """
        num_tokens = x.shape[0]
        h = self.qkv_proj(x)  # [T, Hkv, group + 2, D]
        # KV head g's group holds q heads g * group ... (g + 1) * group - 1, as in HF.
        q = h[:, :, :self.group].reshape(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k, v = h[:, :, self.group], h[:, :, self.group + 1]  # [T, Hkv, D] each
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        if rope_cache is None:
            rope_cache = {}
        key = inv_freq.tobytes()
        if key not in rope_cache:
            rope_cache[key] = rope_tables(positions, inv_freq)
        q = apply_rope(q, rope_cache[key])
        k = apply_rope(k, rope_cache[key])

        def attend(q, k, v, k_cache, v_cache, layer, block_tables, seq_lens, qsl, slots):
            # Per shard under tensor parallelism: q/k/v/caches hold this device's heads.
            k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, slots,
                                        backend=md.attention_backend)
            out = ragged_paged_attention(
                q, k_cache, v_cache, layer, block_tables, seq_lens, qsl,
                max_q_len=md.max_q_len, sm_scale=self.sm_scale,
                sliding_window=self.sliding_window, soft_cap=self.soft_cap,
                backend=md.attention_backend)  # [T, Hq(/tp), D]
            return out, k_cache, v_cache

        attend = tensor_parallel_attention(attend, md.mesh, num_heads=self.num_heads,
                                           num_kv_heads=self.num_kv_heads, num_replicated=5)
        out, k_cache, v_cache = attend(q, k, v, kv_cache.k, kv_cache.v,
                                       jnp.asarray(layer, jnp.int32), md.block_tables,
                                       md.seq_lens, md.query_start_loc, md.slot_mapping)
        out = self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))
        return out, KVCache(k_cache, v_cache)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block (Gemma: with post-attention/feed-forward norms)."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        c = config
        norm = lambda: RMSNorm(c.hidden_size, eps=c.rms_norm_eps, gemma=c.is_gemma, dtype=dtype)  # noqa: E731
        self.gemma = c.is_gemma
        self.input_layernorm = norm()
        self.self_attn = Attention(c, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        if c.is_gemma:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(c.hidden_size, c.intermediate_size, hidden_act=c.hidden_act,
                       dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, kv_cache, md, rope_cache=None, *, layer):
        h, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, md,
                                     rope_cache, layer=layer)
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + h
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class DecoderLM(nnx.Module):
    """Decoder-only causal LM over a ragged batch and a paged KV cache.

    Args:
      config: the model configuration.
      dtype: parameter and activation dtype ("float32" or "bfloat16"); norms,
        softmax and attention scores accumulate in float32.
      rngs: initialisers' randomness (use ``nnx.eval_shape`` to skip allocation).
    """

    def __init__(self, config: ModelConfig, *, dtype="float32", rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        c = config
        self.config = config
        self.dtype = dtype
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(c, i, dtype=dtype, rngs=rngs)
                                for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, gemma=c.is_gemma, dtype=dtype)
        self.lm_head = (None if c.tie_word_embeddings else
                        Linear(c.hidden_size, c.vocab_size, use_bias=False, dtype=dtype, rngs=rngs))

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                 md: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        """Runs all layers on a ragged batch.

        Args:
          input_ids: [T] int32 token ids (tokens of all sequences, concatenated).
          positions: [T] int32 absolute position of each token in its sequence.
          kv_cache: stacked paged cache; this step's keys/values are written at
            ``md.slot_mapping``.
          md: attention metadata of the batch.

        Returns:
          ``(hidden, kv_cache)``: final-normed hidden states [T, hidden_size]
          and the updated cache.
        """
        x = self.embed(input_ids)
        rope_cache: dict = {}  # one cos/sin pair per distinct RoPE frequency set
        for i, layer in enumerate(self.layers):
            x, kv_cache = layer(x, positions, kv_cache, md, rope_cache, layer=i)
        return self.norm(x), kv_cache

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``input_ids: [T] -> [T, hidden]`` (Gemma: scaled by sqrt(hidden))."""
        x = self.embed_tokens(input_ids)
        if self.config.is_gemma:
            # Like transformers: the scale is cast to the weight dtype first.
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
        return x

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden: [N, hidden_size] -> logits [N, vocab_size]`` float32."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits
