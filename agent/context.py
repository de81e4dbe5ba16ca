"""A session's settings, and the resources a process builds from them.

`Settings` is the one settings object of the agent: `rectune tune` and `rectune compare`
build it, the graph checkpoints it (as JSON, in the state), and every study context
derives from it (`study_context`). `Resources` is LangGraph's runtime context: the trial
runner, the LLM client, the MLflow session — rebuilt by every process, never
checkpointed, and opened from the settings on first use where the caller gives none
(LangGraph Studio gives none).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from rectune.models.errors import ConfigError

APPROVALS = ("ask", "auto")


@dataclass(frozen=True)
class Settings:
    """Everything a session is started with; checkpointed, so a resume runs with the same."""

    session: str
    """The session's name: its LangGraph thread, MLflow parent run and study names (`<session>-<group>`)."""
    dataset: str = "baby"
    groups: str = "activity"
    """User-group spec (models.groups), e.g. `activity:2`."""
    objective: str = "ndcg@20"
    budget: int = 10
    """Trials per group, the default configuration (trial 0) included."""
    seed: int = 0
    approve: str = "ask"
    """`auto`: run every valid proposal; `ask`: a person approves, edits or rejects it."""
    max_llm_calls: int = 0
    """LLM calls per group before the graph stops tuning it (0: three per trial of the budget)."""
    may_finish: bool = True
    """Whether the LLM may stop a group before its budget; a comparison at equal trials says no."""
    max_minutes: float | None = None
    """Wall-time budget of tuning from the end of model selection; past it each group keeps what it has."""
    max_latency_ms: float | None = None
    """Per-user latency budget; slower trials are infeasible."""
    storage: str = "sqlite:///rectune-optuna.db"
    """Optuna storage URL of the trial ledger."""
    tracking_uri: str = "sqlite:///mlflow.db"
    data_dir: str | None = None
    cache_dir: str | None = None
    llm_base_url: str | None = None
    llm_model: str | None = None

    def __post_init__(self) -> None:
        if self.approve not in APPROVALS:
            raise ConfigError(f"approve must be one of {APPROVALS}, but got {self.approve!r}")
        if not self.max_llm_calls:
            object.__setattr__(self, "max_llm_calls", 3 * self.budget)

    @classmethod
    def named(cls, session: str | None, label: str, **values) -> "Settings":
        """Settings named `session`, or by the dataset's `label`, the groups and the time when it is None."""
        name = session or f"{label}-{values.get('groups', 'activity').replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}"
        return cls(session=name, **values)

    def study_name(self, group: str) -> str:
        return f"{self.session}-{group}"

    def study_context(self, group: str, pipeline: str, tuner: str = "llm"):
        """The context of this session's study of `group` (tools.study.StudyContext)."""
        from rectune.tools.study import StudyContext

        return StudyContext(self.dataset, self.groups, group, pipeline, self.objective, self.seed, self.budget, tuner,
                            self.max_latency_ms)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: "dict | Settings") -> "Settings":
        """Settings from the state, from a dict a caller built, or as they are; fields added since
        a session was checkpointed take their defaults (that session ran without them:
        `may_finish` true, no latency budget), and an unknown field is refused by name."""
        if isinstance(values, Settings):
            return values
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown session setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class Resources:
    """LangGraph's runtime context of the agent graph: what a process builds, never checkpointed.

    A field left None is built from the session's settings on first use (see nodes.resources),
    so LangGraph Studio, which passes none, runs the graph too."""

    runner: Any = None
    """tools.runner.TrialRunner."""
    llm: Any = None
    """A LangChain chat model (ChatOpenAI)."""
    session: Any = None
    """The MLflow parent run (tools.tracking.TrackingSession), if tracking."""
    echo: Any = None
    """Where progress lines go (default: print)."""
    report_dir: Any = None
    """Where the session's report goes (default: ./reports)."""
    warm_prompt_cache: bool = False
    """Whether model selection may have the LLM endpoint read the tuning prompt's prefix ahead of
    the first call: only for the embedded model, which is local, free and idle then."""
    opened: dict = field(default_factory=dict)
    """What was built on first use, by name."""
