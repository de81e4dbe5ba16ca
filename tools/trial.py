"""What a trial is — one definition for every tuner (the default configuration, Optuna TPE,
random search, local search, the LLM agent).

A trial = (dataset, user groups, group, pipeline, params, seed) → metrics on the
validation split (tuning) and, when asked, on the test split (reporting). `TrialRecord` is
the one shape of a trial everywhere a trial is read: the study's history, the agent's
state, the comparison, the MLflow back-fill.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

STATES = ("complete", "failed", "rejected", "waiting", "running")


@dataclass(frozen=True)
class TrialSpec:
    dataset: str
    """Registered dataset name (models.loaders.DATASETS)."""
    groups: str
    """User-group spec, e.g. `activity` or `prefix` (models.groups)."""
    group: str
    """The group whose validation metric is the objective; `all` = every user."""
    pipeline: str
    """One of models.pipeline.PIPELINES."""
    params: dict = field(default_factory=dict)
    """Tunable parameter values, validated against the search space."""
    seed: int = 0
    objective: str = "ndcg@20"
    """Metric name as computed by models.metrics (`ndcg@20`, `recall@50`, `f1@20`, …)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrialResult:
    spec: TrialSpec
    objective: float
    """spec.objective on the validation split of spec.group."""
    metrics: dict[str, dict[str, float]]
    """Validation metrics: `overall` and one entry per group label → metric → value."""
    latency_ms_per_user: float
    """Wall time to recommend for one user (candidates + ranking), averaged over the group."""
    train_seconds: float
    """This trial's wall seconds to get its fitted stages (near 0 when they came from the cache)."""
    eval_seconds: float
    cache: str
    """What was reused: `none`, `recall` (ranker retrained), `model` (no training), `ranking`."""
    feasible: bool = True
    """False when the trial broke a constraint such as --max-latency-ms."""
    test_metrics: dict[str, dict[str, float]] | None = None
    """Test metrics in the same shape, only when the trial was asked to report them."""
    metric: str = ""
    """The objective's metric name as computed (`f1@topn` becomes e.g. `f1@20`)."""
    per_user: dict | None = None
    """The objective per evaluated user of spec.group on validation (tools.noise.per_user_vector),
    for paired intervals against other trials; None for a metric of the whole list (coverage, novelty)."""
    vs_best: dict | None = None
    """This trial minus the study's best complete trial before it, paired over the users: a
    tools.noise.Interval as JSON plus `trial`, the best's number; None for the first trial."""
    ranker_curve: list[dict] | None = None
    """The ranker's training: per epoch its mean training loss and its validation loss
    (models.deepfm); None without a ranker."""
    fit_seconds: float | None = None
    """What fitting the pipeline's stages took when they were fitted, cached or not: its cost,
    where train_seconds is this trial's wait. None when unknown (ledgers written before it)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrialResult":
        return cls(**{**values, "spec": TrialSpec(**values["spec"])})


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a study as the ledger holds it, whoever proposed it."""

    number: int
    """The trial's number in the ledger (the Optuna study)."""
    tuner: str
    """Registered name of the proposer that made it: `default`, `tpe`, `random`, `local`, `llm`, …"""
    state: str
    """One of STATES: `failed` = the trial ran and produced no number (see `error`); it counts
    against the budget. `rejected` = a person refused the proposal; it costs nothing."""
    params: dict
    """The configuration (every parameter of the pipeline)."""
    rationale: str = ""
    proposal_id: str = ""
    error: str = ""
    """Why a failed trial failed."""
    comment: str = ""
    """A person's comment on a rejected proposal."""
    result: TrialResult | None = None
    """The runner's outcome (complete trials only)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What the proposer kept with the trial (Proposal.meta: LLM seconds and tokens, …)."""

    @property
    def objective(self) -> float | None:
        return None if self.result is None else self.result.objective

    @property
    def feasible(self) -> bool:
        """Complete and within the study's constraints (the latency budget)."""
        return self.result is not None and self.result.feasible

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "TrialRecord":
        result = values.get("result")
        return cls(**{**values, "result": None if result is None else TrialResult.from_dict(result)})


def canonical(params: dict) -> str:
    """The one key of a configuration: equal configurations (validated, so 64.0 is 64) have equal keys."""
    return json.dumps(params, sort_keys=True, default=str)


def changed(params: dict, base: dict) -> dict:
    """The values of `params` that differ from `base`."""
    return {name: value for name, value in params.items() if base.get(name) != value}


FINISHED = ("complete", "failed")
"""The states that count against a budget: a rejected proposal costs nothing, a queued or running one is not done."""


def spent(history: Iterable[TrialRecord]) -> int:
    """Trials of `history` that count against the budget."""
    return sum(1 for record in history if record.state in FINISHED)


def tried(history: Iterable[TrialRecord]) -> dict[str, str]:
    """Canonical key → what became of it, for every configuration in `history`, rejected proposals included."""
    return {canonical(r.params): (f"rejected by a person ({r.comment})" if r.state == "rejected" else f"tried as trial {r.number}")
            for r in history}
