"""Request fields -> one ``GuideSpec`` (structured output / guided decoding).

The spellings each API uses for the same constraint:

- vLLM extras: ``guided_json`` (schema as a dict or JSON string),
  ``guided_regex``, ``guided_choice`` (list of strings), ``guided_grammar``
  (Lark or GBNF/EBNF), ``guided_whitespace_pattern`` (JSON whitespace);
- OpenAI ``response_format``: ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
  and LMDeploy's ``{"type": "regex_schema", "regex_schema": "..."}``;
- SGLang ``sampling_params``: ``json_schema`` (a JSON string), ``regex``, ``ebnf``.

At most one may be set per request (400 otherwise). The spec is checked when
``SamplingParams`` is built, so a bad schema or pattern is a 400 naming the
parameter before the request reaches the engine.
"""

from __future__ import annotations

import json
from typing import Optional

from serving.api.errors import APIError
from serving.engine.guided import spec_from_json_value
from serving.engine.types import GuideSpec, ValidationError

ANY_JSON_OBJECT = {"type": "object"}


def _one(found: list[GuideSpec]) -> Optional[GuideSpec]:
    if len(found) > 1:
        names = ", ".join(f"`{g.param}`" for g in found)
        raise APIError(f"Only one kind of guided decoding may be set per request; got {names}.",
                       400, found[1].param)
    return found[0] if found else None


def _response_format_guide(rf, whitespace: Optional[str]) -> Optional[GuideSpec]:
    kind = rf.type
    if kind == "text":
        return None
    if kind == "json_object":
        return spec_from_json_value(ANY_JSON_OBJECT, "response_format", whitespace)
    if kind == "json_schema":
        js = rf.json_schema or {}
        schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
        if schema is None:
            raise APIError("response_format of type 'json_schema' needs "
                           "`json_schema.schema`.", 400, "response_format")
        return spec_from_json_value(schema, "response_format", whitespace)
    if kind == "regex_schema":
        regex = (rf.model_extra or {}).get("regex_schema")
        if not isinstance(regex, str) or not regex:
            raise APIError("response_format of type 'regex_schema' needs a `regex_schema` "
                           "string.", 400, "response_format")
        return GuideSpec("regex", regex, "response_format")
    if kind == "structural_tag":
        raise APIError("response_format type 'structural_tag' is not supported yet by this "
                       "server.", 400, "response_format")
    raise APIError(f"response_format type must be one of 'text', 'json_object', "
                   f"'json_schema', 'regex_schema'; got {kind!r}.", 400, "response_format")


def guide_from_request(req) -> Optional[GuideSpec]:
    """The guide of a completion or chat request (vLLM extras + ``response_format``).

    Raises:
        APIError: 400 naming the field for a malformed spec or more than one guide.
    """
    ws = req.guided_whitespace_pattern
    try:
        found = []
        if req.response_format is not None:
            g = _response_format_guide(req.response_format, ws)
            if g is not None:
                found.append(g)
        if req.guided_json is not None:
            found.append(spec_from_json_value(req.guided_json, "guided_json", ws))
        if req.guided_regex is not None:
            found.append(GuideSpec("regex", req.guided_regex, "guided_regex"))
        if req.guided_choice is not None:
            found.append(GuideSpec("choice", json.dumps(req.guided_choice), "guided_choice"))
        if req.guided_grammar is not None:
            found.append(GuideSpec("grammar", req.guided_grammar, "guided_grammar"))
    except ValidationError as exc:
        raise APIError(str(exc), 400, exc.param) from None
    return _one(found)


def guide_from_sglang(sp) -> Optional[GuideSpec]:
    """The guide of SGLang ``sampling_params`` (``json_schema``/``regex``/``ebnf``).

    Raises:
        APIError: 400 naming ``sampling_params.<field>``.
    """
    if sp.structural_tag is not None:
        raise APIError("sampling_params.structural_tag is not supported yet by this server.",
                       400, "sampling_params.structural_tag")
    try:
        found = []
        if sp.json_schema is not None:
            found.append(spec_from_json_value(sp.json_schema, "sampling_params.json_schema"))
        if sp.regex is not None:
            found.append(GuideSpec("regex", sp.regex, "sampling_params.regex"))
        if sp.ebnf is not None:
            found.append(GuideSpec("grammar", sp.ebnf, "sampling_params.ebnf"))
    except ValidationError as exc:
        raise APIError(str(exc), 400, exc.param) from None
    return _one(found)
