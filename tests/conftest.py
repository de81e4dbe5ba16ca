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


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    frame = planted_interactions()
    dataset = build_dataset("planted", frame, source="planted", split=SplitStrategy("random", seed=3))
    return attach_item_features(dataset, cache_dir=tmp_path_factory.mktemp("cache"), collaborative_dim=16)
