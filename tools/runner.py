"""The trial runner: the one place where every tuner's trials are trained and scored.

`TrialRunner.run(spec)` validates the parameters against the search space, takes the
pipeline's fitted stages from the `ModelCache` (or fits them: only the values that affect
training are in the key, so a K or TopN change does not retrain), serves the users of the
spec's group on the validation split through `Pipeline.recommend` (or reuses lists it
served before), scores them with `score_lists`, times both, and returns a `TrialResult`.
Fitting and serving are the pipeline's own: the runner only caches and times.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rectune.models.dataset import Dataset
from rectune.models.errors import ConfigError
from rectune.models.groups import UserGroups
from rectune.models.metrics import PER_USER_METRICS, EvalResult
from rectune.models.pipeline import (ANCHOR_CUTOFF, Pipeline, PipelineConfig, Recommendations, fit_ranker, fit_recall, inert_by_recall,
                                     score_lists)
from rectune.tools.cache import ModelCache, cache_key, dataset_fingerprint
from rectune.tools.noise import per_user_vector
from rectune.tools.space import SearchSpace
from rectune.tools.trial import TrialResult, TrialSpec

_OBJECTIVE = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)@(?P<n>\d+|topn|k)$")
_LIST_METRICS = (*PER_USER_METRICS, "coverage", "novelty")
_RANKINGS_KEPT = 4


def resolve_objective(objective: str, config: PipelineConfig) -> tuple[str, int | None]:
    """`ndcg@20` → ("ndcg@20", 20); `f1@topn` → ("f1@<top_n>", top_n); `candidate_recall@k`
    → ("candidate_recall@<k>", None). The cutoff is what the ranked list must reach."""
    match = _OBJECTIVE.match(objective.strip().lower())
    if not match:
        raise ConfigError(f"objective must look like ndcg@20, recall@50, f1@topn or candidate_recall@k, but got {objective!r}")
    name, n = match["name"], match["n"]
    if name == "candidate_recall":
        if n not in ("k", str(config.k)):
            raise ConfigError(f"candidate_recall is measured at K={config.k}: use candidate_recall@k, not {objective!r}")
        return f"candidate_recall@{config.k}", None
    if name not in _LIST_METRICS:
        raise ConfigError(f"unknown objective metric {name!r}; expected one of {sorted((*_LIST_METRICS, 'candidate_recall'))}")
    cutoff = config.top_n if n == "topn" else config.k if n == "k" else int(n)
    if cutoff < 1:
        raise ConfigError(f"objective {objective!r}: the cutoff N in metric@N must be at least 1")
    if cutoff > config.k:
        raise ConfigError(f"objective {objective!r} needs a list of {cutoff}, but K={config.k} candidates are ranked")
    return f"{name}@{cutoff}", cutoff


@dataclass(frozen=True)
class _Plan:
    """What one trial computes: the pipeline's configuration, the objective's metric name,
    the cutoffs to score, and whether the recall stage's K candidates are measured too."""

    config: PipelineConfig
    objective: str
    cutoffs: tuple[int, ...]
    candidate_recall: bool


class TrialRunner:
    """Runs trials on one dataset and one user partition, reusing fitted stages and lists.

    Fitted stages are keyed by the training data alone (groups are no model input), so
    runners of one dataset under different groupings share them through the cache."""

    def __init__(self, dataset: Dataset, groups: UserGroups, cache: ModelCache | None = None,
                 space: SearchSpace | None = None, max_latency_ms: float | None = None, progress: bool = False):
        if dataset.item_features is None:
            raise ConfigError(f"dataset {dataset.name!r} has no item features: call models.features.attach_item_features first")
        self.dataset = dataset
        self.groups = groups
        self.cache = cache or ModelCache()
        space = space or SearchSpace.load()
        # What this dataset makes inert, every tuner leaves at its default (a move would repeat a trial).
        self.space = space.with_inert(inert_by_recall(dataset, _lowest(space, "neighbors")))
        self.max_latency_ms = max_latency_ms
        self.progress = progress
        self._fingerprint = dataset_fingerprint(dataset)
        self._served: OrderedDict[str, Recommendations] = OrderedDict()

    @classmethod
    def open(cls, dataset: str, groups: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             **options) -> "TrialRunner":
        """Load a dataset (a registered name or a path) with its features and groups; cache
        models under `cache_dir`/models (default: the rectune cache directory)."""
        from rectune.models.config import cache_dir as resolve_cache_dir
        from rectune.models.features import attach_item_features
        from rectune.models.groups import make_groups, require_held_out
        from rectune.models.loaders import load_dataset

        loaded = attach_item_features(load_dataset(dataset, data_dir), cache_dir=cache_dir)
        cache = ModelCache(resolve_cache_dir(cache_dir) / "models")
        partition = make_groups(loaded, groups)
        require_held_out(loaded, partition)  # tuned on validation, reported on test: NaN otherwise
        return cls(loaded, partition, cache=cache, **options)

    def users(self, group: str) -> np.ndarray:
        return np.arange(self.dataset.n_users) if group == "all" else self.groups.members(group)

    def run(self, spec: TrialSpec, report_test: bool = False) -> TrialResult:
        plan = self._plan(spec)
        start = time.perf_counter()
        pipeline, stages_cached = self._pipeline(plan.config)
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        result, served, served_cached = self._evaluate(pipeline, plan, spec.group, "val")
        test_metrics = self._by_scope(self._evaluate(pipeline, plan, spec.group, "test")[0]) if report_test else None
        eval_seconds = time.perf_counter() - start

        metrics = self._by_scope(result)
        scope = "overall" if spec.group == "all" else spec.group
        if plan.objective not in metrics[scope]:
            raise ConfigError(f"objective {plan.objective!r} is not among the computed metrics: {sorted(metrics[scope])}")
        latency = 1000.0 * sum(served.seconds.values()) / max(len(served.users), 1)
        cache = "ranking" if served_cached else "model" if all(stages_cached) else "recall" if stages_cached[0] else "none"
        # Users without held-out items are left out, the others in index order (the same for every
        # trial of the group); coverage and novelty belong to the whole list and have no per-user values.
        values = result.per_user.get(plan.objective)
        return TrialResult(
            spec=spec, objective=float(metrics[scope][plan.objective]), metrics=metrics, latency_ms_per_user=latency,
            train_seconds=train_seconds, eval_seconds=eval_seconds, cache=cache,
            feasible=self.max_latency_ms is None or latency <= self.max_latency_ms, test_metrics=test_metrics, metric=plan.objective,
            per_user=None if values is None else per_user_vector(values),
            ranker_curve=getattr(pipeline.ranker, "curve", None) or None,
            fit_seconds=_fit_cost(pipeline),
        )

    def per_user(self, spec: TrialSpec, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """(users, values): spec.objective for each evaluated user of spec.group on `split`,
        for bootstrap intervals and permutation tests."""
        plan = self._plan(spec)
        result = self._evaluate(self._pipeline(plan.config)[0], plan, spec.group, split)[0]
        if plan.objective not in result.per_user:
            raise ConfigError(f"objective {plan.objective!r} is not a per-user metric; per-user metrics: {sorted(result.per_user)}")
        return result.users, result.per_user[plan.objective]

    def _plan(self, spec: TrialSpec) -> _Plan:
        # to_config validates (defaults under the given values): the one check a configuration gets here.
        config = replace(self.space.to_config(spec.pipeline, spec.params), seed=spec.seed)
        objective, cutoff = resolve_objective(spec.objective, config)
        cutoffs = tuple(sorted({ANCHOR_CUTOFF, config.top_n, *(() if cutoff is None else (cutoff,))}))
        return _Plan(config, objective, cutoffs, candidate_recall=cutoff is None)

    def _pipeline(self, config: PipelineConfig) -> tuple[Pipeline, tuple[bool, bool]]:
        """The pipeline with its fitted stages, from the cache where it has them."""
        recall, recall_cached = self.cache.get_or_fit(
            cache_key("recall", self._fingerprint, config.recall_key()),
            lambda: fit_recall(config, self.dataset, self.progress))
        ranker, ranker_cached = None, True
        if config.ranker != "none":
            ranker, ranker_cached = self.cache.get_or_fit(
                cache_key("ranker", self._fingerprint, config.ranker_key()),
                lambda: fit_ranker(config, self.dataset, self.progress, lambda subset: self.cache.get_or_fit(
                    cache_key("held-out recall", self._fingerprint, config.ranker, config.recall_key()),
                    lambda: fit_recall(config, subset, self.progress))[0]))
        return Pipeline(config, recall, ranker), (recall_cached, ranker_cached)

    def _evaluate(self, pipeline: Pipeline, plan: _Plan, group: str, split: str) -> tuple[EvalResult, Recommendations, bool]:
        """The metrics of `group`'s users on `split`, the lists they were served, and whether
        those lists were reused."""
        served, cached = self._serve(pipeline, group, split, max(plan.cutoffs), plan.candidate_recall)
        return score_lists(self.dataset, split, served, plan.cutoffs, self.groups), served, cached

    def _serve(self, pipeline: Pipeline, group: str, split: str, width: int, candidate_recall: bool) -> tuple[Recommendations, bool]:
        """Lists of at least `width` for `group`'s users, reused when an earlier trial served
        the same stages to the same users deep enough."""
        config, ranked = pipeline.config, pipeline.ranker is not None
        # A ranker's lists depend on K; a recall stage's alone do not, unless its K candidates are measured.
        key = cache_key("served", self._fingerprint, config.ranker_key() if ranked else config.recall_key(),
                        config.k if ranked or candidate_recall else None, split, self.groups.spec, group)
        # With a ranker every candidate is ranked once, so any TopN ≤ K is a slice of the same list.
        length = max(config.k, width) if ranked else width
        served = self._served.get(key)
        if served is not None and served.items.shape[1] >= length:
            self._served.move_to_end(key)
            return served, True
        served = pipeline.recommend(self.dataset, self.users(group), split, length=length, candidate_recall=candidate_recall)
        self._served[key] = served
        while len(self._served) > _RANKINGS_KEPT:
            self._served.popitem(last=False)
        return served, False

    @staticmethod
    def _by_scope(result: EvalResult) -> dict[str, dict[str, float]]:
        """`overall` and every group with evaluated users → metric → value."""
        return {"overall": result.overall, **{label: values for label, values in result.groups.items() if values["users"] > 0}}


def _lowest(space: SearchSpace, name: str) -> int:
    return next(int(p.low) for p in space.parameters if p.name == name)


def run_trial(dataset: Dataset, groups: UserGroups, group: str, pipeline: str, params: dict, seed: int = 0,
              objective: str = "ndcg@20", cache: ModelCache | None = None) -> TrialResult:
    """One trial without keeping a runner (see TrialRunner.run for the reuse of models)."""
    spec = TrialSpec(dataset.name, groups.spec, group, pipeline, dict(params), seed, objective)
    return TrialRunner(dataset, groups, cache=cache).run(spec)


def _fit_cost(pipeline: Pipeline) -> float | None:
    """Seconds fitting the pipeline's stages took when they were fitted; None if a stage does not say."""
    seconds = [stage.fit_seconds for stage in (pipeline.recall, pipeline.ranker) if stage is not None]
    return None if None in seconds else sum(seconds)
