"""Tool-call planning and parsing (serving/api/tools.py) without a server."""

from __future__ import annotations

import json

import pytest

from serving.api.errors import APIError
from serving.api.protocol import ChatCompletionRequest
from serving.api.tools import (ToolPlan, ToolStream, finish_reason, parse_auto, parse_output,
                               plan_tools)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"$ref": "#/$defs/tz"}},
    "$defs": {"tz": {"enum": ["UTC", "CET"]}}}}}
MSG = [{"role": "user", "content": "hi"}]


def req(**kw):
    return ChatCompletionRequest(messages=MSG, **kw)


def test_plans():
    assert plan_tools(req()).mode == "none"
    assert plan_tools(req(tools=[WEATHER])).mode == "auto"  # default with tools
    assert plan_tools(req(tools=[WEATHER], tool_choice="none")).mode == "none"
    required = plan_tools(req(tools=[WEATHER, TIME], tool_choice="required"))
    schema = json.loads(required.guide.spec)
    assert required.mode == "required" and schema["type"] == "array"
    assert schema["$defs"] == {"tz": {"enum": ["UTC", "CET"]}}  # hoisted to the root
    named = plan_tools(req(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}))
    assert named.mode == "named" and named.name == "get_weather"
    assert json.loads(named.guide.spec) == WEATHER["function"]["parameters"]


@pytest.mark.parametrize("kw", [
    dict(tool_choice="required"),
    dict(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=[WEATHER]),
    dict(tool_choice="sometimes", tools=[WEATHER]),
    dict(tool_choice={"type": "function"}, tools=[WEATHER]),
])
def test_bad_tool_choice(kw):
    with pytest.raises(APIError) as exc:
        plan_tools(req(**kw))
    assert exc.value.status == 400 and exc.value.param == "tool_choice"


def test_bad_tools():
    with pytest.raises(APIError) as exc:
        plan_tools(req(tools=[{"type": "function", "function": {"description": "no name"}}]))
    assert exc.value.param == "tools"


def test_hermes_and_bare_json():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "parameters": {}}</tool_call>')
    content, calls = parse_output(ToolPlan("auto"), text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls[0].as_dict()["id"].startswith("chatcmpl-tool-")
    assert calls[0].as_dict()["type"] == "function"
    _, calls = parse_auto('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    for plain in ("Just text.", '{"not": "a call"}', "<tool_call>{broken</tool_call>"):
        assert parse_output(ToolPlan("auto"), plain) == (plain, [])


def test_required_and_named_outputs():
    text = '[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"get_time","parameters":{}}]'
    content, calls = parse_output(ToolPlan("required"), text)
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}'),
                                                      ("get_time", "{}")]
    truncated = text[:30]
    assert parse_output(ToolPlan("required"), truncated) == (truncated, [])
    content, calls = parse_output(ToolPlan("named", name="get_weather"), '{"city":"Rome"}')
    assert content is None and calls[0].arguments == '{"city":"Rome"}'


def test_finish_reason_named_is_stop():
    """vLLM/OpenAI: a forced (named) call finishes with "stop"; auto/required with "tool_calls"."""
    calls = [object()]
    assert finish_reason(ToolPlan("named", name="get_weather"), "stop", calls) == "stop"
    assert finish_reason(ToolPlan("required"), "stop", calls) == "tool_calls"
    assert finish_reason(ToolPlan("auto"), "stop", calls) == "tool_calls"
    assert finish_reason(ToolPlan("auto"), "stop", []) == "stop"
    assert finish_reason(ToolPlan("required"), "length", calls) == "length"
    assert finish_reason(ToolPlan("none"), "stop", calls) == "stop"


def _replay(plan: ToolPlan, text: str, step: int = 3):
    """Feeds ``text`` in pieces; returns (content, {index: [name, id, arguments]})."""
    ts, content, calls = ToolStream(plan), "", {}
    cuts = list(range(step, len(text), step)) + [len(text)]
    for end in cuts:
        for d in ts.feed(text[:end], end == len(text)):
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], [None, None, ""])
                if "id" in tc:
                    assert entry[1] is None and tc["type"] == "function"
                    entry[0], entry[1] = tc["function"]["name"], tc["id"]
                entry[2] += tc["function"].get("arguments", "")
    return content, calls, ts


def test_streams_reassemble_to_the_parsed_calls():
    text = '[{"name":"get_weather","parameters":{"city":"P,a}r\\"is"}},{"name":"get_time","parameters":{"tz":"UTC"}}]'
    _, want = parse_output(ToolPlan("required"), text)
    content, calls, ts = _replay(ToolPlan("required"), text)
    assert content == "" and ts.calls == 2
    assert [(c[0], c[2]) for c in calls.values()] == [(w.name, w.arguments) for w in want]
    content, calls, _ = _replay(ToolPlan("named", name="get_time"), '{"tz":"CET"}', step=2)
    assert content == "" and list(calls.values())[0][0::2] == ["get_time", '{"tz":"CET"}']
    text = 'Sure. <tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
    content, calls, ts = _replay(ToolPlan("auto"), text)
    assert content == "Sure. " and ts.calls == 1
    assert json.loads(calls[0][2]) == {"tz": "UTC"}
    content, calls, ts = _replay(ToolPlan("auto"), "No tools <here>, thanks.")
    assert content == "No tools <here>, thanks." and not calls
