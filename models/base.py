"""The two stage contracts every pipeline is built from.

A recall stage is fitted on train interactions and returns, for each user, the K best
items the user has not seen, with scores. A rank stage is fitted after the recall stage
(it learns from the recall stage's candidates) and re-orders a user's K candidates.
"""

from __future__ import annotations

import hashlib

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from rectune.models.dataset import Dataset


@dataclass(frozen=True)
class Candidates:
    """K candidates per user, best first: item indices (-1 = empty slot) and their scores."""

    items: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class FitContext:
    """What a stage may know besides the training data. User groups are not in it: they
    are a way to read the metrics, and a grouping must not change the model it reads."""

    seed: int = 0
    progress: bool = False


class Stage(ABC):
    fit_seconds: float | None = None
    """Wall seconds its fit took (set by models.pipeline); it stays with the fitted stage, so a
    cached one still tells what it cost."""


class RecallModel(Stage):
    @abstractmethod
    def fit(self, dataset: Dataset, context: FitContext) -> None:
        """Learn from `dataset.train` only."""

    @abstractmethod
    def candidates(self, users: np.ndarray, k: int, history: sp.csr_matrix) -> Candidates:
        """Top-k items per user, excluding the items in the user's row of `history`, which is
        also what the model reads as the user's past (train for validation, train + val for test)."""


class Ranker(Stage):
    @abstractmethod
    def fit(self, dataset: Dataset, fit_recall: Callable[[Dataset], RecallModel], context: FitContext) -> None:
        """Learn to order candidate lists, from train interactions only. `fit_recall(subset)`
        returns a recall stage like the pipeline's fitted on `subset` (a dataset whose train is
        part of `dataset.train`), to produce lists to learn from."""

    @abstractmethod
    def rank(self, users: np.ndarray, candidates: Candidates, length: int) -> np.ndarray:
        """Each user's best `length` candidates after re-ordering, as item indices."""


def top_k_unseen(scores, k: int, seen: sp.csr_matrix) -> Candidates:
    """Top-k of a dense (users × items) score block (numpy or torch, overwritten), with each
    row's seen items masked."""
    import torch

    block = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    rows = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
    block[torch.from_numpy(rows), torch.from_numpy(seen.indices.astype(np.int64))] = -np.inf
    k = min(k, block.shape[1])
    values, items = torch.topk(block, k, dim=1, sorted=True)
    items = items.numpy()
    values = values.numpy()
    items[~np.isfinite(values)] = -1
    return Candidates(items.astype(np.int64), values)



_SCORES_PER_BLOCK = 4_000_000
"""Dense scores computed at once (16 MB of float32): bounds memory for any number of users and
catalogue size."""


def rows_per_block(n_items: int) -> int:
    """Users per block of dense (users × items) scores."""
    return max(1, _SCORES_PER_BLOCK // max(n_items, 1))


def top_k_in_blocks(scores: Callable[[np.ndarray], object], users: np.ndarray, k: int, history: sp.csr_matrix,
                    block: int) -> Candidates:
    """Top-k unseen items of every user, `block` users at a time: `scores(users)` gives their
    dense (users × items) scores, so memory stays bounded whatever the number of users."""
    parts = [top_k_unseen(scores(users[start:start + block]), k, history[users[start:start + block]])
             for start in range(0, len(users), block)]
    if not parts:
        return Candidates(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
    return Candidates(np.vstack([p.items for p in parts]), np.vstack([p.scores for p in parts]))


def remembered(memo: dict, key, make, size: int):
    """memo[key], made by `make()` on the first request; only the `size` latest made are kept
    (in-process memos of fits that a study asks for again and again)."""
    if key not in memo:
        memo[key] = make()
        while len(memo) > size:
            memo.pop(next(iter(memo)))
    return memo[key]


def matrix_digest(matrix: sp.csr_matrix) -> str:
    """sha256 of a sparse matrix's shape and canonical CSR content: a key for models fitted on it."""
    canonical = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    canonical.sum_duplicates()
    digest = hashlib.sha256(str(canonical.shape).encode())
    for part in (canonical.indptr, canonical.indices, canonical.data):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()
