"""Heuristic multimodal recall — the reference paper's heuristic algorithm, made explicit.

Paper ("Research on Optimization of Recommendation Model Based on Value Evaluation"):
item features (image + text vectors) are fused into an item similarity matrix, multiplied
by the user × item rating matrix, and the result is filtered with item-based
collaborative filtering.

Here, per modality, the item-item kNN graph of `dataset.content` (neighbour lists or
feature kNN, `models.content`) keeps each item's `neighbors` nearest items, is made
symmetric (cosine-weighted) and normalised as D^-1/2 A D^-1/2 — the frozen item-item
graphs of FREEDOM (Zhou & Shen, "A Tale of Two Graphs", MM 2023), which mixes text and
image as 0.9/0.1. The modalities are fused with `text_weight` (image: 1 − text_weight). The item-CF
part is EASE (Steck 2019, `models.ease`, ridge `ease_lambda`), rescaled so that its mean
row L1 norm is 1 like the normalised content graph's. The user's scores are the history
multiplied by `cf_weight·B_cf + (1 − cf_weight)·S_content`: CF filters the content
neighbours, and content reaches items CF has too few co-occurrences for. A popularity
prior, `popularity_weight × count / max count`, is added to every score.

Measured on Baby (validation Recall@20 / NDCG@20, history = train): EASE alone .0818 /
.0397, EASE + the fused content graphs .0937 / .0452 (bench/core.py has the test split).

Datasets without item content fall back to a kNN graph over their collaborative SVD
factors, reduced by PCA to `embedding_dim` — not the paper's method, and the fitted
model says so in `content_note`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from rectune.models.base import Candidates, FitContext, RecallModel, rows_per_block, top_k_in_blocks
from rectune.models.content import fused_graph, knn_from_features
from rectune.models.dataset import Dataset
from rectune.models.ease import ease_weights, popularity
from rectune.models.errors import ConfigError

FALLBACK_MODALITY = "collaborative"


def reduce_features(features: np.ndarray, dim: int) -> np.ndarray:
    """PCA to `dim` components (deterministic: a full SVD of the centred matrix), L2-normalised."""
    centred = features - features.mean(axis=0, keepdims=True)
    if dim < min(centred.shape):
        u, s, _ = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        centred = u[:, :dim] * s[:dim]
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return (centred / np.maximum(norms, 1e-12)).astype(np.float32)


def inert_parameters(dataset: Dataset, fewest_neighbors: int) -> dict[str, str]:
    """The heuristic's parameters that change nothing on `dataset`, each with why; a tuner that
    moves one spends a trial on a repeat. `fewest_neighbors`: the lowest value tuners may give
    `neighbors`."""
    graphs = dataset.content.graphs if dataset.content is not None else {}
    if not graphs:
        return {}
    inert = {"embedding_dim": "the heuristic reads the item content graphs; embedding_dim only sizes the SVD "
                              "fallback of datasets without content"}
    listed = max(int(np.diff(graph.indptr).max(initial=0)) for graph in graphs.values())
    if listed <= fewest_neighbors:
        inert["neighbors"] = (f"the content graphs list at most {listed} neighbours per item, and neighbors keeps at "
                              f"least {fewest_neighbors}")
    if len(graphs) == 1:
        inert["text_weight"] = f"one content modality ({next(iter(graphs))}): nothing to fuse"
    return inert


@dataclass
class HeuristicRecall(RecallModel):
    """Fused content graphs blended with EASE item-CF, applied to the history, plus popularity."""

    embedding_dim: int
    neighbors: int
    cf_weight: float
    popularity_weight: float
    text_weight: float = 0.9
    ease_lambda: float = 250.0
    similarity: np.ndarray | None = field(default=None, init=False, repr=False)
    prior: np.ndarray | None = field(default=None, init=False, repr=False)
    content_note: str = field(default="", init=False)

    def __post_init__(self):
        for name in ("cf_weight", "text_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], but got {getattr(self, name)}")

    def content_graphs(self, dataset: Dataset) -> dict[str, sp.csr_matrix]:
        """The graphs to fuse: the dataset's content, or the collaborative fallback."""
        if dataset.content is not None and dataset.content.graphs:
            self.content_note = "content: " + ", ".join(sorted(dataset.content.graphs))
            return dict(dataset.content.graphs)
        if dataset.item_features is None:
            raise ConfigError(f"heuristic recall needs item content or item features on dataset {dataset.name!r}: "
                              "call models.features.attach_item_features first")
        features = dataset.item_features.matrix
        if dataset.item_features.wider is not None and self.embedding_dim > features.shape[1]:
            # PCA cannot widen: without this, every embedding_dim above the feature width
            # would be the same model (on Baby's 64 SVD factors, 64–512 all were).
            features = dataset.item_features.wider(self.embedding_dim)
        self.content_note = (f"no item content on {dataset.name!r}: the content part is a kNN graph of "
                             f"{dataset.item_features.source} features (not the paper's method)")
        return {FALLBACK_MODALITY: knn_from_features(reduce_features(features, self.embedding_dim), self.neighbors)}

    def fit(self, dataset: Dataset, context: FitContext) -> None:
        content = fused_graph(self.content_graphs(dataset), self.neighbors, self.text_weight)
        similarity = np.asarray(content.toarray(), dtype=np.float32) * (1.0 - self.cf_weight)
        if self.cf_weight > 0:
            cf = ease_weights(dataset.train, self.ease_lambda)
            row_mass = np.abs(cf).sum(axis=1)
            scale = row_mass[row_mass > 0].mean() if (row_mass > 0).any() else 1.0
            similarity += cf * np.float32(self.cf_weight / scale)
        self.similarity = similarity
        counts = popularity(dataset.train)
        self.prior = (self.popularity_weight * counts / max(counts.max(), 1.0)).astype(np.float32)

    def scores(self, history: sp.csr_matrix) -> np.ndarray:
        """Dense scores (rows of `history` × items), seen items included."""
        return np.asarray(history @ self.similarity) + self.prior

    def candidates(self, users: np.ndarray, k: int, history: sp.csr_matrix) -> Candidates:
        return top_k_in_blocks(lambda block: self.scores(history[block]), users, k, history, rows_per_block(len(self.prior)))
