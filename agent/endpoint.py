"""HTTP to an LLM endpoint: one httpx client that rides out blips, scrubs what error replies
echo, and says what it is waiting for.

The openai client's own retries (0.5 s doubling to 8 s, ~6 s in all over 4 retries) stop a
session on a provider's 10-second hiccup, and they never see a 200 whose JSON body was
cut off (it becomes a traceback). Here every attempt goes through `ResilientTransport`:

- a 408/409/429/5xx, a dropped or refused connection, a read timeout, or a 200 with a
  cut-off JSON body is retried after RETRY_WAITS_S (a server's Retry-After, up to a
  minute, when it asks for longer); the last failure reaches the openai client as usual
  (a status error, or a connection error whose cause is `ReplyCutOff`);
- the body of every error reply is scrubbed before anything parses it: a proxy answering
  401 with "Incorrect API key provided: Bearer sk-…" would otherwise put the key into the
  exception, and from there into checkpoints and traces;
- while a call waits, a line every `progress_every_s` says so, and each retry is announced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import httpx

from rectune.tools.loopback import is_loopback
from rectune.tools.tracking import scrub

RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Seconds before each retry: about a minute in all."""
MAX_RETRY_AFTER_S = 60.0
_RETRIED_STATUSES = {408, 409, 429}
_DECODED_HEADERS = ("content-encoding", "content-length", "transfer-encoding")


class ReplyCutOff(httpx.TransportError):
    """A 200 reply whose JSON body ends early."""


def _retry_wait(response: httpx.Response | None, wait: float) -> float:
    """`wait`, or longer when the server's Retry-After (seconds) asks for it."""
    try:
        asked = float(response.headers.get("retry-after", "")) if response is not None else 0.0
    except ValueError:
        asked = 0.0
    return max(wait, min(asked, MAX_RETRY_AFTER_S))


def _examined(request: httpx.Request, response: httpx.Response) -> tuple[httpx.Response, str | None]:
    """The response as the client gets it (an error's body scrubbed), and why to retry it, if so.

    A JSON reply is read here and handed on rebuilt from the bytes read (decoded, so its
    content-encoding goes); an event stream passes through unread."""
    if response.status_code < 400 and "json" not in response.headers.get("content-type", ""):
        return response, None
    body = response.read()
    problem = None
    if response.status_code >= 400:
        body = scrub(body.decode(response.encoding or "utf-8", "replace")).encode()
        if response.status_code in _RETRIED_STATUSES or response.status_code >= 500:
            problem = f"HTTP {response.status_code}"
    else:
        import json

        try:
            json.loads(body)
        except ValueError:
            problem = f"a reply cut off after {len(body)} bytes (HTTP {response.status_code}, not complete JSON)"
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DECODED_HEADERS]
    rebuilt = httpx.Response(response.status_code, headers=[*headers, ("content-length", str(len(body)))],
                             stream=httpx.ByteStream(body), request=request)
    return rebuilt, problem


_unattended = threading.local()


@contextmanager
def unattended() -> Iterator[None]:
    """No "still waiting" lines for the calls this thread makes: nobody waits for them (a warm-up)."""
    _unattended.on = True
    try:
        yield
    finally:
        _unattended.on = False


class Progress:
    """Lines about a call that takes long or is retried, through `echo` (None: silent)."""

    def __init__(self, echo: Callable[[str], None] | None, every_s: float):
        self.echo = echo
        self.every_s = every_s

    def say(self, line: str) -> None:
        if self.echo is not None:
            self.echo(f"[llm] {line}")

    @contextmanager
    def waiting(self, timeout_s: float | None) -> Iterator[None]:
        if self.echo is None or getattr(_unattended, "on", False):
            yield
            return
        done = threading.Event()
        start = time.monotonic()
        limit = f" (gives up after {timeout_s:g} s)" if timeout_s else ""

        def tick() -> None:
            while not done.wait(self.every_s):
                self.say(f"still waiting for the LLM endpoint: {time.monotonic() - start:.0f} s so far{limit}")

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


class ResilientTransport(httpx.BaseTransport):
    """Retries blips with a long backoff; scrubs error replies; reports waits (see the module)."""

    def __init__(self, inner: httpx.BaseTransport, waits: tuple[float, ...], progress: Progress,
                 sleep: Callable[[float], None] = time.sleep):
        self.inner = inner
        self.waits = waits
        self.progress = progress
        self.sleep = sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout = (request.extensions.get("timeout") or {}).get("read")
        attempts = len(self.waits) + 1
        for attempt, wait in enumerate([*self.waits, None], start=1):
            response = None
            try:
                with self.progress.waiting(timeout):
                    response, problem = _examined(request, self.inner.handle_request(request))
            except httpx.TransportError as error:
                if wait is None:
                    raise
                problem = f"{type(error).__name__}" + (f" ({error})" if str(error) else "")
            if problem is None:
                return response
            if wait is None:
                if response.status_code < 400:
                    raise ReplyCutOff(f"{problem}, on each of {attempts} attempts")
                return response
            if response is not None:
                response.close()
            wait = _retry_wait(response, wait)
            self.progress.say(f"{scrub(problem)}; retrying in {wait:g} s (attempt {attempt + 1} of {attempts})")
            self.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        self.inner.close()


def http_client(url: str, timeout_s: float, waits: tuple[float, ...], echo: Callable[[str], None] | None,
                progress_every_s: float) -> httpx.Client:
    """The client for `url`: its proxy from the environment as httpx would pick it (a
    transport of our own replaces httpx's proxy mounts), none for a loopback server."""
    proxy = None
    host = urlsplit(url).hostname or ""
    if not is_loopback(url) and not proxy_bypass(host):
        proxies = getproxies()
        proxy = proxies.get(urlsplit(url).scheme) or proxies.get("all")
    # trust_env on the inner transport keeps SSL_CERT_FILE / SSL_CERT_DIR for remote endpoints.
    inner = httpx.HTTPTransport(proxy=proxy, trust_env=not is_loopback(url))
    transport = ResilientTransport(inner, waits, Progress(echo, progress_every_s))
    return httpx.Client(transport=transport, trust_env=False, timeout=timeout_s)
