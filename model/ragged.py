"""Packs sequences into one token-major ragged batch (host numpy, one helper for all).

The engine's runner, decoder embeddings and the reference generator all lay a
batch out the same way: every sequence's new tokens concatenated, then
padding up to a bucket size. Padding tokens write to slot 0 (the scratch
page) and padding sequences have zero query and context length, so the
kernels skip them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from model.attention import AttentionMetadata


@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """Host inputs of one forward pass over a ragged batch."""

    input_ids: np.ndarray  # [num_tokens] int32 (zeros past the real tokens)
    positions: np.ndarray  # [num_tokens] int32 absolute position of each token
    metadata: AttentionMetadata  # block tables, lengths, offsets, slots
    logits_indices: np.ndarray  # [num_seqs] int32 each sequence's last token (0: padding)


def pack_ragged(token_ids: Sequence[Sequence[int]], start_positions: Sequence[int],
                block_tables: Sequence[Sequence[int]], *, page_size: int, num_tokens: int,
                num_seqs: int, pages_per_seq: int, max_q_len: int,
                attention_backend: str = "auto") -> RaggedBatch:
    """Lays sequences out token-major, padded to the given (bucket) sizes.

    Args:
      token_ids: per sequence, the tokens computed this step.
      start_positions: per sequence, the position of its first token here
        (the number of tokens already in the cache).
      block_tables: per sequence, its page ids (at least enough for its
        context); columns past ``pages_per_seq`` are dropped.
      page_size: tokens per KV page.
      num_tokens, num_seqs, pages_per_seq: padded sizes; must hold the batch.
      max_q_len: static bound on any sequence's query length.
      attention_backend: ``AttentionMetadata.attention_backend``.

    Raises:
      ValueError: the batch does not fit the padded sizes.
    """
    total = sum(len(t) for t in token_ids)
    if len(token_ids) > num_seqs or total > num_tokens:
        raise ValueError(f"{len(token_ids)} sequences of {total} tokens do not fit "
                         f"num_seqs={num_seqs}, num_tokens={num_tokens}")
    input_ids = np.zeros((num_tokens,), np.int32)
    positions = np.zeros((num_tokens,), np.int32)
    slots = np.zeros((num_tokens,), np.int32)  # padding writes go to scratch page 0
    tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    seq_lens = np.zeros((num_seqs,), np.int32)
    qsl = np.zeros((num_seqs + 1,), np.int32)
    logits_indices = np.zeros((num_seqs,), np.int32)
    cursor = 0
    for i, (tokens, start, table) in enumerate(zip(token_ids, start_positions, block_tables)):
        n = len(tokens)
        pos = np.arange(start, start + n, dtype=np.int32)
        table = np.asarray(table, np.int32)
        input_ids[cursor:cursor + n] = tokens
        positions[cursor:cursor + n] = pos
        slots[cursor:cursor + n] = table[pos // page_size] * page_size + pos % page_size
        used = min(len(table), pages_per_seq)
        tables[i, :used] = table[:used]
        seq_lens[i] = start + n
        cursor += n
        qsl[i + 1] = cursor
        logits_indices[i] = cursor - 1
    qsl[len(token_ids) + 1:] = cursor
    md = AttentionMetadata(block_tables=tables, seq_lens=seq_lens, query_start_loc=qsl,
                           slot_mapping=slots, max_q_len=max_q_len,
                           attention_backend=attention_backend)
    return RaggedBatch(input_ids, positions, md, logits_indices)
