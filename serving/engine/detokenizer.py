"""Incremental detokenization and stop-string detection (host side, no jax)."""

from __future__ import annotations

from typing import Optional

_CONTEXT = 6  # prompt tokens decoded with the first outputs, for leading spaces


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a small window ``ids[prefix_offset:]`` per token instead of the
    whole output, and holds back text that ends in an incomplete UTF-8
    sequence (U+FFFD) until the next token completes it.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        kwargs = {"skip_special_tokens": self.skip_special_tokens}
        if not self.spaces_between_special_tokens:
            kwargs["spaces_between_special_tokens"] = False
        try:
            return self.tokenizer.decode(ids, **kwargs)
        except TypeError:  # tokenizers without spaces_between_special_tokens
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Appends a token; returns the newly readable text (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


def find_stop(text: str, num_new_chars: int, stops: list[str]) -> Optional[tuple[str, int]]:
    """Finds the earliest stop string that ends in the newest characters.

    Returns ``(stop, start_index)`` or None. Only the tail that could contain
    a stop string touching the new characters is searched.
    """
    if not stops or num_new_chars == 0:
        return None
    best = None
    for stop in stops:
        begin = max(0, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, begin)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    return best
