"""The recommender core on the real Amazon Baby data (../shared/data or RECTUNE_DATA_DIR).

Tiny models (one epoch) — this checks that everything fits together on the real data
and lands in sane ranges, not the quality we report (bench/core.py does that).
"""

import os
from pathlib import Path

import numpy as np
import pytest

from rectune.models.features import attach_item_features
from rectune.models.groups import make_groups
from rectune.models.loaders import load_dataset
from rectune.models.pipeline import PIPELINES, Pipeline, PipelineConfig

DATA_DIR = Path(os.environ.get("RECTUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (DATA_DIR / "amazon-baby").is_dir(), reason=f"Amazon Baby is not in {DATA_DIR}"),
]


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    return attach_item_features(load_dataset("baby", DATA_DIR), cache_dir=tmp_path_factory.mktemp("cache"))


def test_baby_loads_as_published(baby):
    summary = baby.summary()
    assert (summary["users"], summary["items"], summary["interactions"]) == (19445, 7050, 160792)
    assert summary["split"] == "given" and summary["duplicates_dropped"] == 0
    assert summary["train"] + summary["val"] + summary["test"] == 160792
    assert baby.item_features.source == "collaborative:svd64"  # our copy has no item content
    assert make_groups(baby, "prefix").sizes() == {"A1": 5227, "A2": 4990, "A3": 4592, "other": 4636}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_tiny_pipelines_land_in_sane_ranges(baby, name):
    groups = make_groups(baby, "prefix")
    config = PipelineConfig.from_dict({"pipeline": name, "epochs": 1, "ranker_epochs": 1, "embedding_dim": 32, "k": 200})
    pipeline = Pipeline(config).fit(baby)
    users = np.arange(0, baby.n_users, 4)
    metrics = pipeline.evaluate(baby, "val", groups, users=users).metrics
    overall = metrics.overall
    floor = 20 / baby.n_items
    # Published full-ranking Recall@20 on Baby spans .03–.11; a one-epoch model must
    # clear the random floor (.0028) by far and cannot exceed the state of the art by far.
    assert 5 * floor < overall["recall@20"] < 0.2, overall
    assert 0 < overall["ndcg@20"] < overall["recall@20"]
    assert overall["candidate_recall@200"] > 3 * overall["candidate_recall_floor@200"]
    assert overall["users"] > 0.95 * len(users)  # nearly every Baby user has a validation item
    assert set(metrics.groups) == {"A1", "A2", "A3", "other"}
