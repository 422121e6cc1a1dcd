"""Guided decoding (structured output) on the host, with llguidance.

A request's :class:`GuideSpec` (JSON schema, regex,
choice list or Lark/GBNF grammar) becomes an llguidance grammar string once
(``grammar_of``, cached by spec). Each sequence of the request gets its own
:class:`GuideMatcher`; every step the engine asks it for the packed bitmask of
tokens that may come next (``next_mask``, ``[ceil(V_tok / 32)]`` int32, bit
``t % 32`` of word ``t // 32`` set when token ``t`` is allowed), the runner
stacks the masks of a batch (``bitmask_table``) and the sampler drops every
token whose bit is clear. After sampling the engine feeds the token back
(``advance``); once the grammar is complete and cannot be extended the
sequence finishes with reason ``stop``. EOS is allowed only while the grammar
is in an accepting state.

No jax import here: this runs on the engine thread beside the scheduler.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from typing import Iterable, Optional

import numpy as np

from serving.engine.errors import ValidationError

logger = logging.getLogger(__name__)

_JSON_DEFAULTS = {"whitespace_flexible": False}  # compact JSON: small models loop on whitespace


@dataclasses.dataclass(frozen=True)
class GuideSpec:
    """A structured-output constraint (guided decoding), compiled by this module.

    Attributes:
        kind: ``"json"`` (a JSON schema), ``"regex"``, ``"choice"`` (a JSON
            list of strings) or ``"grammar"`` (Lark or GBNF/EBNF).
        spec: the schema, pattern, choice list or grammar, as a string.
        param: the request parameter it came from, named in 400 errors
            (``guided_json``, ``response_format``, ``sampling_params.regex``...).
        whitespace_pattern: for ``"json"``: a regex for the whitespace between
            tokens (vLLM's ``guided_whitespace_pattern``); None: compact JSON.
    """

    kind: str
    spec: str
    param: str = "guided_decoding"
    whitespace_pattern: Optional[str] = None

    KINDS = ("json", "regex", "choice", "grammar")


def _error(spec: GuideSpec, what: str, detail: str) -> ValidationError:
    return ValidationError(spec.param, f"{spec.param}: invalid {what}: {detail.strip()}")


@functools.lru_cache(maxsize=256)
def grammar_of(spec: GuideSpec) -> str:
    """Compiles a spec to an llguidance grammar string (not yet checked; cached).

    Raises:
        ValidationError: naming ``spec.param`` when the spec is not even
            well-formed (a JSON schema that is not a JSON object, a choice list
            that is not a list of strings, an unknown kind).
    """
    import llguidance

    if spec.kind == "json":
        try:
            schema = json.loads(spec.spec)
        except ValueError as exc:
            raise _error(spec, "JSON schema", f"not valid JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise _error(spec, "JSON schema", "the schema must be a JSON object")
        defaults = dict(_JSON_DEFAULTS)
        if spec.whitespace_pattern is not None:
            defaults = {"whitespace_flexible": True,
                        "whitespace_pattern": spec.whitespace_pattern}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
        except (ValueError, TypeError) as exc:
            raise _error(spec, "JSON schema", str(exc)) from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        try:
            choices = json.loads(spec.spec)
        except ValueError:
            choices = None
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise _error(spec, "choice list", "expected a non-empty list of non-empty strings")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "grammar":
        try:
            return llguidance.grammar_from("grammar", spec.spec)  # Lark, or GBNF converted
        except ValueError as exc:
            raise _error(spec, "grammar", str(exc)) from None
    raise ValidationError(spec.param, f"unknown guide kind {spec.kind!r}; expected one of "
                                      f"{', '.join(GuideSpec.KINDS)}")


@functools.lru_cache(maxsize=256)
def check_guide(spec: GuideSpec) -> None:
    """Validates a spec without a tokenizer (cached; fast for typical specs).

    Raises:
        ValidationError: naming ``spec.param``, with llguidance's message.
    """
    import llguidance

    message = llguidance.LLMatcher.validate_grammar(grammar_of(spec))
    if message and not message.startswith("WARNING"):
        raise _error(spec, {"json": "JSON schema", "regex": "regex", "choice": "choice list",
                            "grammar": "grammar"}.get(spec.kind, "guide"), message)


class GuideMatcher:
    """One sequence's grammar state: next-token masks in, sampled tokens out."""

    def __init__(self, matcher, mask_words: int):
        self._matcher = matcher
        self._mask = np.full((1, mask_words), -1, np.int32)

    def next_mask(self) -> np.ndarray:
        """The allowed next tokens: [ceil(V_tok / 32)] int32 packed bits (a fresh copy)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._mask, 0)
        return self._mask[0].copy()

    def advance(self, token: int) -> bool:
        """Consumes a sampled token; returns True when the sequence should stop.

        The sequence stops when the grammar is complete and cannot go on (the
        matcher allows only EOS), or when the token was not allowed (the
        matcher is then in an error state, logged).
        """
        m = self._matcher
        if not m.consume_token(int(token)):
            logger.warning("guided decoding: token %d rejected (%s); stopping the sequence",
                           token, m.get_error())
            return True
        return m.is_stopped()

    def is_accepting(self) -> bool:
        """Whether the output so far is a complete match (EOS would be allowed)."""
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """Whether the grammar is complete and accepts nothing but EOS."""
        return self._matcher.is_stopped()


class GuideCompiler:
    """Per-engine guided-decoding state: the llguidance tokenizer, built on first use.

    Args:
        tokenizer: the engine's Hugging Face (fast) tokenizer.
        eos_ids: token ids that end a sequence; the grammar allows them only
            in an accepting state.
    """

    def __init__(self, tokenizer, eos_ids: Iterable[int] = ()):
        self._hf = tokenizer
        self._eos = sorted(int(t) for t in eos_ids)
        self._lock = threading.Lock()
        self._tokenizer = None

    @property
    def ll_tokenizer(self):
        """The llguidance tokenizer (~0.5 s to build once, then shared)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf, eos_token=self._eos or None)
                except Exception as exc:
                    raise ValidationError(
                        "guided_decoding", f"guided decoding needs a fast (Rust) Hugging Face "
                                           f"tokenizer; this model's tokenizer failed: {exc}"
                    ) from None
            return self._tokenizer

    @property
    def mask_words(self) -> int:
        """Width of one packed mask: ceil(tokenizer vocab / 32)."""
        return (self.ll_tokenizer.vocab_size + 31) // 32

    def check(self, spec: GuideSpec) -> None:
        """Validates a spec against this tokenizer (raises ValidationError)."""
        check_guide(spec)
        self._check_with_tokenizer(spec)

    @functools.lru_cache(maxsize=256)
    def _check_with_tokenizer(self, spec: GuideSpec) -> None:
        import llguidance

        message = llguidance.LLMatcher.validate_grammar(grammar_of(spec), self.ll_tokenizer)
        if message and not message.startswith("WARNING"):
            raise ValidationError(spec.param, f"{spec.param}: {message.strip()}")

    def matcher(self, spec: GuideSpec) -> GuideMatcher:
        """A fresh matcher for one sequence (about a millisecond)."""
        import llguidance

        m = llguidance.LLMatcher(self.ll_tokenizer, grammar_of(spec), log_level=0)
        if m.is_error():
            raise ValidationError(spec.param, f"{spec.param}: {m.get_error().strip()}")
        return GuideMatcher(m, self.mask_words)


def bitmask_table(masks: list[tuple[int, np.ndarray]], num_rows: int,
                  vocab_size: int) -> np.ndarray:
    """Stacks per-row masks into the sampler's table.

    Args:
        masks: ``(row, mask)`` pairs; each mask is [ceil(V_tok / 32)] int32.
        num_rows: S, the padded batch.
        vocab_size: V, the model's logits width (may exceed the tokenizer's).

    Returns:
        [S, ceil(V / 32)] int32: rows without a mask are all ones; bits beyond a
        mask's width (tokens the tokenizer does not have) are zero. With no
        masks at all, a [S, 1] placeholder (the sampler ignores it).
    """
    if not masks:
        return np.full((num_rows, 1), -1, np.int32)
    words = (vocab_size + 31) // 32
    out = np.full((num_rows, words), -1, np.int32)
    for row, mask in masks:
        n = min(len(mask), words)
        out[row, :n] = mask[:n]
        out[row, n:] = 0
    return out


def spec_from_json_value(value, param: str, whitespace_pattern: Optional[str] = None) -> GuideSpec:
    """A ``"json"`` spec from a schema given as a dict or a JSON string.

    Raises:
        ValidationError: naming ``param`` when a string is not JSON or the
            schema is not an object.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValidationError(param, f"{param}: invalid JSON schema: not valid JSON "
                                         f"({exc})") from None
    if not isinstance(value, dict):
        raise ValidationError(param, f"{param}: invalid JSON schema: the schema must be a "
                                     "JSON object")
    return GuideSpec("json", json.dumps(value, sort_keys=False), param, whitespace_pattern)
