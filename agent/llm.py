"""LLM backends: any OpenAI-compatible endpoint through langchain-openai's ChatOpenAI.

Resolution, first hit wins: flags (`--llm-base-url`, `--llm-model`) → RECTUNE_LLM_BASE_URL /
RECTUNE_LLM_MODEL → DeepSeek when DEEPSEEK_API_KEY is set → OpenAI when OPENAI_API_KEY is
set → the embedded local model (no key; see agent/local_llm.py). The API key is read from
the environment when the client is built and never stored in the session state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEEPSEEK_BASE_URL = "https://api.deepseek.com/v1"
KEY_ENVS = ("RECTUNE_LLM_API_KEY", "DEEPSEEK_API_KEY", "OPENAI_API_KEY")


@dataclass(frozen=True)
class LLMSettings:
    base_url: str | None
    """None = OpenAI's own endpoint; `embedded` = start the local model."""
    model: str
    key_env: str | None
    """Name of the environment variable holding the key (the key itself is never kept)."""
    timeout_s: float = 120.0
    max_retries: int = 4
    """Retries with exponential backoff on 429, 5xx and connection errors (openai client)."""
    temperature: float = 0.0
    max_tokens: int = 512

    @property
    def embedded(self) -> bool:
        return self.base_url == "embedded"

    def describe(self) -> str:
        where = "the embedded local model" if self.embedded else (self.base_url or "OpenAI")
        return f"{self.model} at {where}"


def resolve_llm(base_url: str | None = None, model: str | None = None, timeout_s: float = 120.0,
                max_retries: int = 4) -> LLMSettings:
    base_url = base_url or os.environ.get("RECTUNE_LLM_BASE_URL")
    model = model or os.environ.get("RECTUNE_LLM_MODEL")
    options = {"timeout_s": timeout_s, "max_retries": max_retries}
    if base_url:
        key_env = next((env for env in KEY_ENVS if os.environ.get(env)), None)
        return LLMSettings(base_url, model or "default", key_env, **options)
    if os.environ.get("DEEPSEEK_API_KEY"):
        return LLMSettings(DEEPSEEK_BASE_URL, model or "deepseek-chat", "DEEPSEEK_API_KEY", **options)
    if os.environ.get("OPENAI_API_KEY"):
        return LLMSettings(None, model or "gpt-4o-mini", "OPENAI_API_KEY", **options)
    return LLMSettings("embedded", model or "qwen2.5-coder-1.5b-instruct", None, **options)


def chat_model(settings: LLMSettings, base_url: str | None = None):
    """A ChatOpenAI client; `base_url` overrides the settings' (the embedded server's port)."""
    from langchain_openai import ChatOpenAI

    from tools.loopback import is_loopback

    key = os.environ.get(settings.key_env, "") if settings.key_env else ""
    url = base_url or (None if settings.embedded else settings.base_url)
    clients = {}
    if url and is_loopback(url):
        import httpx

        # A local server is never behind the http(s)_proxy the environment may set for the internet.
        clients = {"http_client": httpx.Client(trust_env=False, timeout=settings.timeout_s),
                   "http_async_client": httpx.AsyncClient(trust_env=False, timeout=settings.timeout_s)}
    return ChatOpenAI(
        model=settings.model,
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
