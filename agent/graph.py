"""The tuning agent as a LangGraph state machine: the builder only (the nodes are in agent/nodes.py).

    select → pick → start_group → decide → approve → run_trial → decide … → next_group
                                    ↑         ↓ reject / ask again            → start_group
                                    └─────────┘                               → report → END

The graph owns the control flow and every budget; the LLM makes one small decision per
node (pick the pipelines; then, per group, the next proposal — agent/proposer.py) and sees
the whole history each time. The graph needs no LLM to be built: the nodes resolve it
from the session's settings when they first call it, so LangGraph Studio can draw it.
"""

from __future__ import annotations

from langgraph.graph import END, START, StateGraph

from rectune.agent import nodes
from rectune.agent.context import Resources
from rectune.agent.state import InputState, State


def build_graph(checkpointer=None):
    """The compiled graph; run it with `context=Resources(...)` (or none: see nodes.resources)."""
    builder = StateGraph(State, input_schema=InputState, context_schema=Resources)
    for node in (nodes.select, nodes.pick, nodes.start_group, nodes.decide, nodes.approve, nodes.run_trial,
                 nodes.next_group, nodes.report):
        builder.add_node(node.__name__, node)
    builder.add_edge(START, "select")          # evaluate every pipeline's default configuration on every group
    builder.add_edge("select", "pick")         # the LLM picks a pipeline per group from that table
    builder.add_edge("pick", "start_group")    # the first group's study and its trial 0 (the default)
    builder.add_edge("start_group", "decide")  # the LLM proposes; decide, approve, run_trial and next_group
    #                                            route themselves with Command (see their return types)
    builder.add_edge("report", END)            # the report on the test split ends the session
    return builder.compile(checkpointer=checkpointer)


def build_pick_graph(checkpointer=None):
    """Model selection alone (what `rectune compare` needs per seed), checkpointed like a session."""
    builder = StateGraph(State, input_schema=InputState, context_schema=Resources)
    builder.add_node("select", nodes.select)
    builder.add_node("pick", nodes.pick)
    builder.add_edge(START, "select")  # every pipeline's default configuration on every group
    builder.add_edge("select", "pick")  # the LLM picks a pipeline per group
    builder.add_edge("pick", END)       # the tuners then tune those pipelines (agent/compare.py)
    return builder.compile(checkpointer=checkpointer)
