"""LLM backends: any OpenAI-compatible endpoint through langchain-openai's ChatOpenAI.

Resolution, first hit wins, for the endpoint and the model each: flags (`--llm-base-url`,
`--llm-model`) → RECTUNE_LLM_BASE_URL / RECTUNE_LLM_MODEL → `llm_base_url` / `llm_model` in
rectune.toml (models/config.py) → DeepSeek when DEEPSEEK_API_KEY is set → OpenAI when
OPENAI_API_KEY is set → the embedded local model (no key; see agent/local_llm.py).

Which key goes where: a provider's key only ever goes to that provider's API host over
https (DEEPSEEK_API_KEY to api.deepseek.com, OPENAI_API_KEY to api.openai.com), so pointing
rectune at some other endpoint never hands it a key that happens to be exported.
RECTUNE_LLM_API_KEY is the user's opt-in key for an explicit endpoint (and wins there).
Keys are read from the environment when the client is built and never stored in the
session state.

Waiting: a call gives up after RECTUNE_LLM_TIMEOUT seconds (default 120; 900 for the
embedded model, whose first call on two busy cores can take minutes), says every 30 s
that it is still waiting, and rides out blips with a long backoff (agent/endpoint.py).
`invoke` turns what is left into `LLMUnavailable`: one scrubbed line saying what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from rectune.models.config import llm_base_url, llm_base_url_from_working_directory, llm_model
from rectune.models.errors import ConfigError, RectuneError

DEEPSEEK_BASE_URL = "https://api.deepseek.com/v1"
OPENAI_BASE_URL = "https://api.openai.com/v1"
CUSTOM_KEY_ENV = "RECTUNE_LLM_API_KEY"
PROVIDER_KEYS = {"DEEPSEEK_API_KEY": "api.deepseek.com", "OPENAI_API_KEY": "api.openai.com"}
"""Each provider key → the only host it is sent to."""
DEFAULT_MODELS = {"api.deepseek.com": "deepseek-chat", "api.openai.com": "gpt-4o-mini"}
EMBEDDED_MODEL = "qwen2.5-coder-1.5b-instruct"
TIMEOUT_ENV = "RECTUNE_LLM_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
# The 1.5B model's first call on two busy cores took over 120 s; a client that gives up
# early only queues its retry behind the generation it abandoned.
EMBEDDED_TIMEOUT_S = 900.0
DEFAULT_RETRIES = 6  # all of endpoint.RETRY_WAITS_S: about a minute of blips
TEXT_REPLY_LIMIT = 3
"""Tool-less replies in a row after which an endpoint is taken not to make tool calls."""


class LLMUnavailable(RectuneError):
    """The LLM endpoint failed after its retries, or cannot do the job; the session can be resumed."""


@dataclass(frozen=True)
class LLMSettings:
    base_url: str
    """The endpoint's URL, or `embedded` = start the local model."""
    model: str
    key_env: str | None
    """Name of the environment variable holding the key (the key itself is never kept)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_RETRIES
    """Retries of a blip (429, 5xx, a dropped connection, a cut-off reply), waiting the first
    `max_retries` of endpoint.RETRY_WAITS_S."""
    progress_every_s: float = 30.0
    """A line every this many seconds while a call waits."""
    temperature: float = 0.0
    max_tokens: int = 512
    withheld: tuple[str, ...] = ()
    """Provider keys set in the environment but not sent to this endpoint (told to the user)."""

    @property
    def embedded(self) -> bool:
        return self.base_url == "embedded"

    def describe(self) -> str:
        where = "the embedded local model" if self.embedded else self.base_url
        text = f"{self.model} at {where}"
        if self.key_env:
            return f"{text} (key from {self.key_env})"
        if CUSTOM_KEY_ENV in self.withheld:
            return (f"{text} without an API key ({CUSTOM_KEY_ENV} is not sent to an endpoint named by ./rectune.toml, "
                    "which may come with a cloned repository; give it with --llm-base-url or RECTUNE_LLM_BASE_URL)")
        if self.withheld:
            return (f"{text} without an API key ({', '.join(self.withheld)} only goes to its provider; "
                    f"set {CUSTOM_KEY_ENV} for this endpoint)")
        return text


def key_allowed(key_env: str, url: str | None) -> bool:
    """Whether the key in `key_env` may be sent to `url`."""
    if key_env == CUSTOM_KEY_ENV:
        return url is not None
    parts = urlsplit(url or "")
    return key_env in PROVIDER_KEYS and parts.scheme == "https" and parts.hostname == PROVIDER_KEYS[key_env]


def _checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"LLM base URL {url!r} is not an http(s) URL; expected e.g. http://localhost:8000/v1")
    return url


def _timeout(timeout_s: float | None, embedded: bool) -> float:
    """`timeout_s`, else RECTUNE_LLM_TIMEOUT, else the default for the kind of endpoint."""
    if timeout_s is not None:
        return timeout_s
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return EMBEDDED_TIMEOUT_S if embedded else DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected the seconds an LLM call may take, a number > 0")
    return value


def resolve_llm(base_url: str | None = None, model: str | None = None, timeout_s: float | None = None,
                max_retries: int = DEFAULT_RETRIES) -> LLMSettings:
    untrusted = llm_base_url_from_working_directory(base_url)
    base_url, model = llm_base_url(base_url), llm_model(model)
    exported = [env for env in PROVIDER_KEYS if os.environ.get(env)]
    embedded = base_url == "embedded" or (not base_url and not exported)
    options = {"timeout_s": _timeout(timeout_s, embedded), "max_retries": max_retries}
    if base_url == "embedded":  # forces the local model even while a provider key is exported
        return LLMSettings("embedded", model or EMBEDDED_MODEL, None, **options)
    if base_url:
        url = _checked_url(base_url)
        # From ./rectune.toml the custom key is withheld even when unset, so the LLM line says
        # why setting it would not help.
        custom = [CUSTOM_KEY_ENV] if os.environ.get(CUSTOM_KEY_ENV) or untrusted else []
        key_env = next((env for env in ([] if untrusted else custom) + exported if key_allowed(env, url)), None)
        withheld = tuple(env for env in custom + exported if env != key_env and (untrusted or not key_allowed(env, url)))
        default_model = DEFAULT_MODELS.get(urlsplit(url).hostname or "", "default")
        return LLMSettings(url, model or default_model, key_env, withheld=withheld, **options)
    if exported:
        # DeepSeek first: PROVIDER_KEYS is ordered by precedence.
        key_env = exported[0]
        url = DEEPSEEK_BASE_URL if key_env == "DEEPSEEK_API_KEY" else OPENAI_BASE_URL
        return LLMSettings(url, model or DEFAULT_MODELS[PROVIDER_KEYS[key_env]], key_env, **options)
    return LLMSettings("embedded", model or EMBEDDED_MODEL, None, **options)


def chat_model(settings: LLMSettings, base_url: str | None = None, echo=None):
    """A ChatOpenAI client; `base_url` overrides the settings' (the embedded server's port);
    `echo` gets the lines about long waits and retries."""
    from langchain_openai import ChatOpenAI

    from rectune.agent.endpoint import RETRY_WAITS_S, http_client
    from rectune.tools.loopback import is_loopback

    url = base_url or (None if settings.embedded else settings.base_url)
    if url is None:
        raise ConfigError("the embedded model needs its server's URL")
    key = ""
    if settings.key_env:
        if not key_allowed(settings.key_env, url):
            raise ConfigError(f"{settings.key_env} is only sent to {PROVIDER_KEYS.get(settings.key_env, 'an explicit endpoint')}, not to {url}")
        key = os.environ.get(settings.key_env, "")
    waits = RETRY_WAITS_S[:settings.max_retries]
    clients = {"http_client": http_client(url, settings.timeout_s, waits, echo, settings.progress_every_s)}
    if is_loopback(url):
        import httpx

        # A local server is never behind the http(s)_proxy the environment may set for the internet.
        clients["http_async_client"] = httpx.AsyncClient(trust_env=False, timeout=settings.timeout_s)
    return ChatOpenAI(
        model=settings.model,
        # Always explicit: with None the client would follow OPENAI_BASE_URL / OPENAI_API_BASE
        # from the environment and could carry a provider key elsewhere.
        base_url=url,
        # Local servers need no key, but the client insists on one.
        api_key=key or "not-needed",
        timeout=settings.timeout_s,
        # Retried in http_client, with a backoff that outlasts a provider's blip.
        max_retries=0,
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        # Local servers speak Chat Completions only; some model names would switch to /v1/responses.
        use_responses_api=False,
        **clients,
    )


def bind_decision_tools(model, tools: list[dict]):
    """`model` asked for exactly one call to `tools`, the way endpoints understand it: by the
    tool's name when there is one (llama-cpp-python's server makes a call only when
    tool_choice names it), "required" otherwise (OpenAI, DeepSeek, vLLM, our embedded server).
    Left to "auto", a stock server answers most tuning turns with text."""
    return model.bind_tools(tools, tool_choice=tools[0]["function"]["name"] if len(tools) == 1 else "required")


def answered_in_text(reply) -> bool:
    """Whether a reply holds no tool call at all, readable or not."""
    return not getattr(reply, "tool_calls", None) and not getattr(reply, "invalid_tool_calls", None)


def text_replies_stop(count: int) -> LLMUnavailable:
    """The stop for an endpoint that keeps answering in text: a tuned-nothing report would say it finished."""
    return LLMUnavailable(
        f"the LLM endpoint answered {count} turns in a row with text, not the tool call each one required: it does not "
        "seem to make tool calls (a llama-cpp-python server needs --chat_format chatml-function-calling, vLLM "
        "--enable-auto-tool-choice); nothing is lost — resume the session on an endpoint that makes them")


def invoke(model, messages):
    """`model.invoke(messages)`; an endpoint's failure becomes `LLMUnavailable`."""
    import openai

    try:
        return model.invoke(messages)
    except openai.OpenAIError as error:
        raise endpoint_failure(error) from error


def endpoint_failure(error: BaseException) -> LLMUnavailable:
    """An endpoint's failure (an openai error, after the retries) as one scrubbed line saying what to do."""
    import openai

    from rectune.agent.endpoint import ReplyCutOff
    from rectune.tools.tracking import one_line, scrub

    what = f"{type(error).__name__}: {one_line(error)}"
    causes = [error]
    while causes[-1].__cause__ is not None and len(causes) < 10:  # langchain-openai wraps the openai error
        causes.append(causes[-1].__cause__)
    cut_off = next((cause for cause in causes if isinstance(cause, ReplyCutOff)), None)
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        text = (f"the LLM endpoint refused the request ({what}); check the key ({CUSTOM_KEY_ENV} for an endpoint you "
                f"name, {' or '.join(PROVIDER_KEYS)} for those providers) and the model name, then resume the session")
    elif cut_off is not None:
        text = f"the LLM endpoint's replies were cut off ({one_line(cut_off)}); nothing is lost — resume the session when it answers in full"
    elif isinstance(error, openai.APITimeoutError):
        text = (f"the LLM endpoint did not answer in time on any attempt; nothing is lost — for a slow model set "
                f"{TIMEOUT_ENV} (seconds per call) higher, then resume the session")
    else:
        text = f"the LLM endpoint failed after its retries ({what}); nothing is lost — resume the session when it is back"
    return LLMUnavailable(scrub(text))
