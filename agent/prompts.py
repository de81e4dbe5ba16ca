"""Prompt templates live as files in prompts/; this fills them."""

from __future__ import annotations

from importlib import resources
from string import Template


def render(name: str, **values) -> str:
    text = resources.files("rectune.prompts").joinpath(f"{name}.md").read_text(encoding="utf-8")
    return Template(text).substitute({k: str(v) for k, v in values.items()})
