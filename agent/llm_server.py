"""A small OpenAI-compatible chat server over llama.cpp for the embedded local model.

Ours rather than `llama_cpp.server`, which with Qwen2.5 returns tool calls as text,
rejects `content: null`, ignores `max_completion_tokens` and shows the GGUF template's
tool instructions with doubled braces. Here, when tools are offered (and tool_choice is
not "none"), decoding is constrained by a grammar built from the tool schemas, so every
reply is exactly one call to an offered tool with schema-valid arguments.

    python -m rectune.agent.llm_server --model PATH --port 8080 [--host 127.0.0.1 --threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from jinja2 import Template

MODEL_ID = "qwen2.5-coder-1.5b-instruct"
MAX_BODY_BYTES = 4 << 20
MAX_TOKENS_CAP = 1024
STOP = ["<|im_end|>", "<|endoftext|>"]
# Qwen2.5's template asks for calls as <tool_call>{json}</tool_call>; opening the tag in
# the prompt lets the grammar-forced JSON continue the format the model was trained on.
TOOL_CALL_OPEN = "<tool_call>\n"
# The GGUF's template writes this example inside a Jinja string, so the braces come out doubled.
DOUBLED_EXAMPLE = '{{"name": <function-name>, "arguments": <args-json-object>}}'
ROLES = {"system", "developer", "user", "assistant", "tool"}
AMX_FREE_BUILD = ("To restore repacking, rebuild without AMX: CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
                  "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
                  "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36")


class BadRequest(ValueError):
    """Answered with HTTP 400 and this message."""


class ClientGone(Exception):
    """The client closed its connection (it timed out): the work for it is abandoned."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV entries were reused from the previous request (a shared prefix)."""


class Backend(Protocol):
    def complete(self, messages: list[dict], tools: list[dict] | None, schema: dict | None, *, max_tokens: int,
                 temperature: float, top_p: float, stop: list[str], seed: int | None,
                 cancelled: Callable[[], bool] = lambda: False) -> Completion:
        """Render, generate; with `schema`, the text must be one JSON instance of it. Raises
        ClientGone, as soon as it can, once `cancelled()` is true."""


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: only text content parts are supported, got {json.dumps(part)[:100]}")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where}: content must be a string, a list of text parts or null")


def normalise_messages(messages: Any) -> list[dict]:
    """Messages as the Qwen template needs them: string content (LangChain sends null after
    a tool call), system for developer, and tool-call arguments as objects, not JSON strings."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: needs a 'role' among {sorted(ROLES)}")
        role = "system" if message["role"] == "developer" else message["role"]
        clean = {"role": role, "content": _text(message.get("content"), f"messages[{i}]")}
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise BadRequest(f"messages[{i}].tool_calls: each call needs function.name")
                arguments = function.get("arguments") or "{}"
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except ValueError:
                        pass  # shown to the model as the string it was
                calls.append({"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}})
            clean["tool_calls"] = calls
        if role == "tool":
            clean["tool_call_id"] = message.get("tool_call_id")
        result.append(clean)
    return result


def _tool_name(tool: Any, i: int) -> str:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
    return function["name"]


def _scoped_refs(node: Any, prefix: str) -> Any:
    """Rewrites local `$ref`s so that each tool's `$defs` can live side by side in one schema."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(("#/$defs/", "#/definitions/")):
                out[key] = f"#/$defs/{prefix}{value.rsplit('/', 1)[1]}"
            elif key not in ("$defs", "definitions"):
                out[key] = _scoped_refs(value, prefix)
        return out
    if isinstance(node, list):
        return [_scoped_refs(item, prefix) for item in node]
    return node


def tool_call_schema(tools: list[dict]) -> dict:
    """A JSON schema whose instances are exactly the valid calls {"name", "arguments"} to `tools`."""
    options, defs = [], {}
    for i, tool in enumerate(tools):
        name = _tool_name(tool, i)
        parameters = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise BadRequest(f"tools[{i}]: 'parameters' must be a JSON schema object")
        prefix = f"{name}__"
        for key in ("$defs", "definitions"):
            for def_name, definition in (parameters.get(key) or {}).items():
                defs[prefix + def_name] = _scoped_refs(definition, prefix)
        options.append({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": _scoped_refs(parameters, prefix)},
            "required": ["name", "arguments"],
        })
    schema: dict[str, Any] = {"anyOf": options}
    if defs:
        schema["$defs"] = defs
    return schema


def select_tools(tools: Any, tool_choice: Any) -> tuple[list[dict] | None, list[dict] | None]:
    """(tools shown in the prompt, tools the reply must call); "auto" forces a call as well:
    the agent's graph asks for one decision per turn, and a 1.5B model left free to answer
    in prose often writes the call as text instead."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise BadRequest("'tool_choice' needs 'tools'")
        return None, None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list")
    names = [_tool_name(tool, i) for i, tool in enumerate(tools)]
    if tool_choice == "none":
        return None, None
    if tool_choice in (None, "auto", "required"):
        return tools, tools
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        wanted = tool_choice["function"].get("name")
        if wanted not in names:
            raise BadRequest(f"tool_choice names {wanted!r}, which is not among the tools {names}")
        return tools, [tools[names.index(wanted)]]
    raise BadRequest(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _max_tokens(body: dict) -> int:
    # langchain-openai 1.x sends max_completion_tokens; older clients max_tokens.
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return MAX_TOKENS_CAP
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'max_completion_tokens' must be a positive integer, got {value!r}")
    return min(value, MAX_TOKENS_CAP)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings")
    return stop


def chat_completion(backend: Backend, body: Any, cancelled: Callable[[], bool] = lambda: False) -> dict:
    """The OpenAI chat.completion object answering `body`; raises BadRequest on invalid input,
    ClientGone when `cancelled()` turns true first."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise BadRequest("response_format is not supported; offer a tool instead")
    messages = normalise_messages(body.get("messages"))
    shown, callable_tools = select_tools(body.get("tools"), body.get("tool_choice"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}")
    result = backend.complete(
        messages, shown, tool_call_schema(callable_tools) if callable_tools else None,
        max_tokens=_max_tokens(body), temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=_stop(body), seed=seed, cancelled=cancelled,
    )
    message: dict[str, Any] = {"role": "assistant", "content": result.text.strip()}
    finish_reason = result.finish_reason
    if callable_tools:
        try:
            call = json.loads(result.text)
            name, arguments = call["name"], call["arguments"]
        except (ValueError, KeyError, TypeError):
            # Only a reply cut off at max_tokens can miss the grammar; it goes back as text.
            pass
        else:
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
            }]}
            finish_reason = "tool_calls"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": MODEL_ID,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                  "total_tokens": result.prompt_tokens + result.completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": result.cached_tokens}},
    }


def sse_body(response: dict, include_usage: bool) -> bytes:
    """A finished completion as a chat.completion.chunk event stream (generation is not
    incremental, but streaming clients, e.g. LangGraph's messages mode, still parse it)."""
    choice = response["choices"][0]
    delta = dict(choice["message"])
    if "tool_calls" in delta:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
    head = {key: response[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    chunks = [head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
              head | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}]
    if include_usage:
        chunks.append(head | {"choices": [], "usage": response["usage"]})
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks).encode() + b"data: [DONE]\n\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ChatServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would only grow the log file nobody reads

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        self._send(code, {"error": {"message": message or self.responses.get(code, ("error",))[0], "type": "invalid_request_error"}})

    def _send(self, code: int, payload: dict | bytes, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "rectune"}]})
        else:
            self.send_error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self.send_error(404, f"no route POST {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.send_error(411, "a Content-Length header is required")
            return
        if not 0 <= length <= MAX_BODY_BYTES:
            self.send_error(413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        try:
            body = json.loads(self.rfile.read(length))
            response = chat_completion(self.server.backend, body, lambda: peer_closed(self.connection))
        except ClientGone:
            # Nobody reads an answer now; a retry of the request is already queued behind this one.
            self.close_connection = True
            return
        except BadRequest as error:
            self._send(400, {"error": {"message": str(error), "type": "invalid_request_error"}})
            return
        except ValueError as error:
            self._send(400, {"error": {"message": f"the body is not valid JSON: {error}", "type": "invalid_request_error"}})
            return
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            self._send(500, {"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error"}})
            return
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._send(200, sse_body(response, include_usage), "text/event-stream")
        else:
            self._send(200, response)


def peer_closed(connection: socket.socket) -> bool:
    """Whether the client has closed its end: readable, yet nothing to read. (While it waits
    for an answer, a client sends nothing.)"""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backend: Backend, host: str, port: int):
        super().__init__((host, port), Handler)
        self.backend = backend


def compile_template(source: str) -> Template:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    # As in transformers' apply_chat_template: plain JSON, not Jinja's HTML-escaped tojson.
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def render_prompt(template: Template, messages: list[dict], tools: list[dict] | None) -> str:
    prompt = template.render(messages=messages, tools=tools, add_generation_prompt=True)
    return prompt.replace(DOUBLED_EXAMPLE, DOUBLED_EXAMPLE[1:-1])


class LlamaBackend:
    """Qwen2.5 GGUF through llama-cpp-python, rendered with the GGUF's own chat template."""

    def __init__(self, model_path: str, threads: int, ctx: int, seed: int):
        import llama_cpp
        from llama_cpp import Llama, LlamaGrammar

        if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
            # A -march=native build on an AMX CPU (Sapphire Rapids and later) crashes in its
            # first matmul (GPF in ggml_backend_amx_mul_mat, llama.cpp #20824). Keeping the
            # weights out of the extra (AMX, repacked) buffers avoids those kernels.
            print(f"warning: llama.cpp was built with AMX, which crashes; running without weight repacking. {AMX_FREE_BUILD}",
                  file=sys.stderr, flush=True)
            defaults = llama_cpp.llama_cpp.llama_model_default_params

            def without_extra_buffers() -> Any:
                params = defaults()
                params.use_extra_bufts = False
                return params

            llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
        self.grammar_from_schema = LlamaGrammar.from_json_schema
        self.llm = Llama(model_path=model_path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise SystemExit(f"{model_path}: the GGUF has no chat template")
        self.template = compile_template(template)
        self.states = PromptStates()
        # One llama context: generations must not interleave.
        self.lock = threading.Lock()

    def complete(self, messages: list[dict], tools: list[dict] | None, schema: dict | None, *, max_tokens: int,
                 temperature: float, top_p: float, stop: list[str], seed: int | None,
                 cancelled: Callable[[], bool] = lambda: False) -> Completion:
        from llama_cpp import LogitsProcessorList, StoppingCriteriaList

        prompt = render_prompt(self.template, messages, tools) + (TOOL_CALL_OPEN if schema else "")
        try:
            grammar = self.grammar_from_schema(json.dumps(schema), verbose=False) if schema else None
        except Exception as error:
            raise BadRequest(f"a tool's parameters schema cannot be turned into a grammar: {error}") from error
        greedy = None
        # Requests queue on the lock; one whose client left stops waiting, and generation stops
        # at the next token once the client is gone.
        while not self.lock.acquire(timeout=0.5):
            if cancelled():
                raise ClientGone()
        try:
            if cancelled():
                raise ClientGone()
            tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
            room = self.llm.n_ctx() - len(tokens)
            if room < 1:
                raise BadRequest(f"the prompt is {len(tokens)} tokens; the context holds {self.llm.n_ctx()}")
            self.states.restore(self.llm, tokens)
            # A private attribute of llama-cpp-python: if it goes, no cached tokens are reported, nothing fails.
            cached = _shared_prefix(getattr(self.llm, "_input_ids", ()), tokens)
            # Greedy replies (the agent's) check only the argmax token against the grammar; sampling
            # keeps llama.cpp's chain, which checks the whole vocabulary every token.
            greedy = GreedyUnderGrammar(self.llm, grammar) if grammar is not None and temperature == 0 else None
            out = self.llm.create_completion(tokens, max_tokens=min(max_tokens, room), temperature=temperature,
                                             top_p=top_p, stop=STOP + stop, seed=seed,
                                             grammar=None if greedy else grammar,
                                             logits_processor=LogitsProcessorList([greedy]) if greedy else None,
                                             stopping_criteria=StoppingCriteriaList([lambda ids, logits: cancelled()]))
            if cancelled():
                raise ClientGone()
            self.states.save(self.llm)
        finally:
            self.lock.release()
            if greedy is not None:
                greedy.close()
        choice, usage = out["choices"][0], out["usage"]
        return Completion(choice["text"], choice["finish_reason"] or "stop", usage["prompt_tokens"], usage["completion_tokens"],
                          cached)


class PromptStates:
    """The KV states of the last few requests, so that a prompt another recent request has read
    the head of is not read again. llama.cpp's one context keeps only the previous request's
    tokens: the tuning prompt's prefix, read ahead during model selection, was lost to the pick's
    prompt in between, and the first tuning call read its ~1,300 tokens again (~35 s on 2 cores;
    restoring a state takes 0.1 s, ~26 MB for 900 tokens of the embedded model).

    Not llama-cpp-python's LlamaRAMCache: its states also copy the logits buffer (n_batch ×
    vocabulary floats, 311 MB for Qwen2.5), which its byte budget does not count."""

    def __init__(self, keep: int = 4, max_bytes: int = 512 << 20, least_gain: int = 64):
        self.keep = keep
        self.max_bytes = max_bytes
        """A state grows ~29 KB a token (Qwen2.5-1.5B): 8k-token prompts would take ~230 MB each."""
        self.least_gain = least_gain
        """Tokens a restore must save over the context as it is (reading 64 tokens takes ~2 s)."""
        self.saved: list[tuple[Any, bytes]] = []

    def restore(self, llm: Any, tokens: list[int]) -> None:
        from llama_cpp import llama_cpp

        if not self.saved:
            return
        ids, state = max(self.saved, key=lambda saved: _common_length(saved[0], tokens))
        if _common_length(ids, tokens) < _common_length(llm.input_ids[:llm.n_tokens], tokens) + self.least_gain:
            return
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_set_data(llm._ctx.ctx, buffer, len(state)) != len(state):
            raise RuntimeError("llama.cpp refused a KV state it had written")
        llm.input_ids[:len(ids)] = ids
        llm.n_tokens = len(ids)
        # The restored logits are not the last token's: llama-cpp-python evaluates it again.
        llm._requires_eval = True

    def save(self, llm: Any) -> None:
        from llama_cpp import llama_cpp

        ids = llm.input_ids[:llm.n_tokens].copy()
        size = llama_cpp.llama_state_get_size(llm._ctx.ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(llm._ctx.ctx, buffer, size)
        # A state whose tokens the new one extends is covered by it.
        self.saved = [saved for saved in self.saved if _common_length(saved[0], ids) < len(saved[0])]
        self.saved = (self.saved + [(ids, ctypes.string_at(buffer, written))])[-self.keep:]
        while len(self.saved) > 1 and sum(len(state) for _, state in self.saved) > self.max_bytes:
            self.saved.pop(0)


def _common_length(ids: Any, tokens: list[int]) -> int:
    shared = 0
    for old, new in zip(ids, tokens):
        if old != new:
            break
        shared += 1
    return shared


class GreedyUnderGrammar:
    """A logits processor for greedy decoding under a llama.cpp grammar: the same tokens as
    llama.cpp's grammar sampler followed by greedy, but the grammar sees the argmax token alone
    and the whole vocabulary (151,936 tokens for Qwen2.5) only when it rejects it — as llama.cpp's
    own common_sampler does. Measured with the embedded model on 2 cores: 9.4–9.9 tokens/s
    against 7.0 through the full check, the same 52 tokens (10 of them rejected argmaxes)."""

    def __init__(self, llm: Any, grammar: Any):
        from llama_cpp import llama_cpp

        self.api = llama_cpp
        self.sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode(), grammar._root.encode())
        import numpy as np

        self.one = (llama_cpp.llama_token_data * 1)()
        self.vocabulary = (llama_cpp.llama_token_data * llm.n_vocab())()
        self.table = np.ctypeslib.as_array(self.vocabulary)
        self.table["id"] = np.arange(len(self.table))
        # One token's logit is finite per step: reused, with the last step's token put back to -inf.
        self.only = np.full(llm.n_vocab(), -np.inf, dtype=np.float32)
        self.last = 0

    def allowed(self, candidates: Any) -> Any:
        """The grammar's verdict on `candidates` (a ctypes llama_token_data array): rejected ones get logit -inf."""
        self.api.llama_sampler_apply(self.sampler, ctypes.byref(self.api.llama_token_data_array(
            data=candidates, size=len(candidates), selected=-1, sorted=False)))
        return candidates

    def __call__(self, input_ids: Any, logits: Any) -> Any:
        import numpy as np

        token = int(np.argmax(logits))
        self.one[0].id, self.one[0].logit, self.one[0].p = token, float(logits[token]), 0.0
        if not np.isfinite(self.allowed(self.one)[0].logit):
            # The grammar only writes -inf over rejected logits, so the ids filled once stay valid.
            self.table["logit"] = logits
            self.allowed(self.vocabulary)
            token = int(np.argmax(self.table["logit"]))
        self.api.llama_sampler_accept(self.sampler, token)
        self.only[self.last], self.only[token], self.last = -np.inf, 0.0, token
        return self.only

    def close(self) -> None:
        self.api.llama_sampler_free(self.sampler)


def _shared_prefix(previous, tokens: list[int]) -> int:
    """How many prompt tokens llama.cpp reuses from the previous request's KV cache (or a state
    restored into it): the common prefix, less the one token it evaluates again when the whole
    prompt matches."""
    return max(0, min(_common_length(previous, tokens), len(tokens) - 1))


def _exit_with_parent(parent: int) -> None:
    # The server runs in its own session, so a parent killed by SIGKILL or an unhandled
    # SIGTERM (no atexit, no __exit__) would otherwise leave it holding ~2 GB for good.
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="path of the GGUF file")
    parser.add_argument("--host", default="127.0.0.1", help="the server has no authentication: keep it on loopback")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=8192, help="context window in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # Load before binding, so that /health answering means ready.
    backend = LlamaBackend(args.model, args.threads, args.ctx, args.seed)
    with ChatServer(backend, args.host, args.port) as server:
        print(f"serving {MODEL_ID} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
