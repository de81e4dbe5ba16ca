"""The trial runner: the one place where every tuner's trials are trained and scored.

`TrialRunner.run(spec)` validates the parameters against the search space, fits the
pipeline's stages (or takes them from the `ModelCache`: only the values that affect
training are in the key, so a K or TopN change does not retrain), ranks the users of the
spec's group on the validation split, and returns a `TrialResult`.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.dataset import Dataset
from models.errors import ConfigError
from models.groups import UserGroups
from models.metrics import PER_USER_METRICS, EvalResult
from models.pipeline import ANCHOR_CUTOFF, PipelineConfig, fit_ranker, fit_recall, score_lists
from tools.cache import ModelCache, cache_key, dataset_fingerprint
from tools.space import SearchSpace
from tools.trial import TrialResult, TrialSpec

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


class TrialRunner:
    """Runs trials on one dataset and one user partition, reusing fitted stages and lists."""

    def __init__(self, dataset: Dataset, groups: UserGroups, cache: ModelCache | None = None,
                 space: SearchSpace | None = None, max_latency_ms: float | None = None, progress: bool = False):
        if dataset.item_features is None:
            raise ConfigError(f"dataset {dataset.name!r} has no item features: call models.features.attach_item_features first")
        self.dataset = dataset
        self.groups = groups
        self.cache = cache or ModelCache()
        self.space = space or SearchSpace.load()
        self.max_latency_ms = max_latency_ms
        self.progress = progress
        self._fingerprint = f"{dataset_fingerprint(dataset)}|groups={groups.spec}"
        self._rankings: OrderedDict[str, tuple] = OrderedDict()

    @classmethod
    def open(cls, dataset: str, groups: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             **options) -> "TrialRunner":
        """Load a registered dataset with its features and groups; cache models under
        `cache_dir`/models (default: the rectune cache directory)."""
        from models.config import cache_dir as resolve_cache_dir
        from models.features import attach_item_features
        from models.groups import make_groups
        from models.loaders import load_dataset

        loaded = attach_item_features(load_dataset(dataset, data_dir), cache_dir=cache_dir)
        cache = ModelCache(resolve_cache_dir(cache_dir) / "models")
        return cls(loaded, make_groups(loaded, groups), cache=cache, **options)

    def users(self, group: str) -> np.ndarray:
        return np.arange(self.dataset.n_users) if group == "all" else self.groups.members(group)

    def run(self, spec: TrialSpec, report_test: bool = False) -> TrialResult:
        config, objective, cutoffs = self._resolve(spec)
        users = self.users(spec.group)
        start = time.perf_counter()
        recall, ranker, stages_cached = self._stages(config)
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        metrics, latency, ranking_cached, _ = self._evaluate(config, recall, ranker, users, spec.group, "val", cutoffs)
        test_metrics = self._evaluate(config, recall, ranker, users, spec.group, "test", cutoffs)[0] if report_test else None
        eval_seconds = time.perf_counter() - start

        scope = "overall" if spec.group == "all" else spec.group
        if objective not in metrics[scope]:
            raise ConfigError(f"objective {objective!r} is not among the computed metrics: {sorted(metrics[scope])}")
        cache = "ranking" if ranking_cached else "model" if all(stages_cached) else "recall" if stages_cached[0] else "none"
        return TrialResult(
            spec=spec, objective=float(metrics[scope][objective]), metrics=metrics, latency_ms_per_user=latency,
            train_seconds=train_seconds, eval_seconds=eval_seconds, cache=cache,
            feasible=self.max_latency_ms is None or latency <= self.max_latency_ms, test_metrics=test_metrics, metric=objective,
        )

    def per_user(self, spec: TrialSpec, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """(users, values): spec.objective for each evaluated user of spec.group on `split`,
        for bootstrap intervals and permutation tests."""
        config, objective, cutoffs = self._resolve(spec)
        recall, ranker, _ = self._stages(config)
        result = self._evaluate(config, recall, ranker, self.users(spec.group), spec.group, split, cutoffs)[3]
        if objective not in result.per_user:
            raise ConfigError(f"objective {objective!r} is not a per-user metric; per-user metrics: {sorted(result.per_user)}")
        return result.users, result.per_user[objective]

    def _resolve(self, spec: TrialSpec) -> tuple[PipelineConfig, str, tuple[int, ...]]:
        values = self.space.validate(spec.pipeline, spec.params, base=self.space.defaults(spec.pipeline))
        config = replace(self.space.to_config(spec.pipeline, values), seed=spec.seed)
        objective, cutoff = resolve_objective(spec.objective, config)
        cutoffs = tuple(sorted({ANCHOR_CUTOFF, config.top_n, *(() if cutoff is None else (cutoff,))}))
        return config, objective, cutoffs

    def _stages(self, config: PipelineConfig) -> tuple[object, object, tuple[bool, bool]]:
        """The fitted recall and rank stages (from the cache when it has them)."""
        recall, recall_cached = self.cache.get_or_fit(
            cache_key("recall", self._fingerprint, config.recall_key()),
            lambda: fit_recall(config, self.dataset, self.groups, self.progress))
        ranker, ranker_cached = None, True
        if config.ranker != "none":
            ranker, ranker_cached = self.cache.get_or_fit(
                cache_key("ranker", self._fingerprint, config.ranker_key()),
                lambda: fit_ranker(config, self.dataset, self.groups, self.progress))
        return recall, ranker, (recall_cached, ranker_cached)

    def _evaluate(self, config: PipelineConfig, recall, ranker, users: np.ndarray, group: str, split: str,
                  cutoffs: tuple[int, ...]) -> tuple[dict, float, bool, EvalResult]:
        """Metrics per group on `split`, recommendation latency per user (ms), list reuse, and
        the full evaluation."""
        key = cache_key("ranking", self._fingerprint, config.ranker_key() if ranker else config.recall_key(), config.k, split, group)
        cached = key in self._rankings
        if cached:
            self._rankings.move_to_end(key)
            candidates, ranked, seconds = self._rankings[key]
        else:
            start = time.perf_counter()
            found = recall.candidates(users, config.k, self.dataset.seen(split))
            # Rank every candidate once, so any TopN ≤ K is then a slice of the same list.
            ranked = found.items if ranker is None else ranker.rank(users, found, config.k)
            seconds = time.perf_counter() - start
            candidates = found.items
            self._rankings[key] = (candidates, ranked, seconds)
            while len(self._rankings) > _RANKINGS_KEPT:
                self._rankings.popitem(last=False)
        width = max(cutoffs)
        shown = ranked[:, :width]
        if shown.shape[1] < width:
            shown = np.pad(shown, ((0, 0), (0, width - shown.shape[1])), constant_values=-1)
        result = score_lists(self.dataset, split, users, candidates, shown, cutoffs, self.groups)
        metrics = {"overall": result.overall}
        metrics.update({label: values for label, values in result.groups.items() if values["users"] > 0})
        return metrics, 1000.0 * seconds / max(len(users), 1), cached, result


def run_trial(dataset: Dataset, groups: UserGroups, group: str, pipeline: str, params: dict, seed: int = 0,
              objective: str = "ndcg@20", cache: ModelCache | None = None) -> TrialResult:
    """One trial without keeping a runner (see TrialRunner.run for the reuse of models)."""
    spec = TrialSpec(dataset.name, groups.spec, group, pipeline, dict(params), seed, objective)
    return TrialRunner(dataset, groups, cache=cache).run(spec)
