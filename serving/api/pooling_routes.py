"""Pooling routes: embeddings, encode, pooling, score, rerank, classify (vLLM, SGLang, RTP-LLM).

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
* ``/v1/score`` (SGLang, decoder models): ``{query, items, label_token_ids,
  apply_softmax, item_first}`` -> ``{scores}``: the next-token probability of
  each label after ``query + item``.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from quart import Quart

from serving.api.chat import render_chat
from serving.api.errors import APIError
from serving.api.native_common import (body_dict, check_awake, json_response, native_state,
                                       require_task, validate)
from serving.api.protocol import random_uuid
from serving.api.state import ServerState

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
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]


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


def register(app: Quart, state: ServerState) -> None:
    """Adds the pooling routes to ``app``."""
    native = native_state(app)
    existing = {r.rule for r in app.url_map.iter_rules()}

    def engine():
        check_awake(state)
        return state.engine

    def inputs_of(req: EmbeddingRequest) -> list:
        if req.messages is not None:
            if req.input is not None:
                raise APIError("pass either `input` or `messages`, not both", 400, "messages")
            text = render_chat(state, req.messages, add_generation_prompt=False,
                               continue_final_message=False, chat_template=None,
                               chat_template_kwargs=None)
            return [text]
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
        vocab = int(getattr(state.engine.model_config, "vocab_size", 0) or 0)
        for x in items:
            if not isinstance(x, str) and vocab and any(not 0 <= t < vocab for t in x):
                raise APIError(f"`input` holds token ids outside the vocabulary ({vocab})",
                               400, "input")
        return items

    async def embed_vectors(req: EmbeddingRequest, route: str) -> tuple[np.ndarray, int]:
        require_task(state, route, "embed")
        items = inputs_of(req)
        eng = engine()
        vecs = await eng.embed(items, normalize=req.normalize)
        if req.dimensions is not None:
            width = vecs.shape[-1]
            if not 1 <= req.dimensions <= width:
                raise APIError(f"dimensions must be in 1..{width}, got {req.dimensions}", 400,
                               "dimensions")
            from model.pooling import truncate
            normalize = eng.loaded.pooling.normalize if req.normalize is None else req.normalize
            vecs = truncate(vecs, req.dimensions, normalize)
        return np.asarray(vecs, np.float32), sum(eng.count_tokens(items))

    def encode_vec(vec: np.ndarray, fmt: str):
        if fmt == "base64":
            return base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode()
        return [float(x) for x in vec]

    async def embeddings_route(route: str):
        req = validate(EmbeddingRequest, await body_dict())
        # RTP-LLM's routes take any `model` (its examples send "xx"); OpenAI's checks it.
        model = state.model_name if route.startswith("/v1/embeddings/") else state.check_model(
            req.model)
        vecs, tokens = await embed_vectors(req, route)
        return json_response({
            "id": f"embd-{random_uuid()}", "object": "list", "created": int(time.time()),
            "model": model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": encode_vec(v, req.encoding_format)}
                     for i, v in enumerate(vecs)],
            "usage": _usage(tokens)})

    if "/v1/embeddings" not in existing:
        @app.post("/v1/embeddings")
        async def v1_embeddings():
            return await embeddings_route("/v1/embeddings")

    @app.post("/v1/embeddings/dense")
    async def rtp_dense():
        return await embeddings_route("/v1/embeddings/dense")

    @app.post("/encode")
    async def sgl_encode():
        body = await body_dict()
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise APIError("exactly one of `text` or `input_ids` is required", 400, "text")
        inp = text if text is not None else ids
        req = validate(EmbeddingRequest, {"input": inp, "model": body.get("model"),
                                          "dimensions": body.get("dimensions")})
        vecs, tokens = await embed_vectors(req, "/encode")
        batch = isinstance(inp, list) and inp and not isinstance(inp[0], int)
        eng = state.engine
        counts = eng.count_tokens(inputs_of(req))
        out = [{"embedding": encode_vec(v, "float"),
                "meta_info": {"id": random_uuid(), "prompt_tokens": counts[i],
                              "finish_reason": {"type": "stop"}}}
               for i, v in enumerate(vecs)]
        return json_response(out if batch else out[0])

    @app.post("/pooling")
    async def pooling():
        req = validate(EmbeddingRequest, await body_dict())
        model = state.check_model(req.model)
        task = require_task(state, "/pooling", "embed", "score", "classify")
        if task == "embed":
            vecs, tokens = await embed_vectors(req, "/pooling")
            data = [encode_vec(v, req.encoding_format) for v in vecs]
        else:
            items = inputs_of(req)
            eng = engine()
            logits = await eng.classify(items)
            tokens = sum(eng.count_tokens(items))
            data = [encode_vec(v, req.encoding_format) for v in logits]
        return json_response({
            "id": f"pool-{random_uuid()}", "object": "list", "created": int(time.time()),
            "model": model, "data": [{"index": i, "object": "pooling", "data": d}
                                     for i, d in enumerate(data)],
            "usage": _usage(tokens)})

    async def pair_scores(firsts: list[str], seconds: list[str], route: str
                          ) -> tuple[list[float], int]:
        """Cross-encoder sigmoid (or class-1 prob) or embedding cosine per pair."""
        task = require_task(state, route, "score", "embed", "classify")
        eng = engine()
        pairs = list(zip(firsts, seconds))
        if task == "embed":
            uniq = list(dict.fromkeys(firsts + seconds))
            vecs = await eng.embed(uniq)
            pos = {t: i for i, t in enumerate(uniq)}
            scores = [float(_cosine(vecs[pos[a]][None], vecs[pos[b]][None])[0, 0])
                      for a, b in pairs]
            return scores, sum(eng.count_tokens(uniq))
        logits = await eng.score(pairs)
        probs = _probs(logits)
        col = 0 if probs.shape[-1] == 1 else probs.shape[-1] - 1
        return [float(p[col]) for p in probs], sum(eng.count_tokens(pairs, pairs=True))

    @app.post("/score")
    async def score():
        req = validate(ScoreRequest, await body_dict())
        model = state.check_model(req.model)
        t1 = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
        t2 = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
        if not t1 or not t2 or any(not t for t in t1 + t2):
            raise APIError("text_1 and text_2 must be non-empty", 400, "text_1")
        if len(t1) == 1:
            t1 = t1 * len(t2)
        elif len(t1) != len(t2):
            raise APIError(f"text_1 ({len(t1)}) and text_2 ({len(t2)}) must have the same "
                           "length, or text_1 a single text", 400, "text_2")
        scores, tokens = await pair_scores(t1, t2, "/score")
        return json_response({
            "id": f"score-{random_uuid()}", "object": "list", "created": int(time.time()),
            "model": model, "data": [{"index": i, "object": "score", "score": s}
                                     for i, s in enumerate(scores)],
            "usage": _usage(tokens)})

    async def rerank(route: str):
        req = validate(RerankRequest, await body_dict())
        model = state.check_model(req.model)
        docs = [d if isinstance(d, str) else d.get("text") for d in req.documents]
        if not docs or any(not isinstance(d, str) or not d for d in docs):
            raise APIError("`documents` must be a non-empty list of non-empty texts (or "
                           "{text} objects)", 400, "documents")
        if not req.query:
            raise APIError("`query` must not be empty", 400, "query")
        scores, tokens = await pair_scores([req.query] * len(docs), docs, route)
        order = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)
        if native.api_dialect == "sglang":
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

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        async def route(path=path):
            return await rerank(path)
        app.add_url_rule(path, "pool" + path.replace("/", "_"), route, methods=["POST"])

    async def class_probs(items: list, route: str) -> tuple[np.ndarray, int]:
        require_task(state, route, "classify", "score")
        eng = engine()
        if items and isinstance(items[0], list) and len(items[0]) == 2 and all(
                isinstance(x, str) for x in items[0]):
            logits = await eng.score([tuple(p) for p in items])
            return _probs(logits), sum(eng.count_tokens([tuple(p) for p in items], pairs=True))
        logits = await eng.classify(items)
        return _probs(logits), sum(eng.count_tokens(items))

    def label(i: int) -> str:
        return state.engine.id2label.get(i, f"LABEL_{i}")

    @app.post("/classify")
    async def classify():
        body = await body_dict()
        if "text" in body and "input" not in body:  # SGLang's reward-model shape
            text = body["text"]
            items = [text] if isinstance(text, str) else text
            if not isinstance(items, list) or not items or not all(
                    isinstance(t, str) and t for t in items):
                raise APIError("`text` must be a string or a list of non-empty strings", 400,
                               "text")
            require_task(state, "/classify", "classify", "score")
            logits = await engine().classify(items)
            out = [{"embedding": [float(x) for x in row],
                    "meta_info": {"id": random_uuid(), "finish_reason": {"type": "stop"}}}
                   for row in logits]
            return json_response(out if isinstance(text, list) else out[0])
        req = validate(EmbeddingRequest, body)
        model = state.check_model(req.model)
        items = inputs_of(req)
        probs, tokens = await class_probs(items, "/classify")
        return json_response({
            "id": f"classify-{random_uuid()}", "object": "list", "created": int(time.time()),
            "model": model,
            "data": [{"index": i, "label": label(int(np.argmax(p))),
                      "probs": [float(x) for x in p], "num_classes": len(p)}
                     for i, p in enumerate(probs)],
            "usage": _usage(tokens)})

    @app.post("/v1/classifier")
    async def rtp_classifier():
        body = await body_dict()
        inp = body.get("input")
        if isinstance(inp, str):
            inp = [inp]
        ok = isinstance(inp, list) and inp and all(
            isinstance(x, str) and x or (isinstance(x, list) and len(x) == 2 and all(
                isinstance(y, str) and y for y in x)) for x in inp)
        if not ok:
            raise APIError("`input` must be texts or [query, document] pairs", 400, "input")
        probs, tokens = await class_probs(inp, "/v1/classifier")
        results = []
        for i, p in enumerate(probs):
            col = 0 if len(p) == 1 else int(np.argmax(p))
            results.append({"index": i, "label": label(col), "probs": [float(x) for x in p],
                            "relevance_score": float(p[0] if len(p) == 1 else p[-1]),
                            "document": inp[i][1] if isinstance(inp[i], list) else inp[i]})
        return json_response({"object": "list", "model": state.model_name,
                              "results": results, "usage": _usage(tokens)})

    @app.post("/v1/embeddings/sparse")
    async def rtp_sparse():
        req = validate(EmbeddingRequest, await body_dict())
        model = state.model_name  # RTP-LLM ignores `model`
        require_task(state, "/v1/embeddings/sparse", "embed")
        items = inputs_of(req)
        eng = engine()
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
                if tid in special:
                    continue
                w = max(0.0, float(s))
                weights[str(tid)] = max(weights.get(str(tid), 0.0), w)
            data.append({"object": "embedding", "index": i, "embedding": weights})
        return json_response({"object": "list", "model": model, "data": data,
                              "usage": _usage(sum(len(x) for x in ids_list))})

    @app.post("/v1/embeddings/colbert")
    async def rtp_colbert():
        req = validate(EmbeddingRequest, await body_dict())
        model = state.model_name  # RTP-LLM ignores `model`
        require_task(state, "/v1/embeddings/colbert", "embed")
        items = inputs_of(req)
        eng = engine()
        tokens = await eng.token_embeddings(items, normalize=True)
        return json_response({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": np.asarray(v, np.float32).tolist()}
                     for i, v in enumerate(tokens)],
            "usage": _usage(sum(len(v) for v in tokens))})

    @app.post("/v1/embeddings/similarity")
    async def rtp_similarity():
        req = validate(SimilarityRequest, await body_dict())
        model = state.model_name  # RTP-LLM ignores `model` (its example sends "xx")
        require_task(state, "/v1/embeddings/similarity", "embed")
        left = [req.left] if isinstance(req.left, str) else list(req.left)
        right = [req.right] if isinstance(req.right, str) else list(req.right)
        if not left or not right or any(not t for t in left + right):
            raise APIError("`left` and `right` must be non-empty texts", 400, "left")
        eng = engine()
        vecs = await eng.embed(left + right)
        sim = _cosine(vecs[:len(left)], vecs[len(left):])
        return json_response({"object": "similarity", "model": model,
                              "similarity": sim.astype(float).tolist(),
                              "usage": _usage(sum(eng.count_tokens(left + right)))})

    @app.post("/v1/score")
    async def decoder_score():
        req = validate(DecoderScoreRequest, await body_dict())
        state.check_model(req.model)
        require_task(state, "/v1/score", "generate")
        check_awake(state)
        scores = await _decoder_scores(state, req)
        return json_response({"scores": scores, "model": state.model_name,
                              "object": "scoring", "usage": None})


async def _decoder_scores(state: ServerState, req: DecoderScoreRequest) -> list[list[float]]:
    """Next-token probabilities of ``label_token_ids`` after query+item, per item.

    One engine request per (item, label): the prompt is ``query + item +
    [label]`` with ``prompt_logprobs``, so the last prompt position's logprob is
    the label's log-probability (exact, not limited to the top-k).
    """
    from serving.api.generation import Generation
    from serving.engine.types import SamplingParams

    tok = state.tokenizer
    vocab = int(state.engine.model_config.vocab_size)
    bad = [t for t in req.label_token_ids if not 0 <= t < vocab]
    if bad:
        raise APIError(f"label_token_ids {bad[:5]} are out of vocabulary ({vocab})", 400,
                       "label_token_ids")
    items = [req.items] if isinstance(req.items, str) else list(req.items)
    if not items:
        raise APIError("`items` must not be empty", 400, "items")

    def ids(x) -> list[int]:
        return tok.encode(x, add_special_tokens=False) if isinstance(x, str) else list(x)

    query = ids(req.query) if req.query is not None else []
    prompts = []
    for item in items:
        body = ids(item) + query if req.item_first else query + ids(item)
        if not body:
            raise APIError("query + item must not be empty", 400, "items")
        if len(body) + 2 > state.max_model_len:
            raise APIError("query + item exceeds the context length", 400, "items")
        prompts.extend(body + [label] for label in req.label_token_ids)
    params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
              for _ in prompts]
    gen = Generation(state, f"score-{random_uuid()}", prompts, params)
    gen.submit()
    lps = [0.0] * len(prompts)
    async for i, out in gen.outputs():
        if out.finished:
            if out.error:
                raise APIError(f"scoring failed: {out.error}", 500)
            last = out.prompt_logprobs[-1]
            lps[i] = float(last[prompts[i][-1]].logprob)
    k = len(req.label_token_ids)
    scores = []
    for j in range(len(items)):
        row = np.asarray(lps[j * k:(j + 1) * k], np.float64)
        probs = _softmax(row) if req.apply_softmax else np.exp(row)
        scores.append([float(p) if math.isfinite(p) else 0.0 for p in probs])
    return scores
