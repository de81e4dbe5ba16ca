"""Is a difference between two configurations more than noise? Paired over the same users.

Two trials of one study score the same users (a group's users with held-out items, in
index order), so their difference is measured user by user: whatever makes one user easy
or hard for every configuration cancels, and the interval is much narrower than that of two
independent means. `paired_interval` is a percentile bootstrap over those users;
`per_user_vector` stores a trial's per-user objective compactly (most users score 0) so
that any later trial can be paired with it. numpy is imported where it is used: the ledger
and MLflow code that reads intervals is on the path of light commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rectune.models.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

DIGITS = 6
"""Per-user values are stored rounded to this many decimals: far below any difference that matters."""
_CHUNK_CELLS = 2_000_000
"""Resampled indices drawn at once (16 MB of int64): all 2000 × 19,445 of Baby's users at once would take 300 MB."""


def per_user_vector(values: np.ndarray) -> dict:
    """A JSON-safe encoding of one per-user objective array: its length, the positions of the
    users whose value is not 0, and their values rounded to DIGITS decimals."""
    import numpy as np

    values = np.round(np.asarray(values, dtype=np.float64), DIGITS)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ConfigError("a per-user vector is one finite value per evaluated user (users without held-out items are dropped)")
    nonzero = np.flatnonzero(values)
    return {"n": len(values), "nonzero": nonzero.tolist(), "values": values[nonzero].tolist()}


def vector(encoded: dict) -> np.ndarray:
    """The per-user array `per_user_vector` encoded."""
    import numpy as np

    values = np.zeros(encoded["n"])
    values[np.asarray(encoded["nonzero"], dtype=np.int64)] = encoded["values"]
    return values


@dataclass(frozen=True)
class Interval:
    """A paired difference (first − second) and its bootstrap interval."""

    diff: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        """The interval holds 0: the data do not say which of the two is better."""
        return self.low <= 0 <= self.high

    def to_json(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high}

    @classmethod
    def from_json(cls, values: dict) -> "Interval":
        # Other keys may travel with it (a trial's vs_best names the trial it was compared to).
        return cls(values["diff"], values["low"], values["high"])

    def text(self) -> str:
        """`+.0012 [-.0008, +.0031]`."""
        return f"{_signed(self.diff)} [{_signed(self.low)}, {_signed(self.high)}]"


def _signed(value: float) -> str:
    # + 0.0 turns a -0.0 from rounding into 0.0: "+.0000", never "-.0000".
    text = f"{round(value, 4) + 0.0:+.4f}"
    return text[0] + text[2:] if text[1:3] == "0." else text


def paired_interval(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 2000, level: float = .95) -> Interval:
    """mean(a − b) over users and its percentile bootstrap interval (users resampled with
    replacement, `resamples` times); a and b hold the same users in the same order."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"a paired difference needs the same users on both sides, but got {a.size} and {b.size} users")
    if len(a) == 0:
        raise ConfigError("a paired difference needs at least one user with held-out items")
    differences = a - b
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // len(differences))
    means = np.concatenate([differences[rng.integers(0, len(differences), size=(min(rows, resamples - start), len(differences)))]
                            .mean(axis=1) for start in range(0, resamples, rows)])
    low, high = np.quantile(means, ((1 - level) / 2, (1 + level) / 2))
    return Interval(float(differences.mean()), float(low), float(high))
