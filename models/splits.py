"""Split strategies: the given split column, per-user random 8:1:1, per-user leave-last-out.

Every strategy maps an interaction frame (one row per unique user–item pair, columns
`user`, `item`, optional `timestamp` and `split`) to an int8 label per row:
0 = train, 1 = validation, 2 = test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rectune.models.errors import ConfigError, DataError

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
# Labels seen in the wild for the same three roles (MMRec's x_label uses 0/1/2).
_LABEL_ALIASES = {
    "train": TRAIN, "0": TRAIN,
    "val": VAL, "valid": VAL, "validation": VAL, "1": VAL,
    "test": TEST, "2": TEST,
}


@dataclass(frozen=True)
class SplitStrategy:
    """How interactions are divided into train / validation / test.

    kind: `given` (use the file's split column), `random` (per user, seeded) or
    `leave-last-out` (per user by timestamp: last → test, second last → validation).
    ratios: train/val/test shares for `random`; each user with ≥ 3 interactions keeps at
    least one validation and one test interaction so that every user is evaluable.
    seed: makes `random` reproducible.
    """

    kind: str = "random"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42

    def __post_init__(self):
        if self.kind not in ("given", "random", "leave-last-out"):
            raise ConfigError(
                f"split must be one of given, random, leave-last-out, but got {self.kind!r}"
            )
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise ConfigError(f"split ratios must be three non-negative shares summing to 1, but got {self.ratios}")

    @classmethod
    def parse(cls, text: str, seed: int = 42) -> "SplitStrategy":
        """Read `given`, `random`, `random:0.8,0.1,0.1` or `leave-last-out`."""
        kind, _, rest = text.partition(":")
        if kind == "random" and rest:
            try:
                ratios = tuple(float(x) for x in rest.split(","))
            except ValueError as exc:
                raise ConfigError(f"split ratios must be numbers, but got {rest!r}") from exc
            return cls("random", ratios, seed)  # type: ignore[arg-type]
        if rest:
            raise ConfigError(f"split {kind!r} takes no options, but got {text!r}")
        return cls(kind, seed=seed)

    def describe(self) -> str:
        if self.kind == "random":
            return f"random per-user {':'.join(f'{r:g}' for r in self.ratios)} seed={self.seed}"
        return self.kind

    def assign(self, frame: pd.DataFrame, source: str | Path) -> np.ndarray:
        if self.kind == "given":
            return _given(frame, source)
        if self.kind == "leave-last-out":
            if "timestamp" not in frame:
                raise DataError(source, "leave-last-out needs a timestamp column, and there is none")
            order = np.lexsort((np.arange(len(frame)), frame["timestamp"].to_numpy(), frame["user"].to_numpy()))
            return _by_rank_from_end(frame["user"].to_numpy(), order, lambda n: (n >= 3).astype(int), lambda n: (n >= 3).astype(int))
        rng = np.random.default_rng(self.seed)
        order = np.lexsort((rng.random(len(frame)), frame["user"].to_numpy()))
        _, val_share, test_share = self.ratios

        def count(share):
            # The epsilon absorbs float error: 180 * 0.35 is 62.99999999999999, not 63.
            return lambda n: np.where(n >= 3, np.maximum(1, np.floor(n * share + 1e-9)), 0).astype(int) if share > 0 else np.zeros_like(n)

        return _by_rank_from_end(frame["user"].to_numpy(), order, count(val_share), count(test_share))


def _given(frame: pd.DataFrame, source: str | Path) -> np.ndarray:
    if "split" not in frame:
        raise DataError(source, "split 'given' needs a split column, and there is none")
    raw = frame["split"].astype(str).str.strip().str.lower()
    labels = raw.map(_LABEL_ALIASES)
    unknown = raw[labels.isna()]
    if len(unknown):
        counts = unknown.value_counts().head(5).to_dict()
        raise DataError(
            source,
            f"unknown split label(s) {counts} (value: rows); expected train/val/test or 0/1/2",
        )
    return labels.to_numpy(dtype=np.int8)


def _by_rank_from_end(users: np.ndarray, order: np.ndarray, n_val, n_test) -> np.ndarray:
    """Label rows by their position within their user's ordered list, counting from the end."""
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    from_end = np.repeat(sizes, sizes) - 1 - rank
    tests = np.repeat(n_test(sizes), sizes)
    vals = np.repeat(n_val(sizes), sizes)
    sorted_labels = np.where(from_end < tests, TEST, np.where(from_end < tests + vals, VAL, TRAIN))
    labels = np.empty(len(order), dtype=np.int8)
    labels[order] = sorted_labels
    return labels
