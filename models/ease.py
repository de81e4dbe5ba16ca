"""Closed-form item-item recall: EASE and the popularity baseline.

EASE — Steck, "Embarrassingly Shallow Autoencoders for Sparse Data" (WWW 2019): the item ×
item weights B minimising ‖X − XB‖² + λ‖B‖² with diag(B) = 0 are B = I − P·diag(1/diag P),
P = (XᵀX + λI)⁻¹; a user's scores are their history row times B. One dense items × items
inverse (Cholesky in float32: on Baby its weights are within 1.3e-7 of float64's and every
sampled user gets the same top 20, in half the time), so it is meant for catalogues up to
`MAX_ITEMS` items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from rectune.models.base import Candidates, FitContext, RecallModel, matrix_digest, remembered, rows_per_block, top_k_in_blocks
from rectune.models.dataset import Dataset
from rectune.models.errors import ConfigError

MAX_ITEMS = 40_000
"""Above this the dense inverse needs more than ~15 GB (its peak: 2.3 items × items float32 arrays, measured on Baby)."""
_CACHED = 2  # the pipeline's recall and the one DeepFM fits on a held-out split
_cache: dict[tuple[str, float], np.ndarray] = {}


def ease_weights(train: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's B (items × items, float32, zero diagonal, read-only) fitted on `train`.

    The last `_CACHED` results are kept in memory, keyed by a digest of `train` and λ: a
    tuning study changes the heuristic's other weights far more often than the data or λ,
    and each fit is an items³ inverse (~7 s on Baby's 7,050 items, one BLAS thread)."""
    return remembered(_cache, (matrix_digest(train), float(lam)), lambda: _read_only(_fit_ease(train, lam)), _CACHED)


def _read_only(weights: np.ndarray) -> np.ndarray:
    weights.flags.writeable = False
    return weights


def _fit_ease(train: sp.csr_matrix, lam: float) -> np.ndarray:
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    n = train.shape[1]
    if n > MAX_ITEMS:
        raise ConfigError(f"EASE needs a dense {n} × {n} inverse; it is limited to {MAX_ITEMS} items "
                          "(set cf_weight=0, or heuristic_weight=0 for the two-tower, to do without it)")
    if lam <= 0:
        raise ConfigError(f"ease_lambda must be positive, but got {lam}")
    x = sp.csr_matrix(train, dtype=np.float32)
    gram = (x.T @ x).toarray()
    gram[np.diag_indices(n)] += lam
    # One BLAS thread: beside another busy process (the embedded LLM reading a prompt, another
    # job) a second thread's waits made the inverse 5x slower on 2 cores (Baby: 26.7 s with two,
    # 7.5 s with one; alone 4.7 s and 6.8 s), and one thread makes it the same on every machine.
    with threadpool_limits(1, user_api="blas"):
        # The Gram is symmetric, so its transpose is the Fortran-ordered array LAPACK factors and
        # inverts in place; given the C-ordered one, f2py would copy it first.
        inverse, info = lapack.spotrf(gram.T, lower=False, overwrite_a=True)
        if info == 0:
            inverse, info = lapack.spotri(inverse, lower=False, overwrite_c=True)
    if info != 0:
        raise ConfigError(f"EASE: XᵀX + λI is not positive definite at λ={lam} (LAPACK info {info})")
    del gram  # the same buffer as `inverse`: freed below, before the symmetric copy's temporary
    weights = np.triu(inverse)
    del inverse
    weights += np.triu(weights, 1).T  # spotri fills only the upper triangle
    weights /= -np.diag(weights).copy()[None, :]
    weights[np.diag_indices(n)] = 0.0
    return weights


def popularity(train: sp.csr_matrix) -> np.ndarray:
    """Train interactions per item, float32."""
    return np.asarray(train.sum(axis=0), dtype=np.float32).ravel()


@dataclass
class EaseRecall(RecallModel):
    """EASE as a recall stage: scores = history · B."""

    lam: float
    weights: np.ndarray | None = field(default=None, init=False, repr=False)

    def fit(self, dataset: Dataset, context: FitContext) -> None:
        self.weights = ease_weights(dataset.train, self.lam)

    def candidates(self, users: np.ndarray, k: int, history: sp.csr_matrix) -> Candidates:
        return top_k_in_blocks(lambda block: np.asarray(history[block] @ self.weights), users, k, history,
                               rows_per_block(self.weights.shape[0]))


@dataclass
class PopularityRecall(RecallModel):
    """The most-interacted train items the user has not seen: the floor every model must beat."""

    counts: np.ndarray | None = field(default=None, init=False, repr=False)

    def fit(self, dataset: Dataset, context: FitContext) -> None:
        self.counts = popularity(dataset.train)

    def candidates(self, users: np.ndarray, k: int, history: sp.csr_matrix) -> Candidates:
        return top_k_in_blocks(lambda block: np.tile(self.counts, (len(block), 1)), users, k, history,
                               rows_per_block(len(self.counts)))
