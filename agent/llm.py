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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from models.config import llm_base_url, llm_base_url_from_working_directory, llm_model
from models.errors import ConfigError

DEEPSEEK_BASE_URL = "https://api.deepseek.com/v1"
OPENAI_BASE_URL = "https://api.openai.com/v1"
CUSTOM_KEY_ENV = "RECTUNE_LLM_API_KEY"
PROVIDER_KEYS = {"DEEPSEEK_API_KEY": "api.deepseek.com", "OPENAI_API_KEY": "api.openai.com"}
"""Each provider key → the only host it is sent to."""
DEFAULT_MODELS = {"api.deepseek.com": "deepseek-chat", "api.openai.com": "gpt-4o-mini"}
EMBEDDED_MODEL = "qwen2.5-coder-1.5b-instruct"


@dataclass(frozen=True)
class LLMSettings:
    base_url: str
    """The endpoint's URL, or `embedded` = start the local model."""
    model: str
    key_env: str | None
    """Name of the environment variable holding the key (the key itself is never kept)."""
    timeout_s: float = 120.0
    max_retries: int = 4
    """Retries with exponential backoff on 429, 5xx and connection errors (openai client)."""
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


def resolve_llm(base_url: str | None = None, model: str | None = None, timeout_s: float = 120.0,
                max_retries: int = 4) -> LLMSettings:
    untrusted = llm_base_url_from_working_directory(base_url)
    base_url, model = llm_base_url(base_url), llm_model(model)
    options = {"timeout_s": timeout_s, "max_retries": max_retries}
    exported = [env for env in PROVIDER_KEYS if os.environ.get(env)]
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


def chat_model(settings: LLMSettings, base_url: str | None = None):
    """A ChatOpenAI client; `base_url` overrides the settings' (the embedded server's port)."""
    from langchain_openai import ChatOpenAI

    from tools.loopback import is_loopback

    url = base_url or (None if settings.embedded else settings.base_url)
    if url is None:
        raise ConfigError("the embedded model needs its server's URL")
    key = ""
    if settings.key_env:
        if not key_allowed(settings.key_env, url):
            raise ConfigError(f"{settings.key_env} is only sent to {PROVIDER_KEYS.get(settings.key_env, 'an explicit endpoint')}, not to {url}")
        key = os.environ.get(settings.key_env, "")
    clients = {}
    if is_loopback(url):
        import httpx

        # A local server is never behind the http(s)_proxy the environment may set for the internet.
        clients = {"http_client": httpx.Client(trust_env=False, timeout=settings.timeout_s),
                   "http_async_client": httpx.AsyncClient(trust_env=False, timeout=settings.timeout_s)}
    return ChatOpenAI(
        model=settings.model,
        # Always explicit: with None the client would follow OPENAI_BASE_URL / OPENAI_API_BASE
        # from the environment and could carry a provider key elsewhere.
        base_url=url,
        # Local servers need no key, but the client insists on one.
        api_key=key or "not-needed",
        timeout=settings.timeout_s,
        max_retries=settings.max_retries,
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        # Local servers speak Chat Completions only; some model names would switch to /v1/responses.
        use_responses_api=False,
        **clients,
    )
