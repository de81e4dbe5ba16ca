"""A scripted OpenAI-compatible chat server on 127.0.0.1, for deterministic agent tests.

The real langchain-openai client talks to it over HTTP. Each request is answered by the
next scripted reply: a tool call, several calls, arguments that are not JSON, plain text,
an HTTP error (whose message may echo the request's Authorization header, as many proxies'
401s do), a 200 whose JSON body is cut off, any of these after a delay or with the usage an
endpoint reports, or a function of the request that returns one of these. Every request
body and its headers are kept for the test to inspect.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def call(name: str, **args) -> dict:
    return {"calls": [(name, json.dumps(args))]}


def calls(*pairs: tuple[str, dict]) -> dict:
    return {"calls": [(name, json.dumps(args)) for name, args in pairs]}


def raw(name: str, arguments: str) -> dict:
    return {"calls": [(name, arguments)]}


def text(content: str) -> dict:
    return {"text": content}


def status(code: int, message: str = "scripted failure") -> dict:
    """An HTTP error; `{authorization}` in `message` becomes the request's Authorization header."""
    return {"status": code, "message": message}


def cut_off() -> dict:
    """A 200 whose JSON body stops halfway (its Content-Length says so: the HTTP is sound)."""
    return {"cut_off": True}


def delayed(seconds: float, reply: dict) -> dict:
    return {**reply, "delay": seconds}


def with_usage(reply: dict, **usage) -> dict:
    """`reply` with the usage an endpoint reports, e.g. prompt_tokens_details={"cached_tokens": 90}
    as llama.cpp, vLLM and OpenAI report a prompt prefix served from their cache (default:
    10 prompt and 5 completion tokens)."""
    return {**reply, "usage": usage}


def named_tool_only(reply) -> "callable":
    """As a server that honours only a tool_choice naming a function answers: `reply` (or, for a
    function of the request, what it returns) when it names one, text otherwise (a stock
    llama-cpp-python server with chatml-function-calling answers "auto" so; Ollama ignores
    tool_choice altogether)."""
    def answer(body: dict) -> dict:
        if not isinstance(body.get("tool_choice"), dict):
            return text("I would change k to 80 because it helps recall.")
        return reply(body) if callable(reply) else reply
    return answer


def pick_first(body: dict) -> dict:
    """The pick answered from the request itself: for every group its tool asks about, the first
    pipeline within noise of the best (which pipelines tie depends on the data, not the script)."""
    [tool] = [t["function"] for t in body["tools"] if t["function"]["name"] == "choose_pipelines"]
    return call("choose_pipelines", **{group: {"because": "best objective", "pipeline": spec["properties"]["pipeline"]["enum"][0]}
                                       for group, spec in tool["parameters"]["properties"].items()})


def is_pick(body: dict) -> bool:
    return any(t["function"]["name"] == "choose_pipelines" for t in body.get("tools") or [])


def is_warm_up(body: dict) -> bool:
    """A request that only has the endpoint read a prompt prefix (agent/nodes.py, during model selection)."""
    return body.get("max_completion_tokens", body.get("max_tokens")) == 1 and body["messages"][-1]["content"] == ""


class ScriptedLLM:
    """`replies` answer the tuning calls in order; `picks` the model-selection calls (those that
    offer choose_pipelines, made only when pipelines tie), `pick_first` once they run out;
    warm-ups get one token of text and consume neither."""

    def __init__(self, replies: list[dict], on_request=None, picks: list | None = None):
        self.replies = list(replies)
        self.picks = list(picks or [])
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.on_request = on_request
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner._lock:
                    owner.requests.append(body)
                    owner.headers.append(dict(self.headers))
                    index = len(owner.requests)
                    if is_warm_up(body):
                        reply = text("{")
                    elif is_pick(body):
                        reply = owner.picks.pop(0) if owner.picks else pick_first
                    else:
                        reply = owner.replies.pop(0) if owner.replies else call("finish", reason="script exhausted")
                if callable(reply):  # a reply that depends on what was asked
                    reply = reply(body)
                if owner.on_request:
                    owner.on_request(index, body)
                time.sleep(reply.get("delay", 0))
                if "status" in reply:
                    message = reply.get("message", "scripted failure").replace("{authorization}", self.headers.get("Authorization", ""))
                    self._send(reply["status"], {"error": {"message": message, "type": "server_error"}})
                    return
                message = {"role": "assistant", "content": reply.get("text")}
                if "calls" in reply:
                    message["tool_calls"] = [{"id": f"call_{index}_{i}", "type": "function",
                                              "function": {"name": name, "arguments": arguments}}
                                             for i, (name, arguments) in enumerate(reply["calls"])]
                self._send(200, {"id": f"chatcmpl-{index}", "object": "chat.completion", "created": 0, "model": body.get("model"),
                                 "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if "calls" in reply else "stop"}],
                                 "usage": reply.get("usage", {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})},
                           cut=reply.get("cut_off", False))

            def _send(self, code: int, payload: dict, cut: bool = False):
                data = json.dumps(payload).encode()
                data = data[: len(data) // 2] if cut else data
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedLLM":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def prompt(self, index: int) -> str:
        """The text of request `index` (1-based), all messages joined."""
        return "\n".join(str(m.get("content") or "") for m in self.requests[index - 1]["messages"])
