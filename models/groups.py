"""User groups: a partition of the users into labelled groups, from a textual spec.

Specs (`rectune ... --groups SPEC`):
- `all` — one group;
- `prefix[:LETTERS[:MAX]]` — the paper's "regional" groups: the first LETTERS (default 2)
  characters of the raw user id; the MAX−1 most frequent prefixes keep their own group
  and the rest become `other` when there are more than MAX (default 4);
- `activity[:Q]` — quantiles of train interactions per user, cold … heavy (default Q=4);
  users with the same count always share a group, so ties can merge quantiles;
- `age` — MovieLens age bands: children < 18, young 18–34, middle-aged 35–54, elderly ≥ 55;
- `gender`, `occupation`, `attr:COLUMN` — a categorical user attribute;
- `file:PATH` — a csv with columns `user_id,group` (users missing from it form `unassigned`).

For attribute groups, users with no value (rated users without a row in MovieLens'
u.user; the loader counts and warns about them) form an explicit `unknown` group, which
is reported like any other: dropping them would silently shrink the evaluated users, and
refusing would make one missing row block every attribute report.

Labels name MLflow metrics and tags (`val/<label>/ndcg@20`, 250 characters at most), go
into search filters, markdown tables and terminal lines: a label longer than
MAX_LABEL_LENGTH, blank, or holding a quote, `|` or a control character (a newline) is
refused up front, naming it, rather than failing after the first trial.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rectune.models.dataset import Dataset
from rectune.models.errors import DataError, GroupError
from rectune.models.splits import SPLIT_NAMES

ACTIVITY_LABELS = {
    2: ("cold", "heavy"),
    3: ("cold", "medium", "heavy"),
    4: ("cold", "light", "medium", "heavy"),
    5: ("cold", "light", "medium", "active", "heavy"),
}
AGE_BANDS = (("children", 0, 18), ("young", 18, 35), ("middle-aged", 35, 55), ("elderly", 55, 10**9))
UNKNOWN = "unknown"
# MLflow keys hold 250 characters; `test/<label>/candidate_recall_floor_at_1000` and the
# session tags `select/<label>/objective_argmax` need ~40 around the label.
MAX_LABEL_LENGTH = 100
_UNSAFE_LABEL = re.compile(r"['\"|\x00-\x1f\x7f]")
SPLIT_WORDS = {"train": "train", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class UserGroups:
    """A partition of users: `codes[u]` indexes `labels`; `descriptions` explain each label."""

    spec: str
    labels: tuple[str, ...]
    codes: np.ndarray
    descriptions: dict[str, str]

    def members(self, label: str) -> np.ndarray:
        if label not in self.labels:
            raise GroupError(f"unknown group {label!r} in {self.spec!r}; groups are {list(self.labels)}")
        return np.flatnonzero(self.codes == self.labels.index(label))

    def sizes(self) -> dict[str, int]:
        counts = np.bincount(self.codes, minlength=len(self.labels))
        return {label: int(c) for label, c in zip(self.labels, counts)}


def _from_values(spec: str, values: np.ndarray, order: list[str] | None = None, descriptions: dict | None = None) -> UserGroups:
    labels = order or sorted(pd.unique(values).tolist(), key=str)
    for label in labels:
        _check_label(spec, str(label))
    lookup = {label: i for i, label in enumerate(labels)}
    codes = np.array([lookup[v] for v in values], dtype=np.int64)
    groups = UserGroups(spec, tuple(str(l) for l in labels), codes, descriptions or {str(l): str(l) for l in labels})
    empty = [label for label, size in groups.sizes().items() if size == 0]
    if empty:
        raise GroupError(f"group(s) {empty} of {spec!r} have no users; sizes: {groups.sizes()}")
    return groups


def _check_label(spec: str, label: str) -> None:
    shown = repr(label if len(label) <= 60 else label[:60] + "…")
    if not label.strip():
        raise GroupError(f"a group of {spec!r} has a blank label {label!r}; give every group a name")
    if len(label) > MAX_LABEL_LENGTH:
        raise GroupError(f"group label {shown} of {spec!r} is {len(label)} characters long; labels name MLflow metrics "
                         f"and may hold at most {MAX_LABEL_LENGTH}")
    bad = _UNSAFE_LABEL.search(label)
    if bad:
        raise GroupError(f"group label {shown} of {spec!r} holds {bad.group()!r}; labels go into MLflow search filters, "
                         "markdown tables and terminal lines, so quotes, '|' and control characters (newlines) are refused")


def require_held_out(dataset: Dataset, groups: UserGroups, splits: tuple[str, ...] = ("val", "test")) -> None:
    """Refuse a split, or a group, with nothing held out in `splits`: every metric of it would
    be NaN, and a tuner would chase NaN objectives."""
    source = dataset.report.sources[0] if dataset.report.sources else dataset.name
    for split in splits:
        if split not in SPLIT_NAMES:
            raise GroupError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
        matrix = dataset.split(split)
        if matrix.nnz == 0:
            raise DataError(source, f"no {SPLIT_WORDS[split]} rows (split {dataset.report.split!r}): nothing could be scored; "
                                    "give the file held-out rows or load it with another split")
        held_out = np.diff(matrix.indptr) > 0
        for index, label in enumerate(groups.labels):
            members = groups.codes == index
            if not held_out[members].any():
                raise GroupError(f"group {label!r} of {groups.spec!r} has no user with a {SPLIT_WORDS[split]} item "
                                 f"({int(members.sum())} users): its metrics would be NaN; use fewer or other groups")


def _int_option(spec: str, text: str, name: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise GroupError(f"{name} in {spec!r} must be an integer, but got {text!r}") from None
    if value < low:
        raise GroupError(f"{name} in {spec!r} must be ≥ {low}, but got {value}")
    return value


def prefix_groups(dataset: Dataset, letters: int = 2, max_groups: int = 4, spec: str = "prefix") -> UserGroups:
    prefixes = pd.Series(dataset.user_ids.astype(str)).str[:letters].to_numpy()
    counts = pd.Series(prefixes).value_counts()
    if len(counts) <= max_groups:
        return _from_values(spec, prefixes, sorted(counts.index))
    kept = sorted(counts.index[: max_groups - 1])
    values = np.where(np.isin(prefixes, kept), prefixes, "other")
    return _from_values(spec, values, kept + ["other"],
                        {**{p: f"user id starts with {p}" for p in kept}, "other": f"any other {letters}-letter prefix"})


def activity_groups(dataset: Dataset, quantiles: int = 4, spec: str = "activity") -> UserGroups:
    counts = np.diff(dataset.train.indptr)
    values, first_index = np.unique(np.sort(counts), return_index=True)
    # A count's bin is where its block of tied users starts in the sorted order.
    bins = np.minimum((first_index * quantiles) // len(counts), quantiles - 1)
    used = np.unique(bins)
    names = ACTIVITY_LABELS.get(len(used), tuple(f"q{i + 1}" for i in range(len(used))))
    bin_to_label = dict(zip(used, names))
    descriptions = {}
    for b in used:
        in_bin = values[bins == b]
        low, high = int(in_bin.min()), int(in_bin.max())
        descriptions[bin_to_label[b]] = f"{low}–{high} train interactions" if low != high else f"{low} train interactions"
    per_user = np.array([bin_to_label[b] for b in bins[np.searchsorted(values, counts)]])
    return _from_values(spec, per_user, list(names), descriptions)


def _attribute_column(dataset: Dataset, column: str, spec: str) -> pd.Series:
    if dataset.user_attributes is None or column not in dataset.user_attributes:
        available = [] if dataset.user_attributes is None else list(dataset.user_attributes.columns)
        raise GroupError(f"{spec!r} needs the user attribute {column!r}, but dataset {dataset.name!r} has {available or 'no user attributes'}")
    return dataset.user_attributes[column]


def _attribute(dataset: Dataset, column: str, spec: str) -> np.ndarray:
    values = _attribute_column(dataset, column, spec)
    return values.astype(object).fillna(UNKNOWN).astype(str).to_numpy() if values.dtype == object or values.isna().any() else values.to_numpy()


def _plain(value):
    """A numpy scalar as the Python value it holds: its repr is `np.int64(2)`, not `2`."""
    return value.item() if isinstance(value, np.generic) else value


def age_groups(dataset: Dataset, spec: str = "age") -> UserGroups:
    """The four AGE_BANDS, plus `unknown` for users with no age when there are any."""
    raw = _attribute_column(dataset, "age", spec)
    ages = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    known = raw.notna().to_numpy()
    invalid = known & ~(ages >= 0)
    if invalid.any():
        first = int(np.flatnonzero(invalid)[0])
        where = dataset.report.attributes_source
        raise GroupError(f"{spec!r} needs non-negative numeric ages, but {int(invalid.sum())} user(s) have other values, "
                         f"e.g. user {_plain(dataset.user_ids[first])!r} has age {_plain(raw.iloc[first])!r}"
                         + (f" (in {where})" if where else ""))
    labels = np.full(len(ages), UNKNOWN, dtype=object)
    for name, low, high in AGE_BANDS:
        labels[(ages >= low) & (ages < high)] = name
    order = [b[0] for b in AGE_BANDS] + ([UNKNOWN] if (~known).any() else [])
    descriptions = {name: f"age {low}–{high - 1}" if high < 10**9 else f"age ≥ {low}" for name, low, high in AGE_BANDS}
    return _from_values(spec, labels, order, {**descriptions, UNKNOWN: "no age on record (no row in the user attributes file)"})


def file_groups(dataset: Dataset, path: Path, spec: str) -> UserGroups:
    if not path.is_file():
        raise DataError(path, "group file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"cannot be read as csv: {exc}") from exc
    missing = [c for c in ("user_id", "group") if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(frame.columns)}")
    mapping = dict(zip(frame["user_id"], frame["group"]))
    values = np.array([mapping.get(str(u), "unassigned") for u in dataset.user_ids], dtype=object)
    if (values == "unassigned").all():
        raise DataError(path, f"no user id in it matches dataset {dataset.name!r} (e.g. {dataset.user_ids[0]!r})")
    return _from_values(spec, values)


def make_groups(dataset: Dataset, spec: str) -> UserGroups:
    """Parse a group spec (see the module docstring) and partition the dataset's users."""
    kind, _, options = spec.partition(":")
    parts = options.split(":") if options else []
    if kind == "all":
        return _from_values(spec, np.full(dataset.n_users, "all", dtype=object), ["all"], {"all": "every user"})
    if kind == "prefix":
        letters = _int_option(spec, parts[0], "LETTERS", 1) if parts else 2
        max_groups = _int_option(spec, parts[1], "MAX", 2) if len(parts) > 1 else 4
        return prefix_groups(dataset, letters, max_groups, spec)
    if kind == "activity":
        return activity_groups(dataset, _int_option(spec, parts[0], "Q", 2) if parts else 4, spec)
    if kind == "age":
        return age_groups(dataset, spec)
    if kind in ("gender", "occupation"):
        return _from_values(spec, _attribute(dataset, kind, spec))
    if kind == "attr" and options:
        return _from_values(spec, _attribute(dataset, options, spec))
    if kind == "file" and options:
        return file_groups(dataset, Path(options), spec)
    raise GroupError(
        f"unknown group spec {spec!r}; expected all, prefix[:LETTERS[:MAX]], activity[:Q], age, gender, "
        "occupation, attr:COLUMN or file:PATH"
    )
