"""POST /generate: SGLang's body (``text``/``sampling_params``) and LMDeploy's (flat fields).

Which dialect a body speaks (API_SURFACE.md, ``dialect_of``): ``text`` or
``sampling_params`` -> SGLang; ``prompt`` or LMDeploy's flat fields
(``max_tokens``, ``temperature``, ``session_id``, ...) -> LMDeploy; SGLang's
``rid``/``top_logprobs_num``/``logprob_start_len``/``return_text_in_logprobs``
-> SGLang. ``input_ids``, ``stream``, ``return_logprob`` and ``image_data`` are
in both; a body with only those goes by ``--api-dialect`` (``lmdeploy`` ->
LMDeploy, else SGLang).
Both answer ``{text, output_ids, meta_info{id, finish_reason{type, ...},
prompt_tokens, completion_tokens, cached_tokens, e2e_latency, ...}}`` (LMDeploy's
``GenerateReqOutput`` mirrors SGLang's); a batch answers a list. Logprobs
differ: SGLang's ``output_token_logprobs`` are ``[logprob, token_id, text|None]``
triples (plus ``output_top_logprobs`` and the ``input_*`` lists), LMDeploy's
``GenerateReqMetaOutput`` has ``[logprob, token_id]`` pairs only. Streams are
SSE: SGLang sends the cumulative text and ends with ``[DONE]``, LMDeploy sends
the new text, ``output_ids`` and logprobs of each chunk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import APIError
from serving.api.generation import Generation
from serving.api.guides import guide_from_sglang
from serving.api.native_common import NativeState, validate
from serving.api.streaming import DONE, sse_response
from serving.engine.types import SamplingParams, ValidationError

logger = logging.getLogger(__name__)

# Top-level fields only one dialect's /generate body has. Both share input_ids, stream,
# return_logprob and image_data (SGLang's sampling fields sit inside sampling_params).
SGLANG_ONLY = ("text", "sampling_params", "rid", "top_logprobs_num", "logprob_start_len",
               "return_text_in_logprobs")
LMDEPLOY_ONLY = ("prompt", "max_tokens", "session_id", "repetition_penalty", "temperature",
                 "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
                 "skip_special_tokens", "spaces_between_special_tokens",
                 "include_stop_str_in_output", "return_routed_experts", "mm_processor_kwargs")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class SGLSamplingParams(_Loose):
    """SGLang ``sampling_params`` (names and defaults as SGLang's)."""

    max_new_tokens: Optional[int] = Field(128, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = Field(1.0, gt=0)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = Field(1, ge=1, le=128)
    sampling_seed: Optional[int] = None
    seed: Optional[int] = None
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    structural_tag: Optional[str] = None


class SGLGenerateRequest(_Loose):
    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: Optional[Union[SGLSamplingParams, list[SGLSamplingParams]]] = None
    rid: Optional[Union[str, list[str]]] = None
    stream: bool = False
    return_logprob: Optional[Union[bool, list[bool]]] = False
    logprob_start_len: Optional[Union[int, list[int]]] = -1
    top_logprobs_num: Optional[Union[int, list[int]]] = 0
    return_text_in_logprobs: bool = False
    image_data: Optional[Any] = None


class LMDGenerateRequest(_Loose):
    """LMDeploy's ``/generate`` body (defaults from its OpenAPI schema)."""

    prompt: Optional[str] = None
    input_ids: Optional[list[int]] = None
    max_tokens: int = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(1.0, gt=0)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = False
    include_stop_str_in_output: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    spaces_between_special_tokens: Optional[bool] = True
    stream: Optional[bool] = False
    return_logprob: Optional[bool] = None
    session_id: Optional[int] = -1
    image_data: Optional[Any] = None


@dataclasses.dataclass
class GenerateJob:
    """The engine work behind one /generate call, dialect-independent."""

    dialect: str  # "sglang" | "lmdeploy"
    prompts: list[list[int]]
    params: list[SamplingParams]
    rids: list[str]
    stream: bool
    batch: bool  # answer a list
    return_logprob: bool = False
    top_logprobs_num: int = 0
    input_logprobs: bool = False
    return_text_in_logprobs: bool = False
    session_id: Optional[int] = None
    weight_version: str = "default"


def dialect_of(body: dict, default: str = "sglang") -> str:
    """"sglang" or "lmdeploy" for a /generate body.

    ``text``/``sampling_params`` -> SGLang (API_SURFACE.md); then ``prompt`` or
    a flat LMDeploy field (``max_tokens``, ``temperature``, ``session_id``, ...;
    SGLang keeps those inside ``sampling_params``) -> LMDeploy; then an
    SGLang-only field (``rid``, ``top_logprobs_num``, ``logprob_start_len``,
    ``return_text_in_logprobs``) -> SGLang. A body of shared fields only
    (``input_ids``, ``stream``, ``return_logprob``, ``image_data``) gets
    ``default``: "lmdeploy" under ``--api-dialect lmdeploy``, else "sglang".
    """
    if "text" in body or "sampling_params" in body:
        return "sglang"
    if any(k in body for k in LMDEPLOY_ONLY):  # SGLang never has flat sampling fields
        return "lmdeploy"
    if any(k in body for k in SGLANG_ONLY):
        return "sglang"
    return default


def _per_item(val, i: int):
    return val[i] if isinstance(val, list) else val


def _params(sp, *, vocab: int, logprobs: Optional[int], prompt_logprobs: Optional[int],
            seed: Optional[int] = None) -> SamplingParams:
    try:
        params = SamplingParams(**sp, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                seed=seed)
        params.validate_vocab(vocab)
        return params
    except ValidationError as exc:
        raise APIError(str(exc), 400, exc.param) from None
    except (ValueError, TypeError) as exc:
        raise APIError(str(exc), 400) from None


def _encode(state, text: str) -> list[int]:
    ids = state.tokenizer.encode(text)
    if not ids:
        raise APIError("the prompt must not be empty", 400, "text")
    return ids


def _check_ids(state, ids: list[int], param: str) -> list[int]:
    vocab = int(state.engine.model_config.vocab_size)
    if not ids:
        raise APIError(f"`{param}` must not be empty", 400, param)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(f"`{param}` holds out-of-vocab ids {bad[:5]} (vocab size {vocab})", 400,
                       param)
    return list(ids)


def parse_sglang(state, body: dict, base_id: str) -> GenerateJob:
    """SGLang ``GenerateReqInput`` -> GenerateJob (``n`` > 1 expands into several)."""
    req = validate(SGLGenerateRequest, body)
    if (req.text is None) == (req.input_ids is None):
        raise APIError("exactly one of `text` or `input_ids` is required", 400, "text")
    if req.image_data is not None:
        raise APIError("`image_data` needs a multimodal model; this one is text-only", 400,
                       "image_data")
    if req.text is not None:
        batch = isinstance(req.text, list)
        texts = req.text if batch else [req.text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError("`text` must be a string or a non-empty list of strings", 400, "text")
        prompts = [_encode(state, t) for t in texts]
    else:
        batch = bool(req.input_ids) and isinstance(req.input_ids[0], list)
        lists = req.input_ids if batch else [req.input_ids]
        prompts = [_check_ids(state, p, "input_ids") for p in lists]
    sps = req.sampling_params or SGLSamplingParams()
    if isinstance(sps, list) and len(sps) != len(prompts):
        raise APIError("`sampling_params` list must match the batch size", 400, "sampling_params")
    vocab = int(state.engine.model_config.vocab_size)
    rlp = bool(_per_item(req.return_logprob, 0))
    top = int(_per_item(req.top_logprobs_num, 0) or 0)
    start = _per_item(req.logprob_start_len, 0)
    start = -1 if start is None else int(start)
    out_prompts, params, rids = [], [], []
    rid_list = req.rid if isinstance(req.rid, list) else None
    if rid_list is not None and len(rid_list) != len(prompts):
        raise APIError("`rid` list must match the batch size", 400, "rid")
    for i, ids in enumerate(prompts):
        sp = _per_item(sps, i)
        guide = guide_from_sglang(sp)  # json_schema / regex / ebnf
        max_new = sp.max_new_tokens
        if max_new is not None and len(ids) + max_new > state.max_model_len:
            raise APIError(f"Requested token count exceeds the model's maximum context length "
                           f"of {state.max_model_len} tokens. You requested a total of "
                           f"{len(ids) + max_new} tokens: {len(ids)} tokens from the input "
                           f"messages and {max_new} tokens for the completion.", 400,
                           "max_new_tokens")
        if max_new == 0:
            raise APIError("max_new_tokens=0 (prefill only) is not supported; use >= 1", 400,
                           "max_new_tokens")
        kw = dict(n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                  min_p=sp.min_p, frequency_penalty=sp.frequency_penalty,
                  presence_penalty=sp.presence_penalty, repetition_penalty=sp.repetition_penalty,
                  max_tokens=max_new, min_tokens=sp.min_new_tokens,
                  stop=[sp.stop] if isinstance(sp.stop, str) else list(sp.stop or []),
                  stop_token_ids=list(sp.stop_token_ids or []), ignore_eos=sp.ignore_eos,
                  include_stop_str_in_output=sp.no_stop_trim,
                  skip_special_tokens=sp.skip_special_tokens,
                  spaces_between_special_tokens=sp.spaces_between_special_tokens, guide=guide)
        seed = sp.sampling_seed if sp.sampling_seed is not None else sp.seed
        params.append(_params(kw, vocab=vocab, logprobs=top if rlp else None,
                              prompt_logprobs=top if rlp and start >= 0 else None, seed=seed))
        out_prompts.append(ids)
        if rid_list is not None:
            rids.append(str(rid_list[i]))
        elif isinstance(req.rid, str) and len(prompts) == 1:
            rids.append(req.rid)
        else:
            rids.append(f"{req.rid or base_id}-{i}" if len(prompts) > 1 else base_id)
    n_total = sum(p.n for p in params)
    return GenerateJob("sglang", out_prompts, params, rids, req.stream,
                       batch or n_total > 1, rlp, top, rlp and start >= 0,
                       req.return_text_in_logprobs)


def parse_lmdeploy(state, body: dict, base_id: str) -> GenerateJob:
    """LMDeploy ``GenerateReqInput`` (flat fields) -> GenerateJob."""
    req = validate(LMDGenerateRequest, body)
    if (req.prompt is None) == (req.input_ids is None):
        raise APIError("exactly one of `prompt` or `input_ids` is required", 400, "prompt")
    if req.image_data is not None:
        raise APIError("`image_data` needs a multimodal model; this one is text-only", 400,
                       "image_data")
    ids = _encode(state, req.prompt) if req.prompt is not None else _check_ids(
        state, req.input_ids, "input_ids")
    if req.max_tokens < 1:
        raise APIError("max_tokens must be at least 1", 400, "max_tokens")
    if len(ids) + req.max_tokens > state.max_model_len:
        raise APIError(f"This model's maximum context length is {state.max_model_len} tokens. "
                       f"However, you requested {len(ids) + req.max_tokens} tokens "
                       f"({len(ids)} in the prompt, {req.max_tokens} in the completion).", 400,
                       "max_tokens")
    kw = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or -1,
              min_p=req.min_p, repetition_penalty=req.repetition_penalty or 1.0,
              max_tokens=req.max_tokens,
              stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
              stop_token_ids=list(req.stop_token_ids or []), ignore_eos=bool(req.ignore_eos),
              include_stop_str_in_output=bool(req.include_stop_str_in_output),
              skip_special_tokens=req.skip_special_tokens is not False,
              spaces_between_special_tokens=req.spaces_between_special_tokens is not False)
    params = _params(kw, vocab=int(state.engine.model_config.vocab_size),
                     logprobs=0 if req.return_logprob else None, prompt_logprobs=None)
    session = req.session_id if req.session_id is not None and req.session_id >= 0 else None
    rid = f"session-{session}-{base_id}" if session is not None else base_id
    return GenerateJob("lmdeploy", [ids], [params], [rid], bool(req.stream), False,
                       bool(req.return_logprob), 0, False, False, session)


# --------------------------------------------------------------------- output


def _finish_reason(comp, params: SamplingParams) -> Optional[dict]:
    reason = comp.finish_reason
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": len(comp.token_ids)}
    if reason == "stop":
        matched = comp.stop_reason
        if matched is None and comp.token_ids:
            matched = comp.token_ids[-1]
        return {"type": "stop", "matched": matched}
    if reason == "abort":
        return {"type": "abort", "message": "Abort request"}
    return {"type": reason}


def _lmd_pairs(positions) -> list:
    """Engine PositionLogprobs -> LMDeploy ``[[logprob, id]]`` (the sampled token's)."""
    pairs = []
    for pos in positions:
        if pos is None:
            pairs.append(None)
            continue
        tid, lp = next(iter(pos.items()))
        pairs.append([lp.logprob, tid])
    return pairs


def _lp_triples(state, positions, with_text: bool, top: int):
    """Engine PositionLogprobs -> SGLang ``[[logprob, id, text|None]]`` (+ top lists)."""
    tok = state.tokenizer
    chosen, tops = [], []
    for pos in positions:
        if pos is None:
            chosen.append(None)
            tops.append(None)
            continue
        items = list(pos.items())
        tid, lp = items[0]
        chosen.append([lp.logprob, tid, tok.decode([tid]) if with_text else None])
        ranked = sorted(items, key=lambda kv: (kv[1].rank or 0))
        tops.append([[l.logprob, t, tok.decode([t]) if with_text else None]
                     for t, l in ranked if l.rank is not None and l.rank <= top][:top])
    return chosen, tops


def result_dict(state, job: GenerateJob, rid: str, out, comp, params, start: float,
                text: Optional[str] = None, first_token: int = 0) -> dict:
    """One ``{text, output_ids, meta_info}`` object.

    ``text``/``first_token``: an LMDeploy stream chunk's new text and the index
    of its first new token (its ``output_ids`` and logprobs are the new ones).
    """
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": _finish_reason(comp, params),
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": len(comp.token_ids),
        "cached_tokens": getattr(out.metrics, "num_cached_tokens", 0) or 0,
        "e2e_latency": time.time() - start,
        "weight_version": job.weight_version,
    }
    if job.return_logprob and comp.logprobs is not None:
        if job.dialect == "lmdeploy":  # GenerateReqMetaOutput: (logprob, token_id)
            meta["output_token_logprobs"] = _lmd_pairs(comp.logprobs[first_token:])
        else:
            chosen, tops = _lp_triples(state, comp.logprobs, job.return_text_in_logprobs,
                                       job.top_logprobs_num)
            meta["output_token_logprobs"] = chosen
            meta["output_top_logprobs"] = tops
    if job.input_logprobs and out.prompt_logprobs is not None:
        first = out.prompt_token_ids[0]
        chosen, tops = _lp_triples(state, out.prompt_logprobs[1:], job.return_text_in_logprobs,
                                   job.top_logprobs_num)
        first_text = state.tokenizer.decode([first]) if job.return_text_in_logprobs else None
        meta["input_token_logprobs"] = [[None, first, first_text]] + chosen
        meta["input_top_logprobs"] = [None] + tops
    return {"text": comp.text if text is None else text,
            "output_ids": list(comp.token_ids[first_token:]), "meta_info": meta}


async def run_generate(state, native: NativeState, job: GenerateJob):
    """Submits the job; returns a dict/list (or an SSE response when streaming)."""
    job.weight_version = native.weight_version
    gen = Generation(state, job.rids[0], job.prompts, job.params)
    gen.request_ids = list(job.rids)
    gen.submit()
    keys = list(job.rids) + ([str(job.session_id)] if job.session_id is not None else [])
    for k in keys:
        native.running[k] = gen
    start = time.time()

    def release():
        for k in keys:
            if native.running.get(k) is gen:
                del native.running[k]

    if job.stream:
        return sse_response(_stream(state, job, gen, start, release))
    final: dict[int, Any] = {}
    try:
        async for i, out in gen.outputs():
            if out.finished:
                final[i] = out
    finally:
        release()
    results = []
    for i in range(len(job.prompts)):
        out = final[i]
        for comp in out.outputs:
            rid = job.rids[i] if len(out.outputs) == 1 else f"{job.rids[i]}-{comp.index}"
            results.append(result_dict(state, job, rid, out, comp, job.params[i], start))
    return results if job.batch else results[0]


async def _stream(state, job: GenerateJob, gen: Generation, start: float, release):
    sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, choice) -> (chars, tokens)
    try:
        async for i, out in gen.outputs():
            for comp in out.outputs:
                rid = job.rids[i] if len(out.outputs) == 1 else f"{job.rids[i]}-{comp.index}"
                if job.dialect == "lmdeploy":  # each chunk: the new text, ids and logprobs
                    done, first = sent.get((i, comp.index), (0, 0))
                    sent[(i, comp.index)] = (len(comp.text), len(comp.token_ids))
                    obj = result_dict(state, job, rid, out, comp, job.params[i], start,
                                      comp.text[done:], first)
                else:
                    obj = result_dict(state, job, rid, out, comp, job.params[i], start)
                    obj["index"] = i
                yield f"data: {json.dumps(obj)}\n\n"
        if job.dialect == "sglang":
            yield DONE
    finally:
        release()
