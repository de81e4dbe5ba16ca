"""One in-memory dataset type for every source.

Users and items are re-indexed 0..n-1 (sorted raw ids, so the same file always gives the
same indices); train / validation / test interactions are binary user × item CSR
matrices. Item text, categories and user attributes travel with it when the source has
them; item feature vectors are attached by `models.features`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from rectune.models.errors import DataError, RectuneWarning
from rectune.models.splits import SPLIT_NAMES, TEST, TRAIN, VAL, SplitStrategy


@dataclass(frozen=True)
class ItemFeatures:
    """Dense item vectors (rows aligned with item indices) and where they came from."""

    matrix: np.ndarray
    source: str
    wider: Callable[[int], np.ndarray] | None = field(default=None, compare=False, repr=False)
    """dim → the same kind of features with more columns, where the source can make them
    (collaborative SVD factors: more singular vectors); None for fixed-width features."""


@dataclass(frozen=True)
class ItemContent:
    """Item content per modality (`text`, `image`, ...): item × item kNN graphs (CSR, row =
    an item's neighbours weighted by cosine, no self-loops) and the feature matrices graphs
    are still to be built from (`models.content.attach_content` builds them)."""

    graphs: dict[str, sp.csr_matrix] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    """modality → where it came from (a file, an encoder), for `data info` and reports."""

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({*self.graphs, *self.features}))

    def only(self, modalities: tuple[str, ...]) -> "ItemContent":
        """The same content restricted to `modalities` (the bench's per-modality rows)."""
        return ItemContent({m: g for m, g in self.graphs.items() if m in modalities},
                           {m: f for m, f in self.features.items() if m in modalities},
                           {m: s for m, s in self.sources.items() if m in modalities})


@dataclass(frozen=True)
class LoadReport:
    """What happened while loading: files, row counts, dropped rows, split used."""

    sources: tuple[str, ...]
    rows_read: int
    duplicates_dropped: int
    split: str
    notes: tuple[str, ...] = ()
    blank_ids_dropped: int = 0
    """Rows whose user or item id is blank: they name no one, so they are dropped like duplicates."""
    attributes_source: str | None = None
    """The file the user attributes came from, named in errors about their values."""


@dataclass
class Dataset:
    name: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    train: sp.csr_matrix
    val: sp.csr_matrix
    test: sp.csr_matrix
    report: LoadReport
    user_attributes: pd.DataFrame | None = None
    """One row per user index; columns such as age, gender, occupation."""
    item_text: list[str] | None = None
    """Free text per item index (title, genres, description); '' where unknown."""
    item_categories: list[tuple[str, ...]] | None = None
    """Category labels per item index (MovieLens genres, Amazon categories)."""
    item_features: ItemFeatures | None = None
    """Dense content vectors; `models.features.attach_item_features` fills it."""
    content: ItemContent | None = None
    """Per-modality item-item graphs (neighbour files, feature kNN); None = no item content."""
    extra: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def split(self, name: str) -> sp.csr_matrix:
        if name not in SPLIT_NAMES:
            raise DataError(self.name, f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    def seen(self, split: str) -> sp.csr_matrix:
        """Interactions to mask when ranking for `split`: train for val, train + val for test."""
        return self.train if split == "val" else (self.train + self.val).tocsr()

    def with_features(self, features: ItemFeatures) -> "Dataset":
        return replace(self, item_features=features)

    def content_modalities(self) -> dict[str, str]:
        """modality → its source: content graphs and features, and item text not yet encoded."""
        found = dict(self.content.sources) if self.content else {}
        if "text" not in found and self.item_text and any(t.strip() for t in self.item_text):
            found["text"] = "item text: all-MiniLM-L6-v2 embeddings and their kNN graph, computed on first use"
        return dict(sorted(found.items()))

    def summary(self) -> dict:
        per_user = np.diff(self.train.indptr) + np.diff(self.val.indptr) + np.diff(self.test.indptr)
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": int(per_user.sum()),
            "train": int(self.train.nnz),
            "val": int(self.val.nnz),
            "test": int(self.test.nnz),
            "density": float(per_user.sum() / (self.n_users * self.n_items)),
            "interactions_per_user": {"min": int(per_user.min()), "median": float(np.median(per_user)), "max": int(per_user.max())},
            "split": self.report.split,
            "duplicates_dropped": self.report.duplicates_dropped,
            "blank_ids_dropped": self.report.blank_ids_dropped,
            "item_features": self.item_features.source if self.item_features else None,
            "content_modalities": self.content_modalities(),
            "user_attributes": list(self.user_attributes.columns) if self.user_attributes is not None else [],
            "notes": list(self.report.notes),
        }


def _unique_index(index: pd.Index, what: str, source: str | Path) -> None:
    if index.has_duplicates:
        repeated = index[index.duplicated()].unique()
        raise DataError(source, f"{len(repeated)} {what} id(s) have more than one row, e.g. {repeated[:1].tolist()[0]!r}")


def _coverage_note(ids: np.ndarray, described: pd.Index, what: str, kind: str, source: str | Path | None) -> list[str]:
    """A note (also issued as a warning) counting `ids` that have no row in `source`."""
    missing = ~pd.Index(ids).isin(described)
    if not missing.any():
        return []
    note = (f"{int(missing.sum())} of {len(ids)} {what} have no row in {source or f'the {kind}'} "
            f"(e.g. {ids[missing][:1].tolist()[0]!r}); they are kept without {kind}")
    warnings.warn(note, RectuneWarning, stacklevel=4)
    return [note]


def build_dataset(
    name: str,
    interactions: pd.DataFrame,
    *,
    source: str | Path,
    split: SplitStrategy,
    user_attributes: pd.DataFrame | None = None,
    item_text: pd.Series | None = None,
    item_categories: pd.Series | None = None,
    item_order: np.ndarray | None = None,
    extra_sources: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
    attributes_source: str | Path | None = None,
    content_source: str | Path | None = None,
) -> Dataset:
    """Turn an interaction frame into a `Dataset`.

    interactions: columns `user`, `item`, optional `timestamp` and `split`.
    user_attributes / item_text / item_categories: indexed by raw id.
    item_order: raw item ids in index order, when the source fixes item indices (MMRec's
    feature .npy files are aligned with its integer item ids).
    attributes_source / content_source: the files user_attributes and item_text /
    item_categories came from, named in errors and in the note (and warning) that counts
    users without attributes and items without content.
    Rows with a blank (empty or missing) user or item id are dropped and counted.
    """
    for column in ("user", "item"):
        if column not in interactions:
            raise DataError(source, f"missing column {column!r}")
    if interactions.empty:
        raise DataError(source, "no interactions (the file has a header but no rows)")
    rows_read = len(interactions)
    blank = np.zeros(rows_read, dtype=bool)
    for column in ("user", "item"):
        values = interactions[column]
        blank |= values.isna().to_numpy()
        if not pd.api.types.is_numeric_dtype(values.dtype):
            blank |= values.astype(str).str.strip().eq("").to_numpy(dtype=bool, na_value=True)
    frame = interactions[~blank]
    if frame.empty:
        raise DataError(source, f"no interactions: all {rows_read} rows have a blank user or item id")
    for column in ("user", "item"):
        if pd.api.types.is_integer_dtype(frame[column].dtype):
            # Loaders keep blank integer ids as <NA> (nullable Int64) until they are dropped here.
            frame = frame.assign(**{column: frame[column].astype("int64")})
    if "timestamp" in frame:
        frame = frame.sort_values("timestamp", kind="stable")
    frame = frame.drop_duplicates(["user", "item"], keep="first").sort_index(kind="stable")
    duplicates = rows_read - int(blank.sum()) - len(frame)

    labels = split.assign(frame, source)
    user_ids, user_index = np.unique(frame["user"].to_numpy(), return_inverse=True)
    if item_order is None:
        item_ids, item_index = np.unique(frame["item"].to_numpy(), return_inverse=True)
    else:
        item_ids = np.asarray(item_order)
        lookup = pd.Index(item_ids)
        item_index = lookup.get_indexer(frame["item"])
        if (item_index < 0).any():
            bad = frame["item"].to_numpy()[item_index < 0][:3]
            raise DataError(source, f"item ids {list(bad)} are outside the item range of the feature files")

    def matrix(label: int) -> sp.csr_matrix:
        rows = labels == label
        ones = np.ones(int(rows.sum()), dtype=np.float32)
        return sp.csr_matrix((ones, (user_index[rows], item_index[rows])), shape=(len(user_ids), len(item_ids)))

    notes = list(notes)
    users_attr = None
    if user_attributes is not None:
        _unique_index(user_attributes.index, "user", attributes_source or source)
        users_attr = user_attributes.reindex(user_ids).reset_index(drop=True)
        notes += _coverage_note(user_ids, user_attributes.index, "users", "attributes", attributes_source)
    text = None
    if item_text is not None:
        _unique_index(item_text.index, "item", content_source or source)
        text = [str(t) if isinstance(t, str) else "" for t in item_text.reindex(item_ids)]
    categories = None
    if item_categories is not None:
        _unique_index(item_categories.index, "item", content_source or source)
        categories = [tuple(c) if isinstance(c, (list, tuple)) else () for c in item_categories.reindex(item_ids)]
    if item_text is not None or item_categories is not None:
        described = (item_text if item_text is not None else item_categories).index
        notes += _coverage_note(item_ids, described, "items", "text or categories", content_source)

    for label, word in ((VAL, "validation"), (TEST, "test")):
        if not (labels == label).any():
            # Loading still works (`data info` shows the file); scoring refuses it (models.groups.require_held_out).
            note = f"{source}: no {word} rows (split {split.describe()!r}); evaluate, baseline and tune refuse this split"
            warnings.warn(note, RectuneWarning, stacklevel=3)
            notes.append(note)
    return Dataset(
        name=name,
        user_ids=user_ids,
        item_ids=item_ids,
        train=matrix(TRAIN),
        val=matrix(VAL),
        test=matrix(TEST),
        report=LoadReport((str(source), *extra_sources), rows_read, duplicates, split.describe(), tuple(notes), int(blank.sum()),
                          str(attributes_source or source) if user_attributes is not None else None),
        user_attributes=users_attr,
        item_text=text,
        item_categories=categories,
    )
