"""Shared fixtures: a small dataset with planted structure, generated here (no shared data).

Users belong to one of four taste clusters and mostly interact with their cluster's
items, so a model that learns anything ranks held-out items far above the random floor.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.dataset import build_dataset
from models.features import attach_item_features
from models.splits import SplitStrategy

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def planted_interactions(n_users: int = 240, n_items: int = 160, clusters: int = 4, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    items_per_cluster = n_items // clusters
    for user in range(n_users):
        cluster = user % clusters
        n = int(rng.integers(8, 16))
        own = rng.choice(items_per_cluster, size=n - 1, replace=False) + cluster * items_per_cluster
        noise = rng.integers(0, n_items, size=1)
        for item in np.unique(np.concatenate([own, noise])):
            rows.append((f"U{user:04d}", f"I{item:04d}", int(rng.integers(0, 10**6))))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def write_baby_format(directory, n_users: int = 120, n_items: int = 80):
    """The planted interactions as `<directory>/amazon-baby/interactions.tsv.gz`, so that
    commands that load datasets by name can run on them."""
    import gzip

    frame = planted_interactions(n_users=n_users, n_items=n_items)
    labels = SplitStrategy("random", seed=1).assign(frame, "planted")
    lines = ["reviewerID\tasin\tmmrec_userID\tmmrec_itemID\tlattice_userID\tlattice_itemID\tsplit"]
    lines += [f"{u}\t{i}\t0\t0\t0\t0\t{('train', 'val', 'test')[s]}" for u, i, s in zip(frame["user"], frame["item"], labels)]
    (directory / "amazon-baby").mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / "amazon-baby" / "interactions.tsv.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return directory


@pytest.fixture
def baby_format_dir(tmp_path):
    return write_baby_format(tmp_path / "data")


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    frame = planted_interactions()
    dataset = build_dataset("planted", frame, source="planted", split=SplitStrategy("random", seed=3))
    return attach_item_features(dataset, cache_dir=tmp_path_factory.mktemp("cache"), collaborative_dim=16)
