"""The agent's state: what a session knows, checkpointed after every step.

Everything here is plain JSON-able data, so a session survives a crash and continues in
another process (`rectune resume`). The trial runner, the ledger, MLflow and the LLM
client are not state: they are the runtime context (agent/context.py: Resources).
"""

from __future__ import annotations

from typing import Any

# typing_extensions: pydantic builds Studio's input form from these, and on Python 3.11 it
# cannot read typing.TypedDict.
from typing_extensions import NotRequired, TypedDict

from rectune.models.errors import ConfigError

class InputState(TypedDict):
    """What starts a session (Studio's input form): its settings."""

    settings: dict
    """agent.context.Settings as JSON."""
    mlflow_run_id: NotRequired[str | None]
    """The session's MLflow parent run (`rectune tune` opens it; Studio records none)."""


class Pending(TypedDict):
    """A proposal waiting for approval, then for its trial."""

    id: str
    """Stable proposal id: the ledger runs it exactly once."""
    params: dict
    """The full validated configuration to run."""
    changes: dict
    """What differs from the current best."""
    rationale: str
    meta: dict
    """The proposer's meta (LLM seconds, tokens, calls)."""


class State(InputState, total=False):
    phase: str
    """select → tune → report → done."""
    table: dict[str, dict[str, dict[str, float]]]
    """Model selection: group → pipeline → validation metrics of the default configuration."""
    selection: dict[str, dict[str, Any]]
    """group → {pipeline, reason, chosen_by, llm, band, argmax, agrees, in_band, f1_argmax, f1_agrees}:
    the pick (by the rule when one pipeline is within noise of the best, else by the LLM, or the
    fallback when it failed), the noise band, and the paper's check — the pipelines the objective
    and F1@TopN would pick, and whether the pick is each."""
    queue: list[str]
    """Groups still to tune."""
    group: str | None
    """The group being tuned."""
    history: dict[str, list[dict]]
    """group → its study's trials, oldest first (TrialRecord.to_json), rejected proposals included."""
    pending: Pending | None
    approval_error: str
    """Why a person's last answer was not used (shown when asked again)."""
    llm_calls: dict[str, int]
    """LLM calls per group (`select`: the pick)."""
    invalid_calls: dict[str, int]
    """Refused LLM calls per group (`select`: the pick)."""
    finished: dict[str, str]
    """group → why tuning stopped (budget, finish: reason, llm-call budget, wall-time budget)."""
    usage: dict[str, float]
    """LLM calls, seconds and tokens over the session (for the wall-time split and the report)."""
    began_at: float
    """When model selection began (epoch seconds): the report's LLM share of the session's wall time."""
    started_at: float
    """When model selection finished (epoch seconds), for the wall-time budget."""
    waited: float
    """Seconds spent waiting for a person's answer (`--approve ask`): not the LLM's, not the machine's."""
    report: str | None
    """Path of the written report."""


def checked(values: dict, session: str) -> dict:
    """A checkpointed state this rectune can continue: the one place that knows older layouts.

    Before the study loop (issue 12) a group's trials were kept in another shape (`trial`,
    `objective`, … instead of TrialRecord's `number`, `state`, `result`); a session still
    tuning in that shape cannot continue and is refused by name (its trials stay in the
    ledger). A finished one is only listed, never run again; one stopped before its first
    trial has nothing in the old shape and continues."""
    rows = [row for rows in (values.get("history") or {}).values() for row in rows]
    if values.get("phase") == "done" or all("number" in row and "state" in row for row in rows):
        return values
    raise ConfigError(f"session {session!r} was saved by a rectune from before the study loop: its trials are "
                      f"in an older shape and it cannot be resumed; they are in the ledger studies '{session}-<group>'. "
                      "Start a new session")
