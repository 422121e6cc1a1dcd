"""Chat tool calls: ``tools``/``tool_choice`` -> a constraint, model output -> ``tool_calls``.

As vLLM does it:

- ``tool_choice="none"``: the output is plain content (tools still reach the
  chat template).
- ``"required"``: the output is constrained to a JSON array of
  ``{"name": <one of the tools>, "parameters": <its parameters schema>}``
  (at least one); each element becomes a tool call.
- a named function (``{"type": "function", "function": {"name": ...}}``): the
  output is constrained to that function's parameters schema and is the call's
  ``arguments``; the finish reason stays ``"stop"`` (``"tool_calls"`` is for
  auto/required), as in vLLM and OpenAI.
- ``"auto"`` (the default when ``tools`` is given): the output is free; a
  Hermes-style parser takes ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
  blocks (SmolLM2, Qwen, Hermes templates) or a bare JSON call
  ``{"name": ..., "arguments"|"parameters": ...}`` out of it, and the rest
  stays ``content``.

``ToolStream`` turns the growing output into stream deltas: for required and
named calls a first delta with ``id``/``type``/``name`` and then argument
pieces as they are generated; for "auto" the tool calls come whole at the end
while text that cannot be part of a call streams as content.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any, Optional

from serving.api.errors import APIError
from serving.api.protocol import random_uuid
from serving.engine.guided import spec_from_json_value
from serving.engine.types import GuideSpec

TOOL_CALL_TAG, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_ITEM_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')
_NO_PARAMS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclasses.dataclass
class ToolPlan:
    """How a chat request uses tools.

    Attributes:
        mode: "none", "auto", "required" or "named".
        name: the forced function's name (mode "named").
        guide: the output constraint (modes "required" and "named").
    """

    mode: str = "none"
    name: Optional[str] = None
    guide: Optional[GuideSpec] = None

    @property
    def active(self) -> bool:
        return self.mode != "none"


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-tool-{random_uuid()}")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _functions(tools) -> dict[str, dict]:
    out = {}
    for k, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type", "function") != "function"
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or not fn["name"]):
            raise APIError(f"tools[{k}] must be {{\"type\": \"function\", \"function\": "
                           f"{{\"name\": ..., \"parameters\": {{...}}}}}}", 400, "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(f"tools[{k}].function.parameters must be a JSON schema object", 400,
                           "tools")
        out[fn["name"]] = fn
    return out


def _params_schema(fn: dict) -> dict:
    return copy.deepcopy(fn.get("parameters")) or dict(_NO_PARAMS)


def _required_schema(functions: dict[str, dict]) -> dict:
    """vLLM's schema for tool_choice="required"; ``$defs`` are hoisted to the root."""
    defs: dict[str, Any] = {}
    items = []
    for name, fn in functions.items():
        params = _params_schema(fn)
        defs.update(params.pop("$defs", {}))
        items.append({"properties": {"name": {"type": "string", "enum": [name]},
                                     "parameters": params},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": items}}
    if defs:
        schema["$defs"] = defs
    return schema


def plan_tools(req) -> ToolPlan:
    """Validates ``tools``/``tool_choice`` and picks the mode (and constraint).

    Raises:
        APIError: 400 (param ``tool_choice`` or ``tools``) for a choice without
            tools, an unknown function, or a malformed tool.
    """
    choice = req.tool_choice
    if "tool_choice" not in req.model_fields_set and req.tools:
        choice = "auto"  # OpenAI's default when tools are given
    functions = _functions(req.tools)
    if choice is None or choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        return ToolPlan("auto" if functions else "none")
    if not functions:
        raise APIError("When using `tool_choice`, `tools` must be set.", 400, "tool_choice")
    if choice == "required":
        return ToolPlan("required", guide=spec_from_json_value(
            _required_schema(functions), "tool_choice"))
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise APIError("tool_choice must be 'none', 'auto', 'required' or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", 400,
                           "tool_choice")
        if name not in functions:
            raise APIError(f"Tool '{name}' has not been passed in `tools`.", 400, "tool_choice")
        return ToolPlan("named", name=name, guide=spec_from_json_value(
            _params_schema(functions[name]), "tool_choice"))
    raise APIError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got "
                   f"{choice!r}", 400, "tool_choice")


# ------------------------------------------------------------------- parsing


def _value_end(text: str, i: int) -> Optional[int]:
    """End index of the JSON value starting at ``text[i:]``; None while incomplete."""
    while i < len(text) and text[i].isspace():
        i += 1
    depth, in_str, esc = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:
                return j
            depth -= 1
            if depth == 0:
                return j + 1
        elif c == "," and depth == 0:
            return j
    return None


def scan_required(text: str) -> list[tuple[str, str, bool]]:
    """Calls in a (possibly partial) ``[{"name": .., "parameters": ..}, ...]`` array.

    Returns:
        ``(name, arguments text so far, complete)`` per call whose name is known.
    """
    calls, pos = [], 0
    while True:
        m = _ITEM_HEAD.search(text, pos)
        if m is None:
            return calls
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            return calls
        end = _value_end(text, m.end())
        if end is None:
            calls.append((name, text[m.end():], False))
            return calls
        calls.append((name, text[m.end():end].strip(), True))
        pos = end


def _as_call(obj) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return ToolCall(obj["name"], args)


def parse_auto(text: str) -> tuple[str, list[ToolCall]]:
    """Hermes ``<tool_call>`` blocks or a bare JSON call -> (other text, calls).

    When a block does not parse, the whole text is content and there are no calls.
    """
    if TOOL_CALL_TAG in text:
        calls, rest, last = [], [], 0
        for m in _BLOCK.finditer(text):
            try:
                call = _as_call(json.loads(m.group(1).strip()))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
            rest.append(text[last:m.start()])
            last = m.end()
        rest.append(text[last:])
        return "".join(rest), calls
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            obj = json.loads(stripped)
        except ValueError:
            return text, []
        objs = obj if isinstance(obj, list) else [obj]
        calls = [_as_call(o) for o in objs]
        if calls and all(c is not None for c in calls):
            return "", calls
    return text, []


def parse_output(plan: ToolPlan, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """A finished output -> (content or None, tool calls)."""
    if plan.mode == "named":
        return None, [ToolCall(plan.name, text)]
    if plan.mode == "required":
        calls = scan_required(text)
        if calls and all(done for _, _, done in calls):
            try:
                for _, args, _ in calls:
                    json.loads(args)
                return None, [ToolCall(name, args) for name, args, _ in calls]
            except ValueError:
                pass
        return text, []
    if plan.mode == "auto":
        content, calls = parse_auto(text)
        return (content.strip() or None) if calls else text, calls
    return text, []


def finish_reason(plan: ToolPlan, reason: Optional[str], calls) -> Optional[str]:
    """``tool_calls`` when an auto/required output ended normally with calls in it.

    A named (forced) function keeps ``stop``, as vLLM and OpenAI answer it.
    """
    if calls and reason == "stop" and plan.mode in ("auto", "required"):
        return "tool_calls"
    return reason


# ----------------------------------------------------------------- streaming


class ToolStream:
    """One choice's stream deltas in a tool mode.

    ``feed(text, finished)`` takes the cumulative output text and returns
    ``DeltaMessage`` field dicts (``{"content": ...}`` or ``{"tool_calls": [...]}``)
    not sent yet; ``calls`` counts the tool calls sent.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.calls = 0
        self._ids: list[str] = []
        self._args_sent: list[int] = []
        self._content_sent = 0

    def _call_deltas(self, calls: list[tuple[str, str]]) -> list[dict]:
        out = []
        for k, (name, args) in enumerate(calls):
            if k == len(self._ids):
                self._ids.append(f"chatcmpl-tool-{random_uuid()}")
                self._args_sent.append(0)
                out.append({"tool_calls": [{"index": k, "id": self._ids[k], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            piece = args[self._args_sent[k]:]
            if piece:
                self._args_sent[k] = len(args)
                out.append({"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
        self.calls = len(self._ids)
        return out

    def feed(self, text: str, finished: bool) -> list[dict]:
        mode = self.plan.mode
        if mode == "named":
            return self._call_deltas([(self.plan.name, text)] if text or finished else [])
        if mode == "required":
            calls = scan_required(text)
            if finished and not calls:
                return self._content(text, len(text))
            return self._call_deltas([(n, a) for n, a, _ in calls])
        if not finished:
            return self._content(text, self._safe_end(text))
        content, calls = parse_auto(text)
        if not calls:
            return self._content(text, len(text))
        rest = content[self._content_sent:]
        out = [{"content": rest}] if rest.strip() else []
        out.extend(self._call_deltas([(c.name, c.arguments) for c in calls]))
        return out

    def _content(self, text: str, end: int) -> list[dict]:
        if end <= self._content_sent:
            return []
        piece = text[self._content_sent:end]
        self._content_sent = end
        return [{"content": piece}]

    def _safe_end(self, text: str) -> int:
        """How much of an unfinished "auto" output is surely content."""
        if self._content_sent == 0 and (not text.strip() or text.lstrip()[0] in "{["):
            return 0  # may be a bare JSON call
        k = text.find(TOOL_CALL_TAG)
        if k >= 0:
            return k
        for n in range(min(len(TOOL_CALL_TAG) - 1, len(text)), 0, -1):
            if text.endswith(TOOL_CALL_TAG[:n]):
                return len(text) - n
        return len(text)
