"""Pooling routes (a Blueprint): embeddings, encode, pooling, score, rerank, classify (vLLM, SGLang, RTP-LLM).

Every route checks the loaded model's task first and answers a 400 naming what
the model is when it does not fit (never 404/500). Shapes:

* ``/v1/embeddings`` and RTP's ``/v1/embeddings/dense``: OpenAI's list of
  ``{object: "embedding", embedding, index}``; ``encoding_format: base64`` is
  little-endian float32; ``dimensions`` keeps the first features (Matryoshka)
  and re-normalises when the model normalises.
* ``/encode`` (SGLang): ``{embedding, meta_info}`` (a list for a list).
* ``/pooling`` (vLLM/LMDeploy): ``data[{index, object: "pooling", data}]``.
* ``/score`` (vLLM): ``text_1`` x ``text_2`` (1:1, 1:N, N:N); a cross-encoder's
  sigmoid (one label) or an embedding model's cosine similarity.
* ``/rerank``, ``/v1/rerank``, ``/v2/rerank``: vLLM/Jina ``results`` sorted by
  ``relevance_score``; SGLang's bare list under ``--api-dialect sglang``.
* ``/classify``: ``input`` -> vLLM's ``data[{index, label, probs,
  num_classes}]``; ``text`` -> SGLang's list of ``{embedding: [score]}``.
* ``/v1/classifier`` (RTP): ``results[{index, label, probs, relevance_score}]``.
* ``/v1/embeddings/sparse`` (RTP): per input, ``{token_id: weight}`` where the
  weight of a token is ``max(0, cos(h_t, e))`` -- the cosine between the
  token's last-layer vector ``h_t`` and the input's pooled embedding ``e``,
  maximised over the token's occurrences; special tokens are left out. There
  is no trained sparse head (as in BGE-M3), so this is a label-free relevance
  weighting.
* ``/v1/embeddings/colbert`` (RTP): per input, the L2-normalised last-layer
  vector of every token (special tokens included; no ColBERT projection).
* ``/v1/embeddings/similarity`` (RTP): cosine of every ``left`` x ``right``.
* ``/v1/score``: SGLang's body (decoder models) ``{query, items,
  label_token_ids, apply_softmax, item_first}`` -> ``{scores}``, the
  next-token probability of each label after ``query + item``; vLLM's body
  (``text_1``/``text_2``) is ``/score``'s.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, request

from serving.api.chat import message_dicts, render_chat
from serving.api.errors import APIError
from serving.api.generation import Generation
from serving.api.http import body_dict, json_response, validate
from serving.api.protocol import random_uuid
from serving.api.request_mapping import SamplingFields, build_request, check_token_ids
from serving.api.state import ServerState, current_state

bp = Blueprint("pooling", __name__)
Inputs = Union[str, list[str], list[int], list[list[int]]]


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model: Optional[str] = None


class EmbeddingRequest(_Req):
    input: Optional[Inputs] = None
    messages: Optional[list[dict[str, Any]]] = None
    encoding_format: str = Field("float", pattern="^(float|base64)$")
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    user: Optional[str] = None
    add_special_tokens: bool = True


class ScoreRequest(_Req):
    """vLLM's score body: ``text_1``/``text_2``, or the newer ``data_1``/``data_2``
    and ``queries`` with ``documents`` or ``items`` (the same pairing)."""

    text_1: Optional[Union[str, list[str]]] = None
    text_2: Optional[Union[str, list[str]]] = None
    data_1: Optional[Union[str, list[str]]] = None
    data_2: Optional[Union[str, list[str]]] = None
    queries: Optional[Union[str, list[str]]] = None
    documents: Optional[Union[str, list[str]]] = None
    items: Optional[Union[str, list[str]]] = None

    def sides(self) -> tuple[Any, Any, str, str]:
        """The two sides and their field names."""
        for a, b in (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"),
                     ("queries", "items")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                return getattr(self, a), getattr(self, b), a, b
        raise APIError("a score request needs `text_1` and `text_2` (or `data_1`/`data_2`, "
                       "or `queries` with `documents`)", 400, "text_1")


class RerankRequest(_Req):
    query: str
    documents: list[Union[str, dict[str, Any]]]
    top_n: Optional[int] = Field(None, ge=0)
    return_documents: bool = True


class DecoderScoreRequest(_Req):
    query: Optional[Union[str, list[int]]] = None
    items: Union[str, list[str], list[list[int]]]
    label_token_ids: list[int] = Field(min_length=1)
    apply_softmax: bool = False
    item_first: bool = False


class SimilarityRequest(_Req):
    left: Union[str, list[str]]
    right: Union[str, list[str]]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _probs(logits: np.ndarray) -> np.ndarray:
    """Class probabilities: sigmoid for one label, softmax otherwise."""
    return _sigmoid(logits) if logits.shape[-1] == 1 else _softmax(logits)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def _usage(n: int) -> dict[str, Any]:
    return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
            "prompt_tokens_details": None}


def _list_response(kind: str, model: str, data: list, tokens: int) -> dict[str, Any]:
    return {"id": f"{kind}-{random_uuid()}", "object": "list", "created": int(time.time()),
            "model": model, "data": data, "usage": _usage(tokens)}


def _engine(state: ServerState):
    state.check_ready()
    return state.engine


def _texts(val, param: str) -> list[str]:
    """A string or a list of strings, all non-empty (400 naming ``param``)."""
    items = [val] if isinstance(val, str) else list(val)
    if not items or any(not isinstance(t, str) or not t for t in items):
        raise APIError(f"`{param}` must be non-empty texts", 400, param)
    return items


def inputs_of(state: ServerState, req: EmbeddingRequest) -> list:
    """The inputs of an embedding-style request: texts or token-id lists."""
    if req.messages is not None:
        if req.input is not None:
            raise APIError("pass either `input` or `messages`, not both", 400, "messages")
        return [render_chat(state, message_dicts(req.messages), add_generation_prompt=False,
                            continue_final_message=False, chat_template=None,
                            chat_template_kwargs=None)]
    inp = req.input
    if inp is None:
        raise APIError("`input` is required", 400, "input")
    if isinstance(inp, str):
        items: list = [inp]
    elif inp and all(isinstance(x, int) for x in inp):
        items = [list(inp)]
    else:
        items = list(inp)
    if not items or any(len(x) == 0 for x in items):
        raise APIError("`input` must not be empty (nor hold empty items)", 400, "input")
    for x in items:
        if not isinstance(x, str):
            check_token_ids(state, x, "input")
    return items


async def _embed(state: ServerState, req: EmbeddingRequest, route: str
                 ) -> tuple[np.ndarray, list]:
    state.require_task(route, "embed")
    items = inputs_of(state, req)
    eng = _engine(state)
    vecs = await eng.embed(items, normalize=req.normalize)
    if req.dimensions is not None:
        width = vecs.shape[-1]
        if not 1 <= req.dimensions <= width:
            raise APIError(f"dimensions must be in 1..{width}, got {req.dimensions}", 400,
                           "dimensions")
        from model.pooling import truncate
        vecs = truncate(vecs, req.dimensions,
                        eng.normalize if req.normalize is None else req.normalize)
    return np.asarray(vecs, np.float32), items


def _encode(vec: np.ndarray, fmt: str = "float"):
    if fmt == "base64":
        return base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode()
    return [float(x) for x in vec]


async def _embeddings(route: str):
    state = current_state()
    req = validate(EmbeddingRequest, await body_dict())
    # RTP-LLM's routes take any `model` (its examples send "xx"); OpenAI's checks it.
    model = state.model_name if route.startswith("/v1/embeddings/") else state.check_model(
        req.model)
    vecs, items = await _embed(state, req, route)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vecs)]
    out = _list_response("embd", model, data, sum(state.engine.count_tokens(items)))
    return json_response(out)


@bp.post("/v1/embeddings")
@bp.post("/v1/embeddings/dense")  # RTP-LLM's
async def embeddings():
    return await _embeddings(request.url_rule.rule)


@bp.post("/encode")
async def sgl_encode():
    state = current_state()
    body = await body_dict()
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise APIError("exactly one of `text` or `input_ids` is required", 400, "text")
    inp = text if text is not None else ids
    req = validate(EmbeddingRequest, {"input": inp, "model": body.get("model"),
                                      "dimensions": body.get("dimensions")})
    vecs, items = await _embed(state, req, "/encode")
    batch = isinstance(inp, list) and inp and not isinstance(inp[0], int)
    counts = state.engine.count_tokens(items)
    out = [{"embedding": _encode(v),
            "meta_info": {"id": random_uuid(), "prompt_tokens": counts[i],
                          "finish_reason": {"type": "stop"}}}
           for i, v in enumerate(vecs)]
    return json_response(out if batch else out[0])


@bp.post("/pooling")
async def pooling():
    state = current_state()
    req = validate(EmbeddingRequest, await body_dict())
    model = state.check_model(req.model)
    task = state.require_task("/pooling", "embed", "score", "classify")
    if task == "embed":
        rows, items = await _embed(state, req, "/pooling")
    else:
        items = inputs_of(state, req)
        rows = await _engine(state).classify(items)
    data = [{"index": i, "object": "pooling", "data": _encode(v, req.encoding_format)}
            for i, v in enumerate(rows)]
    return json_response(_list_response("pool", model, data,
                                        sum(state.engine.count_tokens(items))))


async def _pair_scores(state: ServerState, firsts: list[str], seconds: list[str], route: str
                       ) -> tuple[list[float], int]:
    """Cross-encoder sigmoid (or class-1 prob) or embedding cosine per pair."""
    task = state.require_task(route, "score", "embed", "classify")
    eng = _engine(state)
    pairs = list(zip(firsts, seconds))
    if task == "embed":
        uniq = list(dict.fromkeys(firsts + seconds))
        vecs = await eng.embed(uniq)
        pos = {t: i for i, t in enumerate(uniq)}
        scores = [float(_cosine(vecs[pos[a]][None], vecs[pos[b]][None])[0, 0])
                  for a, b in pairs]
        return scores, sum(eng.count_tokens(uniq))
    probs = _probs(await eng.score(pairs))
    col = 0 if probs.shape[-1] == 1 else probs.shape[-1] - 1
    return [float(p[col]) for p in probs], sum(eng.count_tokens(pairs, pairs=True))


async def _text_pair_score(state: ServerState, body: dict, route: str):
    """vLLM's score: ``text_1`` x ``text_2`` (1:1, 1:N, N:N)."""
    req = validate(ScoreRequest, body)
    model = state.check_model(req.model)
    first, second, p1, p2 = req.sides()
    t1, t2 = _texts(first, p1), _texts(second, p2)
    if len(t1) == 1:
        t1 = t1 * len(t2)
    elif len(t1) != len(t2):
        raise APIError(f"Input lengths must be either 1:1, 1:N or N:N: {p1} has {len(t1)}, "
                       f"{p2} has {len(t2)}", 400, p2)
    scores, tokens = await _pair_scores(state, t1, t2, route)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return json_response(_list_response("score", model, data, tokens))


@bp.post("/score")
async def score():
    return await _text_pair_score(current_state(), await body_dict(), "/score")


async def _rerank(route: str):
    state = current_state()
    req = validate(RerankRequest, await body_dict())
    model = state.check_model(req.model)
    docs = [d if isinstance(d, str) else d.get("text") for d in req.documents]
    if not docs or any(not isinstance(d, str) or not d for d in docs):
        raise APIError("`documents` must be a non-empty list of non-empty texts (or "
                       "{text} objects)", 400, "documents")
    if not req.query:
        raise APIError("`query` must not be empty", 400, "query")
    scores, tokens = await _pair_scores(state, [req.query] * len(docs), docs, route)
    order = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)
    if state.config.api_dialect == "sglang":
        return json_response([{"score": scores[i], "document": docs[i], "index": i,
                               "meta_info": {"id": random_uuid()}} for i in order])
    top = len(docs) if not req.top_n else min(req.top_n, len(docs))
    results = []
    for i in order[:top]:
        r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            r["document"] = {"text": docs[i]}
        results.append(r)
    return json_response({"id": f"rerank-{random_uuid()}", "model": model,
                          "usage": {"total_tokens": tokens}, "results": results})


@bp.post("/rerank")
@bp.post("/v1/rerank")
@bp.post("/v2/rerank")
async def rerank():
    return await _rerank(request.url_rule.rule)


async def _class_probs(state: ServerState, items: list, route: str) -> tuple[np.ndarray, int]:
    state.require_task(route, "classify", "score")
    eng = _engine(state)
    if items and isinstance(items[0], list) and len(items[0]) == 2 and all(
            isinstance(x, str) for x in items[0]):
        pairs = [tuple(p) for p in items]
        return _probs(await eng.score(pairs)), sum(eng.count_tokens(pairs, pairs=True))
    return _probs(await eng.classify(items)), sum(eng.count_tokens(items))


def _label(state: ServerState, i: int) -> str:
    return state.engine.id2label.get(i, f"LABEL_{i}")


@bp.post("/classify")
async def classify():
    state = current_state()
    body = await body_dict()
    if "text" in body and "input" not in body:  # SGLang's reward-model shape
        text = body["text"]
        if not isinstance(text, (str, list)):
            raise APIError("`text` must be a string or a list of non-empty strings", 400,
                           "text")
        items = _texts(text, "text")
        state.require_task("/classify", "classify", "score")
        logits = await _engine(state).classify(items)
        out = [{"embedding": [float(x) for x in row],
                "meta_info": {"id": random_uuid(), "finish_reason": {"type": "stop"}}}
               for row in logits]
        return json_response(out if isinstance(text, list) else out[0])
    req = validate(EmbeddingRequest, body)
    model = state.check_model(req.model)
    probs, tokens = await _class_probs(state, inputs_of(state, req), "/classify")
    data = [{"index": i, "label": _label(state, int(np.argmax(p))),
             "probs": [float(x) for x in p], "num_classes": len(p)}
            for i, p in enumerate(probs)]
    return json_response(_list_response("classify", model, data, tokens))


@bp.post("/v1/classifier")
async def rtp_classifier():
    state = current_state()
    body = await body_dict()
    inp = body.get("input")
    if isinstance(inp, str):
        inp = [inp]
    ok = isinstance(inp, list) and inp and all(
        isinstance(x, str) and x or (isinstance(x, list) and len(x) == 2 and all(
            isinstance(y, str) and y for y in x)) for x in inp)
    if not ok:
        raise APIError("`input` must be texts or [query, document] pairs", 400, "input")
    probs, tokens = await _class_probs(state, inp, "/v1/classifier")
    results = []
    for i, p in enumerate(probs):
        col = 0 if len(p) == 1 else int(np.argmax(p))
        results.append({"index": i, "label": _label(state, col), "probs": [float(x) for x in p],
                        "relevance_score": float(p[0] if len(p) == 1 else p[-1]),
                        "document": inp[i][1] if isinstance(inp[i], list) else inp[i]})
    return json_response({"object": "list", "model": state.model_name,
                          "results": results, "usage": _usage(tokens)})


@bp.post("/v1/embeddings/sparse")
async def rtp_sparse():
    state = current_state()
    req = validate(EmbeddingRequest, await body_dict())
    state.require_task("/v1/embeddings/sparse", "embed")
    items = inputs_of(state, req)
    eng = _engine(state)
    pooled = await eng.embed(items, normalize=True)
    tokens = await eng.token_embeddings(items, normalize=True)
    special = set(getattr(eng.tokenizer, "all_special_ids", []) or [])
    ids_list = [x if not isinstance(x, str) else eng.tokenizer(
        x, truncation=True, max_length=eng.max_model_len)["input_ids"] for x in items]
    data = []
    for i, (vecs, ids) in enumerate(zip(tokens, ids_list)):
        sims = np.asarray(vecs) @ np.asarray(pooled[i])
        weights: dict[str, float] = {}
        for tid, s in zip(ids, sims):
            if tid not in special:
                weights[str(tid)] = max(weights.get(str(tid), 0.0), max(0.0, float(s)))
        data.append({"object": "embedding", "index": i, "embedding": weights})
    return json_response({"object": "list", "model": state.model_name, "data": data,
                          "usage": _usage(sum(len(x) for x in ids_list))})


@bp.post("/v1/embeddings/colbert")
async def rtp_colbert():
    state = current_state()
    req = validate(EmbeddingRequest, await body_dict())
    state.require_task("/v1/embeddings/colbert", "embed")
    tokens = await _engine(state).token_embeddings(inputs_of(state, req), normalize=True)
    data = [{"object": "embedding", "index": i, "embedding": np.asarray(v, np.float32).tolist()}
            for i, v in enumerate(tokens)]
    return json_response({"object": "list", "model": state.model_name, "data": data,
                          "usage": _usage(sum(len(v) for v in tokens))})


@bp.post("/v1/embeddings/similarity")
async def rtp_similarity():
    state = current_state()
    req = validate(SimilarityRequest, await body_dict())
    state.require_task("/v1/embeddings/similarity", "embed")
    left, right = _texts(req.left, "left"), _texts(req.right, "right")
    eng = _engine(state)
    vecs = await eng.embed(left + right)
    sim = _cosine(vecs[:len(left)], vecs[len(left):])
    return json_response({"object": "similarity", "model": state.model_name,
                          "similarity": sim.astype(float).tolist(),
                          "usage": _usage(sum(eng.count_tokens(left + right)))})


@bp.post("/v1/score")
async def v1_score():
    """SGLang's decoder scoring (a body with ``query`` or ``label_token_ids``), else
    vLLM's score (``text_1``/``text_2``, ...), which vLLM serves here as on /score."""
    state = current_state()
    body = await body_dict()
    if "query" not in body and "label_token_ids" not in body:
        return await _text_pair_score(state, body, "/v1/score")
    req = validate(DecoderScoreRequest, body)
    state.check_model(req.model)
    state.require_task("/v1/score", "generate")
    scores = await _decoder_scores(state, req)
    return json_response({"scores": scores, "model": state.model_name, "object": "scoring",
                          "usage": None})


async def _decoder_scores(state: ServerState, req: DecoderScoreRequest) -> list[list[float]]:
    """Next-token probabilities of ``label_token_ids`` after query+item, per item.

    One engine request per (item, label): the prompt is ``query + item +
    [label]`` with ``prompt_logprobs``, so the last prompt position's logprob is
    the label's log-probability (exact, not limited to the top-k).
    """
    tok = state.tokenizer
    labels = check_token_ids(state, req.label_token_ids, "label_token_ids")
    items = [req.items] if isinstance(req.items, str) else list(req.items)
    if not items:
        raise APIError("`items` must not be empty", 400, "items")

    def ids(x) -> list[int]:
        return tok.encode(x, add_special_tokens=False) if isinstance(x, str) else list(x)

    query = ids(req.query) if req.query is not None else []
    prompts = []
    for item in items:
        body = ids(item) + query if req.item_first else query + ids(item)
        prompts.extend(body + [label] for label in labels)
    fields = SamplingFields(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    er = build_request(state, prompts, fields, prompt_param="items")
    gen = Generation(state, f"score-{random_uuid()}", er.prompts, er.params).submit()
    lps = [float(out.prompt_logprobs[-1][p[-1]].logprob)
           for p, out in zip(er.prompts, await gen.finals())]
    k = len(labels)
    scores = []
    for j in range(len(items)):
        row = np.asarray(lps[j * k:(j + 1) * k], np.float64)
        probs = _softmax(row) if req.apply_softmax else np.exp(row)
        scores.append([float(p) if math.isfinite(p) else 0.0 for p in probs])
    return scores
