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
SSE (``data: {json}``) ending with ``data: [DONE]``: SGLang sends the
cumulative text, LMDeploy the new text, ``output_ids`` and logprobs of each
chunk. LMDeploy bodies are checked as LMDeploy's ``check_request`` checks them
and their errors leave in LMDeploy's flat shape (``routes.generate``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import APIError
from serving.api.generation import Deltas, Generation
from serving.api.guides import guide_from_sglang
from serving.api.http import validate
from serving.api.request_mapping import SamplingFields, build_request
from serving.api.streaming import DONE, LMDEPLOY, OPENAI, sse, sse_response
from serving.engine.types import SamplingParams

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
    """LMDeploy's ``/generate`` body (fields and defaults of its ``GenerateReqInput``;
    the value checks are ``check_lmdeploy``'s, worded as LMDeploy words them)."""

    prompt: Optional[str] = None
    input_ids: Optional[list[int]] = None
    max_tokens: int = 128
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
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


def check_lmdeploy(req: LMDGenerateRequest) -> None:
    """LMDeploy's ``check_request`` of ``/generate`` (400 with its messages)."""
    if (req.prompt is None) == (req.input_ids is None):
        raise APIError("You must specify exactly one of prompt or input_ids", 400, "prompt")
    if req.prompt is not None and not req.prompt:
        raise APIError("The prompt must not be an empty string", 400, "prompt")
    if req.input_ids is not None and not req.input_ids:
        raise APIError("The input_ids must not be an empty list", 400, "input_ids")
    if req.max_tokens <= 0:
        raise APIError(f"The max_tokens {req.max_tokens!r} must be a positive integer.", 400,
                       "max_tokens")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(f"The top_p {req.top_p!r} must be in (0, 1].", 400, "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise APIError(f"The top_k {req.top_k!r} cannot be a negative integer.", 400, "top_k")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise APIError(f"The temperature {req.temperature!r} must be in [0, 2]", 400,
                       "temperature")


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
        prompts, param = (req.text if batch else [req.text]), "text"
        if not prompts or not all(isinstance(t, str) for t in prompts):
            raise APIError("`text` must be a string or a non-empty list of strings", 400, "text")
    else:
        batch = bool(req.input_ids) and isinstance(req.input_ids[0], list)
        prompts, param = (req.input_ids if batch else [req.input_ids]), "input_ids"
    sps = req.sampling_params or SGLSamplingParams()
    if isinstance(sps, list) and len(sps) != len(prompts):
        raise APIError("`sampling_params` list must match the batch size", 400, "sampling_params")
    rid_list = req.rid if isinstance(req.rid, list) else None
    if rid_list is not None and len(rid_list) != len(prompts):
        raise APIError("`rid` list must match the batch size", 400, "rid")
    rlp = bool(_per_item(req.return_logprob, 0))
    top = int(_per_item(req.top_logprobs_num, 0) or 0)
    start = _per_item(req.logprob_start_len, 0)
    input_lp = rlp and start is not None and int(start) >= 0
    ids, params = [], []
    for i, prompt in enumerate(prompts):
        sp = _per_item(sps, i)
        if sp.max_new_tokens == 0:
            raise APIError("max_new_tokens=0 (prefill only) is not supported; use >= 1", 400,
                           "max_new_tokens")
        fields = SamplingFields(
            n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
            frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
            repetition_penalty=sp.repetition_penalty, max_tokens=sp.max_new_tokens,
            min_tokens=sp.min_new_tokens, stop=sp.stop, stop_token_ids=sp.stop_token_ids,
            ignore_eos=sp.ignore_eos, include_stop_str_in_output=sp.no_stop_trim,
            skip_special_tokens=sp.skip_special_tokens,
            spaces_between_special_tokens=sp.spaces_between_special_tokens,
            seed=sp.sampling_seed if sp.sampling_seed is not None else sp.seed,
            logprobs=top if rlp else None, prompt_logprobs=top if input_lp else None,
            guide=guide_from_sglang(sp), max_tokens_param="max_new_tokens")
        er = build_request(state, [prompt], fields, prompt_param=param)
        ids += er.prompts
        params += er.params
    if rid_list is not None:
        rids = [str(r) for r in rid_list]
    elif isinstance(req.rid, str) and len(prompts) == 1:
        rids = [req.rid]
    else:
        rids = [f"{req.rid or base_id}-{i}" for i in range(len(prompts))] \
            if len(prompts) > 1 else [base_id]
    n_total = sum(p.n for p in params)
    return GenerateJob("sglang", ids, params, rids, req.stream, batch or n_total > 1, rlp, top,
                       input_lp, req.return_text_in_logprobs)


def parse_lmdeploy(state, body: dict, base_id: str) -> GenerateJob:
    """LMDeploy ``GenerateReqInput`` (flat fields) -> GenerateJob."""
    req = validate(LMDGenerateRequest, body)
    check_lmdeploy(req)
    if req.image_data is not None:
        raise APIError("`image_data` needs a multimodal model; this one is text-only", 400,
                       "image_data")
    fields = SamplingFields(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, max_tokens=req.max_tokens, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=bool(req.ignore_eos),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
        spaces_between_special_tokens=req.spaces_between_special_tokens is not False,
        logprobs=0 if req.return_logprob else None)
    prompt, param = (req.prompt, "prompt") if req.prompt is not None else (req.input_ids,
                                                                          "input_ids")
    er = build_request(state, [prompt], fields, prompt_param=param)
    session = req.session_id if req.session_id is not None and req.session_id >= 0 else None
    rid = f"session-{session}-{base_id}" if session is not None else base_id
    return GenerateJob("lmdeploy", er.prompts, er.params, [rid], bool(req.stream), False,
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
    meta: dict[str, Any] = {} if job.dialect == "sglang" else {
        "output_token_logprobs": None, "routed_experts": None}  # LMDeploy: every key present
    meta.update({
        "id": rid,
        "finish_reason": _finish_reason(comp, params),
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": len(comp.token_ids),
        "cached_tokens": getattr(out.metrics, "num_cached_tokens", 0) or 0,
        "e2e_latency": time.time() - start,
        "weight_version": job.weight_version,
    })
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


async def run_generate(state, job: GenerateJob):
    """Submits the job; returns a dict/list (or an SSE response when streaming)."""
    job.weight_version = state.weight_version
    gen = Generation(state, job.rids[0], job.prompts, job.params, request_ids=job.rids,
                     abort_keys=tuple(job.rids), session_id=job.session_id).submit()
    start = time.time()
    if job.stream:
        framing = LMDEPLOY if job.dialect == "lmdeploy" else OPENAI
        return sse_response(_stream(state, job, gen, start), framing=framing)
    results = []
    for i, out in enumerate(await gen.finals()):
        for comp in out.outputs:
            results.append(result_dict(state, job, _rid(job, i, out, comp), out, comp,
                                       job.params[i], start))
    return results if job.batch else results[0]


def _rid(job: GenerateJob, i: int, out, comp) -> str:
    return job.rids[i] if len(out.outputs) == 1 else f"{job.rids[i]}-{comp.index}"


async def _stream(state, job: GenerateJob, gen: Generation, start: float):
    deltas = Deltas()
    async for i, out in gen.checked_outputs():
        for comp in out.outputs:
            d = deltas.update(i, comp)
            if d is None:
                continue
            rid = _rid(job, i, out, comp)
            if job.dialect == "lmdeploy":  # each chunk: the new text, ids and logprobs
                obj = result_dict(state, job, rid, out, comp, job.params[i], start, d.text,
                                  len(comp.token_ids) - len(d.token_ids))
            else:  # SGLang: cumulative text and ids
                obj = result_dict(state, job, rid, out, comp, job.params[i], start)
                obj["index"] = i
            yield sse(obj)
    yield DONE
