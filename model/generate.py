"""A minimal greedy generator over the paged cache, for tests (not the engine).

One sequence: a prefill of the whole prompt, then one token per decode step.
Pages are handed out in a shuffled, non-contiguous order so the block table is
actually exercised.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import api, stacked
from model.attention import KVCache
from model.ragged import pack_ragged


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _step(graphdef, state, input_ids, positions, kv_cache, md):
    hidden, kv_cache = api.forward(graphdef, state, input_ids, positions, kv_cache, md)
    last = hidden[md.query_start_loc[1:] - 1]  # [num_seqs, hidden]
    logits = api.compute_logits(graphdef, state, last)  # [num_seqs, vocab]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), kv_cache


def greedy_generate(model, prompt_ids: Sequence[int], max_new_tokens: int, page_size: int = 16,
                    *, eos_token_ids: Sequence[int] | None = None, seed: int = 0,
                    stacked_layers: bool = False) -> list[int]:
    """Greedy decoding of one prompt.

    Args:
      model: a ``LoadedModel`` or a ``(graphdef, state, config)`` tuple.
      prompt_ids: prompt token ids.
      max_new_tokens: number of tokens to generate at most.
      page_size: KV cache page size.
      eos_token_ids: stop after any of these; default the config's eos ids
        (pass ``()`` to never stop early).
      seed: shuffles the page ids.
      stacked_layers: run the layers as the engine does (one loop over stacked
        weights) rather than unrolled; bfloat16 results can differ in the last
        bit between the two (XLA fuses differently).

    Returns:
      The generated token ids (without the prompt; the eos token included).
    """
    if isinstance(model, tuple):
        graphdef, state, config = model
    else:
        graphdef, state, config = model.graphdef, model.state, model.config
    if stacked_layers:  # the engine's form: layers as one loop (model/stacked.py)
        graphdef, state = stacked.stack(graphdef, state)
    if eos_token_ids is None:
        eos_token_ids = config.eos_token_ids
    prompt = list(prompt_ids)
    if not prompt or max_new_tokens < 1:
        raise ValueError("need a non-empty prompt and max_new_tokens >= 1")
    total = len(prompt) + max_new_tokens
    num_seq_pages = -(-total // page_size)
    num_pages = 2 * num_seq_pages + 1  # page 0 is the scratch page
    pages = np.random.default_rng(seed).permutation(np.arange(1, num_pages))[:num_seq_pages]
    dtype = next(a.dtype for a in jax.tree.leaves(state)  # int8 weights when quantized
                 if jnp.issubdtype(a.dtype, jnp.floating))
    kv_cache = KVCache.zeros(config.num_layers, num_pages, page_size, config.num_kv_heads,
                             config.head_dim, dtype)

    def run(tokens: list[int], start: int):
        batch = pack_ragged([tokens], [start], [pages], page_size=page_size,
                            num_tokens=len(tokens), num_seqs=1, pages_per_seq=len(pages),
                            max_q_len=len(tokens))
        return _step(graphdef, state, batch.input_ids, batch.positions, kv_cache,
                     batch.metadata)

    out: list[int] = []
    next_tok, kv_cache = run(prompt, 0)
    while True:
        token = int(next_tok[0])
        out.append(token)
        if token in eos_token_ids or len(out) == max_new_tokens:
            return out
        next_tok, kv_cache = run([token], len(prompt) + len(out) - 1)
