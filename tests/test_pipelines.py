"""The pipeline contract, checked once over all four pipelines on the planted dataset."""

import numpy as np
import pytest
import torch

from models.errors import ConfigError
from models.groups import make_groups
from models.pipeline import PIPELINES, Pipeline, PipelineConfig
from models.metrics import in_rows

TINY = {"epochs": 3, "ranker_epochs": 2, "embedding_dim": 16, "k": 60, "top_n": 10, "batch_size": 128, "negative_pool": 30}


@pytest.fixture(scope="module")
def fitted(planted):
    groups = make_groups(planted, "activity:2")
    return {name: Pipeline(PipelineConfig.from_dict({"pipeline": name, **TINY})).fit(planted, groups) for name in PIPELINES}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_learns_and_respects_masks(fitted, planted, name):
    pipeline = fitted[name]
    users = np.arange(planted.n_users)
    for split in ("val", "test"):
        candidates, ranked, _ = pipeline.recommend(planted, users, split)
        assert candidates.items.shape == (planted.n_users, 60)
        assert ranked.shape == (planted.n_users, 20)  # at least the anchor cutoff
        assert not in_rows(planted.seen(split)[users], candidates.items).any(), "a seen item was recommended"
        assert all(set(r) <= set(c) for r, c in zip(ranked, candidates.items))
        assert all(len(set(r)) == len(r) for r in ranked)
    result = pipeline.evaluate(planted, "val", make_groups(planted, "activity:2")).metrics
    floor = 20 / planted.n_items
    # Users draw ~90% of their items from a quarter of the catalogue: learning shows.
    assert result.overall["recall@20"] > 2.5 * floor, result.overall
    assert result.overall["candidate_recall@60"] > result.overall["candidate_recall_floor@60"] * 2
    assert set(result.groups) == {"cold", "heavy"}
    assert sum(g["users"] for g in result.groups.values()) == result.overall["users"]


def test_same_seed_same_metrics_other_seed_other_model(planted):
    def run(seed):
        config = PipelineConfig.from_dict({"pipeline": "two_tower+deepfm", **TINY, "seed": seed})
        return Pipeline(config).fit(planted).evaluate(planted, "val").metrics.overall

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other


def test_deepfm_fast_scoring_equals_plain_forward(fitted, planted):
    ranker = fitted["heuristic+deepfm"].ranker
    users = np.arange(0, planted.n_users, 7)
    candidates = fitted["heuristic+deepfm"].recall.candidates(users, 25, planted.train)
    fast = ranker.scores(users, candidates)
    u = np.repeat(users, 25)
    items = candidates.items.ravel()
    with torch.inference_mode():
        plain = ranker.net(
            torch.from_numpy(u), torch.from_numpy(ranker.activity[u]), torch.from_numpy(ranker.group[u]),
            torch.from_numpy(items), torch.from_numpy(ranker.popularity[items]),
            torch.from_numpy(ranker.pair_features(candidates.scores.ravel(), np.tile(np.arange(25), len(users)))),
        ).numpy().reshape(fast.shape)
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)


def test_k_and_top_n_change_serving_only():
    base = PipelineConfig.from_dict({"pipeline": "two_tower+deepfm"})
    changed = PipelineConfig.from_dict({"pipeline": "two_tower+deepfm", "k": 1000, "top_n": 50})
    assert base.ranker_key() == changed.ranker_key()
    assert base.recall_key() != PipelineConfig.from_dict({"pipeline": "two_tower", "embedding_dim": 32}).recall_key()
    heuristic = PipelineConfig.from_dict({"pipeline": "heuristic", "lr": 0.1})
    assert "lr" not in heuristic.recall_key()  # the heuristic does not train with a learning rate


@pytest.mark.parametrize("values, message", [
    ({"embedding": 64}, r"unknown parameter\(s\) \['embedding'\]"),
    ({"k": 10, "top_n": 20}, "k \\(candidates\\) must be ≥ top_n, but got k=10 < top_n=20"),
    ({"k": "500"}, "k must be an integer, but got '500'"),
    ({"lr": -1}, "lr must be positive, but got -1.0"),
    ({"pipeline": "bpr"}, "pipeline must be one of"),
    ({"hidden": "128,x"}, "hidden must be integers"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
])
def test_config_errors_name_the_value(values, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_dict(values)


def test_in_rows_matches_a_plain_lookup():
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    matrix = sp.random(50, 30, density=0.2, random_state=1, format="csr")
    items = rng.integers(-1, 30, size=(50, 12))
    rows = [set(matrix[r].indices) for r in range(50)]
    expected = np.array([[item in rows[r] for item in items[r]] for r in range(50)])
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(in_rows(matrix, items, block=7), expected)
