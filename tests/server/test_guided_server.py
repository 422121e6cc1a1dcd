"""Structured output and tool calls against a real server (SmolLM2, greedy).

Every vLLM / OpenAI / LMDeploy / SGLang spelling of a constraint, checked by
parsing what comes back: choices are one of the choices, regex outputs
fullmatch, JSON outputs load and validate against their schema, forced tool
calls carry valid JSON arguments, and streams reassemble to the same calls.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.server.conftest import launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "London", "Tokyo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "JST"]}},
                   "required": ["tz"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server():
    with launch("real") as s:
        yield s


def validate(obj, schema):
    try:
        import jsonschema
    except ImportError:  # by hand: the keys and types this file's schemas use
        assert set(obj) == set(schema["required"])
        for key, sub in schema["properties"].items():
            if "enum" in sub:
                assert obj[key] in sub["enum"]
            elif sub["type"] == "integer":
                assert isinstance(obj[key], int)
            elif sub["type"] == "string":
                assert isinstance(obj[key], str)
        return
    jsonschema.validate(obj, schema)


def chat(client, model, **kw):
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 80)
    return client.chat.completions.create(model=model, temperature=0, **kw)


def test_guided_choice(client, model):
    choices = ["positive", "negative", "neutral"]
    r = client.completions.create(model=model, prompt="Review: I loved it! Sentiment:",
                                  max_tokens=10, temperature=0,
                                  extra_body={"guided_choice": choices})
    assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=model, prompt="Pick one:", max_tokens=10, n=3,
                                  temperature=1.0, seed=5, extra_body={"guided_choice": choices})
    assert all(c.text in choices for c in r.choices)
    c = chat(client, model, messages=[{"role": "user", "content": "Is the sky blue?"}],
             extra_body={"guided_choice": ["yes", "no"]})
    assert c.choices[0].message.content in ("yes", "no")


def test_guided_regex(client, model):
    pattern = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3} years old\."
    r = client.completions.create(model=model, prompt="Write a fact about a person:",
                                  max_tokens=40, temperature=0,
                                  extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    c = chat(client, model, response_format={"type": "regex_schema",
                                             "regex_schema": r"call me [A-Za-z]{1,10}"})
    assert re.fullmatch(r"call me [A-Za-z]{1,10}", c.choices[0].message.content)


def test_json_schema_every_spelling(client, model):
    prompt = "Describe a person as JSON with name, age and city:"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=80, temperature=0,
                                  extra_body={"guided_json": PERSON})
    validate(json.loads(r.choices[0].text), PERSON)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=80, temperature=0,
                                  extra_body={"guided_json": json.dumps(PERSON)})
    validate(json.loads(r.choices[0].text), PERSON)
    c = chat(client, model, messages=[{"role": "user", "content": prompt}],
             response_format={"type": "json_schema",
                              "json_schema": {"name": "person", "schema": PERSON,
                                              "strict": True}})
    validate(json.loads(c.choices[0].message.content), PERSON)
    assert c.choices[0].finish_reason == "stop"


def test_json_object(client, model):
    c = chat(client, model, max_tokens=120, messages=[
        {"role": "user", "content": "Give me a JSON object with a key 'ok' set to true."}],
        response_format={"type": "json_object"})
    assert isinstance(json.loads(c.choices[0].message.content), dict)


def test_guided_grammar(client, model):
    r = client.completions.create(model=model, prompt="Is fire hot? Answer:", max_tokens=10,
                                  temperature=0,
                                  extra_body={"guided_grammar": 'root ::= " yes" | " no"'})
    assert r.choices[0].text in (" yes", " no")
    r = client.completions.create(model=model, prompt="Count:", max_tokens=20, temperature=0,
                                  extra_body={"guided_grammar": 'start: NUM ("," NUM)~2\n'
                                                                'NUM: /[0-9]/'})
    assert re.fullmatch(r"[0-9],[0-9](,[0-9])?", r.choices[0].text), r.choices[0].text


def _calls(message):
    return [(t.function.name, t.function.arguments) for t in message.tool_calls]


def _streamed_calls(stream):
    calls, content, reasons = {}, "", []
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": None, "id": None, "args": ""})
                if tc.id:
                    assert entry["id"] is None and tc.type == "function"
                    entry["id"], entry["name"] = tc.id, tc.function.name
                entry["args"] += tc.function.arguments or ""
    return [(c["name"], c["args"]) for c in calls.values()], content, reasons


def test_tool_choice_named(client, model):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    c = chat(client, model, tools=[WEATHER, CLOCK], tool_choice=choice)
    msg = c.choices[0].message
    assert msg.content is None and c.choices[0].finish_reason == "stop"  # forced: vLLM's
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].id.startswith("chatcmpl-tool-")
    assert msg.tool_calls[0].type == "function"
    name, args = _calls(msg)[0]
    assert name == "get_weather"
    validate(json.loads(args), WEATHER["function"]["parameters"])
    calls, content, reasons = _streamed_calls(
        chat(client, model, tools=[WEATHER, CLOCK], tool_choice=choice, stream=True))
    assert calls == _calls(msg) and content == "" and reasons == ["stop"]


def test_tool_choice_required(client, model):
    c = chat(client, model, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=120)
    msg = c.choices[0].message
    assert msg.content is None and c.choices[0].finish_reason == "tool_calls", c
    assert msg.tool_calls
    by_name = {"get_weather": WEATHER, "get_time": CLOCK}
    for name, args in _calls(msg):
        validate(json.loads(args), by_name[name]["function"]["parameters"])
    calls, content, reasons = _streamed_calls(
        chat(client, model, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=120,
             stream=True))
    assert calls == _calls(msg) and content == "" and reasons == ["tool_calls"]


def test_tool_choice_auto_and_none_leave_plain_text_as_content(client, model):
    for choice in ("auto", "none"):
        c = chat(client, model, tools=[WEATHER], tool_choice=choice, max_tokens=12)
        assert c.choices[0].message.content and not c.choices[0].message.tool_calls
        assert c.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "guided_regex": "[0-9"}, "guided_regex"),
    ({"prompt": "x", "guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"prompt": "x", "guided_json": "{not json"}, "guided_json"),
    ({"prompt": "x", "guided_choice": []}, "guided_choice"),
    ({"prompt": "x", "guided_grammar": "start: missing_rule"}, "guided_grammar"),
    ({"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"messages": ASK, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
     "response_format"),
    ({"messages": ASK, "response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK, "tools": [WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"},
     "guided_regex"),
])
def test_malformed_guides_are_400s(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert err["param"] == param, err


def test_sglang_generate(server):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "confidence": {"type": "integer"}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    r = httpx.post(f"{server.url}/generate", timeout=300, json={
        "text": "Is water wet? Reply in JSON:",
        "sampling_params": {"temperature": 0, "max_new_tokens": 40,
                            "json_schema": json.dumps(schema)}}).json()
    validate(json.loads(r["text"]), schema)
    assert r["meta_info"]["finish_reason"]["type"] == "stop"
    r = httpx.post(f"{server.url}/generate", timeout=300, json={
        "text": "The year of the moon landing:",
        "sampling_params": {"temperature": 0, "max_new_tokens": 10, "regex": "19[0-9]{2}"}})
    assert re.fullmatch("19[0-9]{2}", r.json()["text"]), r.text
    r = httpx.post(f"{server.url}/generate", timeout=300, json={
        "text": "Pick:", "sampling_params": {"max_new_tokens": 5, "ebnf": 'root ::= "a" | "b"',
                                             "temperature": 0}})
    assert r.json()["text"] in ("a", "b")
    for sp, param in (({"regex": "("}, "sampling_params.regex"),
                      ({"json_schema": "{oops"}, "sampling_params.json_schema"),
                      ({"regex": "a", "ebnf": 'root ::= "a"'}, "sampling_params.ebnf")):
        r = httpx.post(f"{server.url}/generate", timeout=60,
                       json={"text": "x", "sampling_params": sp})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
