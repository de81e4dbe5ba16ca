"""What a trial is — one definition for every tuner (LLM agent, Optuna TPE, random search).

A trial = (dataset, user groups, group, pipeline, params, seed) → metrics on the
validation split (tuning) and, when asked, on the test split (reporting).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TUNERS = ("default", "llm", "tpe", "random")


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
    eval_seconds: float
    cache: str
    """What was reused: `none`, `recall` (ranker retrained), `model` (no training), `ranking`."""
    feasible: bool = True
    """False when the trial broke a constraint such as --max-latency-ms."""
    test_metrics: dict[str, dict[str, float]] | None = None
    """Test metrics in the same shape, only when the trial was asked to report them."""
    metric: str = ""
    """The objective's metric name as computed (`f1@topn` becomes e.g. `f1@20`)."""

    def to_dict(self) -> dict:
        return asdict(self)
