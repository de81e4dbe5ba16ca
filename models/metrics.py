"""Top-N metrics under full ranking.

Conventions (also in the README): every item is a candidate except those the user has
already interacted with (train; train + validation when reporting on test). Metrics are
computed per user, over users that have at least one held-out item, then averaged over
the users of each group and over all evaluated users.

- Precision@N = hits / N;  Recall@N = hits / |truth|;  F1@N = per-user harmonic mean.
- NDCG@N with binary gains, ideal DCG over min(|truth|, N) hits.
- MRR@N = 1 / rank of the first hit (0 if none);  HitRate@N = 1 if any hit.
- CandidateRecall@K = share of the truth inside the recall stage's K candidates; its
  random floor is K / (|items| − |masked items|), the expectation for K random candidates.
- Coverage@N = distinct recommended items / |items|.
- Novelty@N = mean of −log2(popularity share) of recommended items (train popularity,
  add-one smoothed), higher = less popular items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

PER_USER_METRICS = ("precision", "recall", "f1", "ndcg", "mrr", "hitrate")


def in_rows(matrix: sp.csr_matrix, items: np.ndarray, block: int = 4096) -> np.ndarray:
    """Whether items[r, j] is stored in row r of `matrix` (-1 never is).

    One dense boolean row block per chunk: much faster than a sorted-key search when
    there are many items per row to look up (candidate lists are ~1,000 per user).
    """
    out = np.zeros(items.shape, dtype=bool)
    for start in range(0, items.shape[0], block):
        rows = matrix[start:start + block]
        mask = np.zeros((rows.shape[0], matrix.shape[1] + 1), dtype=bool)
        mask[np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr)), rows.indices] = True
        chunk = items[start:start + block]
        out[start:start + block] = np.take_along_axis(mask, np.where(chunk < 0, matrix.shape[1], chunk), axis=1)
    return out


def hits_matrix(ranked: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """Boolean (users × positions): ranked[u, p] is a held-out item of user u.

    `ranked` rows align with `truth` rows; -1 marks an empty slot (fewer candidates).
    """
    return in_rows(truth.tocsr(), ranked)


def topn_metrics(ranked: np.ndarray, truth: sp.csr_matrix, n: int) -> dict[str, np.ndarray]:
    """Per-user metric arrays at cutoff n (users with empty truth get NaN)."""
    hits = hits_matrix(ranked[:, :n], truth)
    n_truth = np.diff(truth.indptr).astype(np.float64)
    n_hits = hits.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = n_hits / n
        recall = n_hits / n_truth
        f1 = np.where(n_hits > 0, 2 * precision * recall / (precision + recall), 0.0)
        discounts = 1.0 / np.log2(np.arange(2, n + 2))
        dcg = (hits * discounts[: hits.shape[1]]).sum(axis=1)
        ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_truth, n).astype(int)]
        ndcg = dcg / ideal
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.inf)
    metrics = {
        "precision": precision, "recall": recall, "f1": f1, "ndcg": ndcg,
        "mrr": 1.0 / first, "hitrate": (n_hits > 0).astype(np.float64),
    }
    empty = n_truth == 0
    for values in metrics.values():
        values[empty] = np.nan
    return metrics


def candidate_recall(candidates: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    n_truth = np.diff(truth.indptr).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits_matrix(candidates, truth).sum(axis=1) / n_truth


def random_floor(k: int, n_items: int, n_masked: np.ndarray) -> np.ndarray:
    """Expected CandidateRecall@K of K candidates drawn uniformly from the unmasked items."""
    return np.minimum(1.0, k / np.maximum(n_items - n_masked, 1))


def coverage(ranked: np.ndarray, n_items: int) -> float:
    return float(np.unique(ranked[ranked >= 0]).size / n_items)


def novelty(ranked: np.ndarray, item_popularity: np.ndarray, n_users: int) -> float:
    share = (item_popularity + 1.0) / (n_users + 1.0)
    valid = ranked[ranked >= 0]
    return float(np.mean(-np.log2(share[valid]))) if valid.size else 0.0


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one ranking of a set of users, overall and per group.

    overall / groups[label] map names such as `recall@20`, `ndcg@20`, `precision@50`,
    `candidate_recall@1000` to floats; `users` counts the evaluated users.
    """

    overall: dict[str, float]
    groups: dict[str, dict[str, float]]
    per_user: dict[str, np.ndarray]
    users: np.ndarray


def evaluate_ranking(
    users: np.ndarray,
    ranked: np.ndarray,
    truth: sp.csr_matrix,
    cutoffs: tuple[int, ...],
    *,
    item_popularity: np.ndarray,
    n_masked: np.ndarray,
    candidates: np.ndarray | None = None,
    group_codes: np.ndarray | None = None,
    group_labels: tuple[str, ...] = (),
) -> EvalResult:
    """Score ranked lists (rows aligned with `users`) against `truth` (all users' rows).

    cutoffs: every N to report (e.g. 20 for the literature anchors and the pipeline's TopN).
    group_codes: group index per user (all users); metrics are averaged per group too.
    """
    truth_rows = truth[users]
    evaluable = np.diff(truth_rows.indptr) > 0
    per_user: dict[str, np.ndarray] = {}
    for n in cutoffs:
        for name, values in topn_metrics(ranked, truth_rows, n).items():
            per_user[f"{name}@{n}"] = values
    if candidates is not None:
        k = candidates.shape[1]
        per_user[f"candidate_recall@{k}"] = candidate_recall(candidates, truth_rows)
        per_user[f"candidate_recall_floor@{k}"] = random_floor(k, truth.shape[1], n_masked[users]).astype(np.float64)
    per_user = {name: values[evaluable] for name, values in per_user.items()}
    kept_users = users[evaluable]
    kept_ranked = ranked[evaluable]

    def summarise(mask: np.ndarray) -> dict[str, float]:
        summary = {name: float(np.mean(values[mask])) if mask.any() else float("nan") for name, values in per_user.items()}
        for n in cutoffs:
            summary[f"coverage@{n}"] = coverage(kept_ranked[mask, :n], truth.shape[1])
            summary[f"novelty@{n}"] = novelty(kept_ranked[mask, :n], item_popularity, truth.shape[0])
        summary["users"] = float(mask.sum())
        return summary

    overall = summarise(np.ones(len(kept_users), dtype=bool))
    groups = {}
    if group_codes is not None:
        codes = group_codes[kept_users]
        groups = {label: summarise(codes == index) for index, label in enumerate(group_labels)}
    return EvalResult(overall, groups, per_user, kept_users)
