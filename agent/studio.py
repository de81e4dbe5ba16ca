"""Entry point for LangGraph's dev server and Studio (`langgraph.json` points here).

The server supplies the checkpointer and the thread; this builds the graph's runner and
LLM client from the run's `configurable` values (the same names as the CLI options), so a
session can be started and inspected step by step in Studio. Start it with the input
`{"settings": {...}}` (see agent/state.py: Settings).
"""

from __future__ import annotations

from agent.graph import Deps, build_graph
from agent.llm import chat_model, resolve_llm
from models.errors import ConfigError
from tools.runner import TrialRunner


def make_graph(config: dict):
    options = (config or {}).get("configurable", {})
    llm = resolve_llm(options.get("llm_base_url"), options.get("llm_model"))
    if llm.embedded:
        raise ConfigError("in LangGraph Studio, set llm_base_url (or DEEPSEEK_API_KEY / OPENAI_API_KEY): "
                          "the embedded model is started by the rectune CLI only")
    runner = TrialRunner.open(options.get("dataset", "baby"), options.get("groups", "activity"),
                              data_dir=options.get("data_dir"), cache_dir=options.get("cache_dir"))
    return build_graph(Deps(runner, runner.space, chat_model(llm), None))
