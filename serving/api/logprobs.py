"""Engine logprobs -> the completions and chat ``logprobs`` objects.

The engine gives, per position, ``{token_id: Logprob}`` holding the chosen token
and the top alternatives. Completions want parallel lists (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``); chat wants a list of
``{token, logprob, bytes, top_logprobs}``. ``-inf`` becomes -9999.0 (as in vLLM)
because JSON has no infinity.
"""

from __future__ import annotations

import math
from typing import Optional

from serving.api.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs,
                                  CompletionLogProbs, TopLogprob)


def _finite(x: float) -> float:
    return max(float(x), -9999.0) if not math.isnan(x) else -9999.0


class TokenText:
    """Decodes single tokens (cached), or spells them ``token_id:N`` when asked."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self._tok = tokenizer
        self._as_ids = as_ids
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int, decoded: Optional[str] = None) -> str:
        if self._as_ids:
            return f"token_id:{token_id}"
        if decoded is not None:
            return decoded
        text = self._cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id])
            self._cache[token_id] = text
        return text


def _ranked(step: dict, num: int) -> list[tuple[int, object]]:
    items = sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 10**9,
                                                 -kv[1].logprob))
    return items[:num]


def completion_logprobs(token_ids: list[int], steps: list[Optional[dict]], num_top: int,
                        text: TokenText, initial_offset: int = 0) -> CompletionLogProbs:
    """Builds the completions ``logprobs`` object for ``token_ids``.

    Args:
        token_ids: the tokens, one per position.
        steps: per position ``{token_id: Logprob}``, or None (e.g. the first
            prompt token, which has no logprob).
        num_top: how many alternatives to list per position.
        text: the token-to-text function.
        initial_offset: character offset of the first token (echo: 0; else
            the length of text already sent).
    """
    out = CompletionLogProbs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    offset = initial_offset
    for tid, step in zip(token_ids, steps):
        lp = step.get(tid) if step else None
        tok = text(tid, lp.decoded_token if lp else None)
        out.tokens.append(tok)
        out.text_offset.append(offset)
        offset += len(tok)
        if step is None or lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(lp.logprob))
        top = {text(t, p.decoded_token): _finite(p.logprob) for t, p in _ranked(step, num_top)}
        top.setdefault(tok, _finite(lp.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(token_ids: list[int], steps: list[Optional[dict]], num_top: int,
                  text: TokenText) -> ChatCompletionLogProbs:
    """Builds the chat ``logprobs`` object (``{"content": [...]}``) for ``token_ids``."""
    content = []
    for tid, step in zip(token_ids, steps):
        lp = step.get(tid) if step else None
        tok = text(tid, lp.decoded_token if lp else None)
        value = _finite(lp.logprob) if lp else -9999.0
        tops = []
        if step and num_top > 0:
            for t, p in _ranked(step, num_top):
                s = text(t, p.decoded_token)
                tops.append(TopLogprob(token=s, logprob=_finite(p.logprob),
                                       bytes=list(s.encode("utf-8", errors="replace"))))
        content.append(ChatCompletionLogProb(token=tok, logprob=value,
                                             bytes=list(tok.encode("utf-8", errors="replace")),
                                             top_logprobs=tops))
    return ChatCompletionLogProbs(content=content)
