"""The four candidate pipelines (recall × rank) behind one config and one interface.

`PipelineConfig` is the single typed description of a pipeline: which recall and rank
stages, and every hyper-parameter with its default, its meaning and the stage whose
training it affects. Unknown keys and wrong types raise. `Pipeline` fits the stages on
train interactions and recommends / evaluates on the validation or test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from rectune.models.base import FitContext, Ranker, RecallModel
from rectune.models.dataset import Dataset
from rectune.models.errors import ConfigError
from rectune.models.groups import UserGroups
from rectune.models.metrics import EvalResult, evaluate_ranking

RECALLS = ("heuristic", "two_tower")
RANKERS = ("none", "deepfm")
PIPELINES = {
    "heuristic": ("heuristic", "none"),
    "heuristic+deepfm": ("heuristic", "deepfm"),
    "two_tower": ("two_tower", "none"),
    "two_tower+deepfm": ("two_tower", "deepfm"),
}
# Every metric is also reported at this cutoff, the one of the literature's anchors.
ANCHOR_CUTOFF = 20


def _param(default, stage: str, help: str, used_by: tuple[str, ...] = ()):
    """stage: what the value changes — `recall` / `ranker` training, or only `serving`."""
    return field(default=default, metadata={"stage": stage, "help": help, "used_by": used_by})


@dataclass(frozen=True)
class PipelineConfig:
    recall: str = _param("two_tower", "recall", "recall stage: heuristic | two_tower")
    ranker: str = _param("none", "ranker", "rank stage: none | deepfm")
    seed: int = _param(0, "recall", "seed of every random choice (splits are seeded separately)")
    embedding_dim: int = _param(64, "recall", "recall embedding size: tower output (two-tower); PCA size of the fallback features of a dataset without item content (heuristic)")
    k: int = _param(500, "serving", "recall size K: candidates per user passed to the ranker")
    top_n: int = _param(20, "serving", "TopN: length of the final list")
    neighbors: int = _param(50, "recall", "kNN neighbours kept per item in the content graphs (a neighbour file "
                            "caps it at what it lists: 10 on Baby)", ("heuristic", "two_tower"))
    cf_weight: float = _param(0.85, "recall", "weight of EASE item-CF similarity vs content similarity (defaults of the "
                              "heuristic chosen on Baby validation NDCG@20, 2026-12-01)", ("heuristic", "two_tower"))
    popularity_weight: float = _param(0.005, "recall", "weight of the popularity prior added to heuristic scores", ("heuristic", "two_tower"))
    text_weight: float = _param(0.9, "recall", "fusion weight of the text graph vs the image graph (image: 1 - text_weight)", ("heuristic", "two_tower"))
    ease_lambda: float = _param(250.0, "recall", "ridge strength of the EASE item-CF part", ("heuristic", "two_tower"))
    lr: float = _param(0.003, "recall", "two-tower Adam learning rate", ("two_tower",))
    epochs: int = _param(3, "recall", "two-tower training epochs", ("two_tower",))
    batch_size: int = _param(1024, "recall", "two-tower batch size (= in-batch negatives + 1)", ("two_tower",))
    temperature: float = _param(0.1, "recall", "softmax temperature of the two-tower logits", ("two_tower",))
    weight_decay: float = _param(0.0, "recall", "two-tower Adam weight decay", ("two_tower",))
    user_id: bool = _param(False, "recall", "add a user-id embedding to the user tower (on Baby it overfits: "
                           "validation Recall@20 .071 with it, .077 without, 2 epochs)", ("two_tower",))
    content_layers: int = _param(2, "recall", "hops of the item content graph over which the two-tower's item tables are "
                                 "smoothed, FREEDOM-style (0 = none)", ("two_tower",))
    heuristic_weight: float = _param(0.2, "recall", "weight of the heuristic recall's scores added to the two-tower's, both "
                                     "standardised per user (0 = the two-tower alone; chosen on Baby validation, 2026-12-02)",
                                     ("two_tower",))
    ranker_dim: int = _param(16, "ranker", "DeepFM field embedding size", ("deepfm",))
    hidden: tuple[int, ...] = _param((128, 64), "ranker", "DeepFM MLP hidden sizes", ("deepfm",))
    dropout: float = _param(0.1, "ranker", "DeepFM MLP dropout", ("deepfm",))
    ranker_lr: float = _param(0.003, "ranker", "DeepFM Adam learning rate", ("deepfm",))
    ranker_epochs: int = _param(4, "ranker", "DeepFM training epochs", ("deepfm",))
    ranker_batch_size: int = _param(256, "ranker", "DeepFM batch size, in candidate lists", ("deepfm",))
    negatives: int = _param(32, "ranker", "DeepFM candidates drawn from the user's list to rank each held-out item "
                            "against (sampled softmax)", ("deepfm",))
    negative_pool: int = _param(500, "ranker", "DeepFM learns from lists of this many top recall candidates per user",
                                ("deepfm",))

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type)
            if f.name == "hidden":
                if not (isinstance(value, tuple) and value and all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in value)):
                    raise ConfigError(f"hidden must be a non-empty list of positive integers, but got {value!r}")
            elif expected is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{f.name} must be a number, but got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{f.name} must be an integer, but got {value!r}")
            elif expected is bool and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, but got {value!r}")
            elif expected is str and not isinstance(value, str):
                raise ConfigError(f"{f.name} must be a string, but got {value!r}")
        if self.recall not in RECALLS:
            raise ConfigError(f"recall must be one of {RECALLS}, but got {self.recall!r}")
        if self.ranker not in RANKERS:
            raise ConfigError(f"ranker must be one of {RANKERS}, but got {self.ranker!r}")
        for name in ("embedding_dim", "k", "top_n", "neighbors", "epochs", "batch_size", "ranker_dim",
                     "ranker_epochs", "ranker_batch_size", "negatives", "negative_pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, but got {getattr(self, name)}")
        if self.k < self.top_n:
            raise ConfigError(f"k (candidates) must be ≥ top_n, but got k={self.k} < top_n={self.top_n}")
        for name in ("cf_weight", "text_weight", "dropout"):
            closed = name != "dropout"
            if not 0.0 <= getattr(self, name) < (1.0001 if closed else 1.0):
                raise ConfigError(f"{name} must be in [0, 1{']' if closed else ')'}, but got {getattr(self, name)}")
        for name in ("lr", "ranker_lr", "temperature", "ease_lambda"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, but got {getattr(self, name)}")
        for name in ("content_layers", "heuristic_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, but got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict) -> "PipelineConfig":
        """Build from plain values (a pipeline name under `pipeline` is expanded)."""
        values = dict(values)
        if "pipeline" in values:
            name = values.pop("pipeline")
            if name not in PIPELINES:
                raise ConfigError(f"pipeline must be one of {list(PIPELINES)}, but got {name!r}")
            values["recall"], values["ranker"] = PIPELINES[name]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
        if isinstance(values.get("hidden"), (list, str)):
            hidden = values["hidden"]
            try:
                values["hidden"] = tuple(int(h) for h in (hidden.split(",") if isinstance(hidden, str) else hidden))
            except ValueError:
                raise ConfigError(f"hidden must be integers like 128,64, but got {hidden!r}") from None
        return cls(**values)

    @property
    def name(self) -> str:
        return self.recall if self.ranker == "none" else f"{self.recall}+{self.ranker}"

    def _stage_values(self, stage: str, model: str) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["stage"] == stage and (not f.metadata["used_by"] or model in f.metadata["used_by"])}

    def recall_key(self) -> dict:
        """The values that determine the trained recall stage (a cache key)."""
        return self._stage_values("recall", self.recall)

    def ranker_key(self) -> dict:
        """The values that determine the trained rank stage, its recall stage's included."""
        return {**self.recall_key(), **self._stage_values("ranker", self.ranker)}

    def to_dict(self) -> dict:
        return asdict(self)


def inert_by_recall(dataset: Dataset, fewest_neighbors: int) -> dict[str, dict[str, str]]:
    """Recall model → parameter → why `dataset` makes it change nothing. The two-tower's
    heuristic part and content smoothing read the heuristic's parameters, so the same ones are
    inert for it — except embedding_dim, which sizes its towers."""
    from rectune.models.heuristic import inert_parameters

    inert = inert_parameters(dataset, fewest_neighbors)
    return {"heuristic": inert, "two_tower": {name: why for name, why in inert.items() if name != "embedding_dim"}}


def build_recall(config: PipelineConfig) -> RecallModel:
    from rectune.models.heuristic import HeuristicRecall

    heuristic = HeuristicRecall(config.embedding_dim, config.neighbors, config.cf_weight, config.popularity_weight,
                                config.text_weight, config.ease_lambda)
    if config.recall == "heuristic":
        return heuristic
    from rectune.models.two_tower import TwoTowerRecall

    return TwoTowerRecall(config.embedding_dim, config.lr, config.epochs, config.batch_size, config.temperature, config.weight_decay,
                          config.user_id, config.content_layers, config.neighbors, config.text_weight,
                          heuristic if config.heuristic_weight > 0 else None, config.heuristic_weight)


def build_ranker(config: PipelineConfig) -> Ranker | None:
    if config.ranker == "none":
        return None
    from rectune.models.deepfm import DeepFMRanker

    return DeepFMRanker(config.ranker_dim, config.hidden, config.dropout, config.ranker_lr, config.ranker_epochs,
                        config.ranker_batch_size, config.negatives, config.negative_pool)


def fit_recall(config: PipelineConfig, dataset: Dataset, progress: bool = False) -> RecallModel:
    if dataset.item_features is None:
        raise ConfigError(f"dataset {dataset.name!r} has no item features: call models.features.attach_item_features first")
    recall = build_recall(config)
    start = time.perf_counter()
    recall.fit(dataset, FitContext(seed=config.seed, progress=progress))
    recall.fit_seconds = time.perf_counter() - start
    return recall


def fit_ranker(config: PipelineConfig, dataset: Dataset, progress: bool = False,
               held_out_recall: Callable[[Dataset], RecallModel] | None = None) -> Ranker | None:
    """The rank stage, trained on lists from a recall stage fitted on part of train:
    `held_out_recall(subset)` fits it (the runner caches it: the subset depends only on the
    dataset and the seed, so trials that change only ranker parameters share it)."""
    ranker = build_ranker(config)
    if ranker is not None:
        fit_held_out = held_out_recall or (lambda subset: fit_recall(config, subset, progress))
        waited, cost = [], []

        def held_out(subset: Dataset) -> RecallModel:
            start = time.perf_counter()
            recall = fit_held_out(subset)
            waited.append(time.perf_counter() - start)
            cost.append(recall.fit_seconds or 0.0)
            return recall

        start = time.perf_counter()
        ranker.fit(dataset, held_out, FitContext(seed=config.seed, progress=progress))
        # What fitting the ranker costs, its held-out recall stage included also when that came from the cache:
        # a trial's fit seconds must not depend on what an earlier trial left behind.
        ranker.fit_seconds = time.perf_counter() - start - sum(waited) + sum(cost)
    return ranker


@dataclass(frozen=True)
class Recommendations:
    """What a pipeline served to `users` on one split."""

    users: np.ndarray
    items: np.ndarray
    """The final lists, best first, one row per user (-1 = empty slot)."""
    candidates: np.ndarray | None
    """The recall stage's K candidates per user, when they were computed: always with a
    ranker (it re-orders them); without one only on request, for candidate recall — the
    final list is then the recall stage's own top-N, and a K-deep search would be wasted."""
    seconds: dict[str, float]
    """candidates / rank wall seconds."""


def _padded(items: np.ndarray, length: int) -> np.ndarray:
    """The first `length` columns, padded with empty slots where the list is shorter."""
    items = items[:, :length]
    return np.pad(items, ((0, 0), (0, length - items.shape[1])), constant_values=-1)


def score_lists(dataset: Dataset, split: str, served: Recommendations, cutoffs: tuple[int, ...],
                groups: UserGroups | None = None) -> EvalResult:
    """Full-ranking metrics of served lists on `split` (candidate recall too, when served
    with candidates), overall and per group of `groups`."""
    if split not in ("val", "test"):
        raise ConfigError(f"evaluate on 'val' or 'test', not {split!r}")
    seen = dataset.seen(split)
    return evaluate_ranking(
        served.users, _padded(served.items, max(cutoffs)), dataset.split(split), tuple(sorted(set(cutoffs))),
        item_popularity=np.asarray(dataset.train.sum(axis=0)).ravel(), n_masked=np.diff(seen.indptr),
        candidates=served.candidates, group_codes=None if groups is None else groups.codes,
        group_labels=() if groups is None else groups.labels,
    )


@dataclass(frozen=True)
class Evaluation:
    metrics: EvalResult
    seconds: dict[str, float]
    """candidates / rank / metrics wall seconds."""


class Pipeline:
    """A recall stage and an optional rank stage, fitted together on train interactions.

    The one serving path: `rectune evaluate`, the benchmarks and every tuning trial (the
    trial runner caches fitted stages and served lists, and times them) go through
    `recommend` and `score_lists`."""

    def __init__(self, config: PipelineConfig, recall: RecallModel | None = None, ranker: Ranker | None = None):
        self.config = config
        self.recall = recall
        self.ranker = ranker

    @property
    def fit_seconds(self) -> dict[str, float]:
        """What fitting each stage took when it was fitted, cached or not."""
        return {name: stage.fit_seconds for name, stage in (("recall", self.recall), ("ranker", self.ranker))
                if stage is not None and stage.fit_seconds is not None}

    def fit(self, dataset: Dataset, *, progress: bool = False) -> "Pipeline":
        if self.recall is None:
            self.recall = fit_recall(self.config, dataset, progress)
        if self.ranker is None and self.config.ranker != "none":
            self.ranker = fit_ranker(self.config, dataset, progress)
        return self

    def recommend(self, dataset: Dataset, users: np.ndarray, split: str, length: int | None = None, k: int | None = None,
                  candidate_recall: bool = False) -> Recommendations:
        """The final lists (`length` long, default TopN) for `users`, past items of `split`
        masked; `candidate_recall` also keeps the K candidates where the ranker does not."""
        k = k or self.config.k
        length = length or self.config.top_n
        seen = dataset.seen(split)
        start = time.perf_counter()
        if self.ranker is None:
            found = self.recall.candidates(users, max(k, length) if candidate_recall else length, seen)
            seconds = {"candidates": time.perf_counter() - start, "rank": 0.0}
            return Recommendations(users, _padded(found.items, length), found.items[:, :k] if candidate_recall else None, seconds)
        found = self.recall.candidates(users, k, seen)
        seconds = {"candidates": time.perf_counter() - start}
        start = time.perf_counter()
        ranked = self.ranker.rank(users, found, length)
        seconds["rank"] = time.perf_counter() - start
        return Recommendations(users, _padded(ranked, length), found.items, seconds)

    def evaluate(self, dataset: Dataset, split: str, groups: UserGroups | None = None, users: np.ndarray | None = None,
                 cutoffs: tuple[int, ...] = (), candidate_recall: bool = True) -> Evaluation:
        """Full-ranking metrics on `split` (val for tuning, test for reporting), at @20,
        @top_n and any extra `cutoffs`, per group of `groups` too."""
        users = np.arange(dataset.n_users) if users is None else np.asarray(users)
        cutoffs = (ANCHOR_CUTOFF, self.config.top_n, *cutoffs)
        served = self.recommend(dataset, users, split, length=max(cutoffs), candidate_recall=candidate_recall)
        start = time.perf_counter()
        metrics = score_lists(dataset, split, served, cutoffs, groups)
        return Evaluation(metrics, {**served.seconds, "metrics": time.perf_counter() - start})
