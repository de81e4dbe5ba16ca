"""The agent's state: what a session knows, checkpointed after every step.

Everything here is plain JSON-able data, so a session survives a crash and continues in
another process (`rectune resume`). The trial runner, the ledger, MLflow and the LLM
client are not state: they are rebuilt from `settings` by every process.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class Settings(TypedDict):
    session: str
    dataset: str
    groups: str
    objective: str
    budget: int
    """Trials per group, the default configuration (trial 0) included."""
    seed: int
    approve: str
    """`auto`: run every valid proposal; `ask`: a person approves, edits or rejects it."""
    max_llm_calls: int
    """LLM calls per group before the graph stops tuning it (a model that never makes a valid call)."""
    may_finish: bool
    """Whether the LLM may stop a group before its budget; a comparison at equal trials says no."""
    max_minutes: float | None
    """Wall-time budget of the session from its start; past it every group keeps only what it has."""
    storage: str
    tracking_uri: str
    data_dir: str | None
    cache_dir: str | None
    llm_base_url: str | None
    llm_model: str | None
    max_latency_ms: NotRequired[float | None]
    """Per-user latency budget; slower trials are infeasible (absent in sessions from before it existed)."""


class Proposal(TypedDict):
    id: str
    tool: str
    params: dict
    """The full validated configuration to run."""
    changes: dict
    """What differs from the current best."""
    rationale: str


class State(TypedDict, total=False):
    settings: Settings
    phase: str
    """select → tune → report → done."""
    table: dict[str, dict[str, dict[str, float]]]
    """Model selection: group → pipeline → validation metrics of the default configuration."""
    selection: dict[str, dict[str, Any]]
    """group → {pipeline, reason, llm, argmax, agrees, f1_argmax, f1_agrees}: the pick (by the LLM, or
    the fallback when it failed) and the paper's check — the pipelines the objective and F1@TopN
    would pick, and whether the pick is each."""
    queue: list[str]
    """Groups still to tune."""
    group: str | None
    history: dict[str, list[dict]]
    """group → trials: number, tuner, params, objective, a few metrics, latency, rationale."""
    pending: Proposal | None
    feedback: str
    """Told to the LLM on its next turn (why a call was refused, a person's comment, a free tool's answer)."""
    approval_error: str
    refused_in_row: int
    """Refused calls in a row: each raises the sampling temperature of the next turn."""
    free_call: bool
    """The last turn used a free tool: the next one is offered only tools that decide."""
    llm_calls: dict[str, int]
    invalid_calls: dict[str, int]
    finished: dict[str, str]
    """group → why tuning stopped (finish, budget, llm-calls)."""
    usage: dict[str, float]
    """LLM calls, seconds and tokens over the session (for the wall-time split and the report)."""
    started_at: float
    """When model selection finished (epoch seconds), for the wall-time budget."""
    mlflow_run_id: str | None
    report: str | None
