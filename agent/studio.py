"""Entry point for LangGraph's dev server and Studio (`langgraph.json` points here).

The server supplies the checkpointer and the thread; the graph is built without a runner or
an LLM, so Studio draws it at once. A run starts from the input `{"settings": {...}}`
(agent/context.py: Settings — `session`, `dataset`, `groups`, `budget`, `approve`,
`llm_base_url`, …); the nodes open the trial runner and the LLM from those settings when
they first need them (the embedded model too, started in the server's process), and
record no MLflow runs (`rectune tune` does).
"""

from __future__ import annotations

from rectune.agent.graph import build_graph


def make_graph(config: dict | None = None):
    """The graph for the server; `config` (the assistant's) needs nothing."""
    del config  # everything a run needs comes with its input settings
    return build_graph()
