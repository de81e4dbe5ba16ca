"""The pipeline contract, checked once over all four pipelines on the planted dataset, through
the serving path trials take; the models' own formulas and optional inputs (user attributes,
item categories); and the OpenMP settings every entry point runs torch under."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import planted_interactions
from rectune.models.base import FitContext
from rectune.models.dataset import ItemFeatures, build_dataset
from rectune.models.deepfm import DeepFMNet, fm_second_order
from rectune.models.errors import ConfigError
from rectune.models.features import attach_item_features
from rectune.models.groups import make_groups
from rectune.models.heuristic import HeuristicRecall
from rectune.models.pipeline import PIPELINES, Pipeline, PipelineConfig, build_ranker, fit_ranker, fit_recall
from rectune.models.metrics import in_rows
from rectune.models.splits import SplitStrategy
from rectune.models.two_tower import TwoTowerNet
from rectune.tools.cache import ModelCache
from rectune.tools.runner import TrialRunner
from rectune.tools.space import SearchSpace
from rectune.tools.trial import TrialSpec

TINY = {"epochs": 3, "ranker_epochs": 2, "embedding_dim": 16, "k": 60, "top_n": 10, "batch_size": 128, "negative_pool": 30}


@pytest.fixture(scope="module")
def fitted(planted):
    return {name: Pipeline(PipelineConfig.from_dict({"pipeline": name, **TINY})).fit(planted) for name in PIPELINES}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_learns_and_respects_masks(fitted, planted, name):
    pipeline = fitted[name]
    users = np.arange(planted.n_users)
    for split in ("val", "test"):
        served = pipeline.recommend(planted, users, split, length=20, candidate_recall=True)
        assert served.candidates.shape == (planted.n_users, 60)
        assert served.items.shape == (planted.n_users, 20)
        assert not in_rows(planted.seen(split)[users], served.candidates).any(), "a seen item was recommended"
        assert all(set(r) <= set(c) for r, c in zip(served.items, served.candidates))
        assert all(len(set(r)) == len(r) for r in served.items)
        top_n = pipeline.recommend(planted, users, split)
        assert top_n.items.shape == (planted.n_users, 10)
        if pipeline.ranker is None:
            # Without a ranker the list is the recall stage's own top-N, searched that deep only.
            assert top_n.candidates is None
            np.testing.assert_array_equal(top_n.items, served.candidates[:, :10])
        else:
            np.testing.assert_array_equal(top_n.items, served.items[:, :10])
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


# Within the search space, so that trials accept them.
TRIAL = {"epochs": 2, "ranker_epochs": 1, "embedding_dim": 32, "k": 60, "top_n": 10, "batch_size": 256, "negative_pool": 100}


def trial(planted, groups: str, pipeline: str, objective: str = "ndcg@20", params: dict = TRIAL):
    params = {k: v for k, v in params.items() if k in SearchSpace.load().defaults(pipeline)}
    runner = TrialRunner(planted, make_groups(planted, groups), cache=ModelCache())
    return runner, runner.run(TrialSpec("planted", groups, "all", pipeline, params, seed=0, objective=objective))


def test_trials_serve_through_the_pipeline_whatever_the_grouping(planted):
    """The user groups are a way to read the metrics, no model input: the same seed gives
    the same model and metrics under any grouping, and a trial measures what the pipeline serves."""
    _, everyone = trial(planted, "all", "two_tower+deepfm")
    runner, by_activity = trial(planted, "activity:2", "two_tower+deepfm")
    assert everyone.metrics["overall"] == by_activity.metrics["overall"]
    assert set(by_activity.metrics) == {"overall", "cold", "heavy"}
    config = PipelineConfig.from_dict({"pipeline": "two_tower+deepfm", **TRIAL})
    evaluation = Pipeline(config).fit(planted).evaluate(planted, "val", runner.groups)
    assert evaluation.metrics.overall == by_activity.metrics["overall"]
    assert evaluation.metrics.groups["cold"] == by_activity.metrics["cold"]


def test_ranker_less_trials_search_k_deep_only_for_candidate_recall(planted):
    runner, top_n = trial(planted, "all", "heuristic")
    assert "candidate_recall@60" not in top_n.metrics["overall"]
    deep = runner.run(TrialSpec("planted", "all", "all", "heuristic", top_n.spec.params, seed=0, objective="candidate_recall@k"))
    assert deep.cache == "model"  # the fitted stage is reused, the lists are not: they were too short
    assert deep.objective == deep.metrics["overall"]["candidate_recall@60"] > 0
    # The direct top-N list is the head of the K-deep one.
    assert {m: v for m, v in deep.metrics["overall"].items() if "candidate" not in m} == top_n.metrics["overall"]


def test_both_exact_searches_find_the_same_unseen_top_k(monkeypatch):
    import scipy.sparse as sp

    from rectune.models import base
    from rectune.models.two_tower import blocked_top_k, faiss_top_k

    monkeypatch.setattr(base, "_SCORES_PER_BLOCK", 7 * 90)  # 7 users a block: the blocks are stitched too
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(90, 8)).astype(np.float32)
    seen = sp.random(300, 90, density=0.1, random_state=2, format="csr")
    blocked, faiss = blocked_top_k(users, items, 20, seen), faiss_top_k(users, items, 20, seen)
    np.testing.assert_array_equal(blocked.items, faiss.items)
    np.testing.assert_allclose(blocked.scores, faiss.scores, rtol=1e-5)
    expected = np.where(seen.toarray() > 0, -np.inf, users @ items.T)
    np.testing.assert_array_equal(blocked.items, np.argsort(-expected, axis=1, kind="stable")[:, :20])


def test_openmp_settings_are_made_before_torch_loads():
    from rectune.models.training import usable_cpus

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}  # torch reads both
    script = "import os, rectune.models, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"

    def run(env, code=script):
        done = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split(), done.stderr

    assert run(clean)[0] == ["PASSIVE", str(usable_cpus())]
    assert run({**clean, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"})[0] == ["ACTIVE", "1"]  # a user's choice stays
    _, warned = run(clean, "import torch, rectune.models")
    assert "torch was imported before rectune" in warned


def plain_scores(ranker, users: np.ndarray, candidates) -> np.ndarray:
    """The DeepFM ranker's scores from its plain forward, row by row (the reference for its fast path)."""
    k = candidates.items.shape[1]
    u = np.repeat(users, k)
    items = candidates.items.ravel()
    with torch.inference_mode():
        return ranker.net(
            torch.from_numpy(ranker.activity[u]), torch.from_numpy(items), torch.from_numpy(ranker.popularity[items]),
            torch.from_numpy(ranker.pair_features(candidates.scores.ravel(), np.tile(np.arange(k), len(users)))),
        ).numpy().reshape(candidates.items.shape)


def test_deepfm_fast_scoring_equals_plain_forward(fitted, planted):
    ranker = fitted["heuristic+deepfm"].ranker
    users = np.arange(0, planted.n_users, 7)
    candidates = fitted["heuristic+deepfm"].recall.candidates(users, 25, planted.train)
    np.testing.assert_allclose(ranker.scores(users, candidates), plain_scores(ranker, users, candidates), rtol=1e-4, atol=1e-4)


def test_deepfm_negatives_come_from_the_whole_candidate_list(planted):
    # A ranker that only ever saw the top of the list scored deeper candidates (ranks and
    # scores it had never met) too high: on Baby, Recall@20 fell as K grew past its pool.
    config = PipelineConfig.from_dict({"pipeline": "heuristic+deepfm", **TINY, "negative_pool": 80})
    ranker = build_ranker(config)
    (users, items, _, ranks, offsets), _ = ranker._training_lists(planted, lambda subset: fit_recall(config, subset), FitContext(seed=0))
    assert items.shape == ranks.shape == offsets.shape == (len(users), 1 + config.negatives)
    negative_ranks = ranks[:, 1:][np.isfinite(offsets[:, 1:])]
    assert negative_ranks.max() >= 72 and negative_ranks.min() <= 8, (negative_ranks.min(), negative_ranks.max())
    assert 0.4 < (negative_ranks >= 40).mean() < 0.6, "negatives are not spread over the whole list"


def test_a_rankers_fit_seconds_count_its_held_out_recall_also_from_a_cache(planted):
    # A held-out recall stage from the cache comes back at once but cost its first fit: a trial
    # that reuses it must report what the ranker costs, not what this process happened to spend.
    import time

    config = PipelineConfig.from_dict({"pipeline": "heuristic+deepfm", **TINY})

    def as_if_cached(subset):
        stage = fit_recall(config, subset)
        stage.fit_seconds = 1000.0  # what its first fit cost, stored with it
        return stage

    start = time.perf_counter()
    ranker = fit_ranker(config, planted, held_out_recall=as_if_cached)
    spent = time.perf_counter() - start
    assert 1000.0 < ranker.fit_seconds < 1000.0 + spent


def test_deepfm_loss_is_a_softmax_over_the_whole_list_at_chance(planted):
    # Sampled softmax with its correction: a ranker that scores every candidate alike must
    # pay log(1 + list size), the loss of a uniform guess over the positive and its whole
    # list, whatever the number of negatives drawn; a draw that is itself a held-out item
    # must not count as a negative.
    from rectune.models.deepfm import _lightning_module

    config = PipelineConfig.from_dict({"pipeline": "heuristic+deepfm", **TINY, "negative_pool": 80, "negatives": 8})
    ranker = build_ranker(config)
    (users, items, scores, ranks, offsets), _ = ranker._training_lists(planted, lambda subset: fit_recall(config, subset), FitContext(seed=0))
    answers = items[:, :1] == items[:, 1:]
    assert np.isneginf(offsets[:, 1:][answers]).all()
    assert (offsets[:, 0] == 0).all()
    # Every list is full here (80 candidates), so each finite offset is log(80 / 8).
    # (the others are −inf: draws that are one of that user's held-out items).
    drawn = offsets[:, 1:]
    np.testing.assert_allclose(drawn[np.isfinite(drawn)], np.log(80 / 8), rtol=1e-6)
    assert 0 < np.isneginf(drawn).mean() < 0.05
    ranker.activity, ranker.popularity = np.zeros(planted.n_users, np.int64), np.zeros(planted.n_items, np.int64)
    ranker.score_mean = ranker.score_std = ranker.rank_mean = ranker.rank_std = 1.0
    net = DeepFMNet({"activity": 1, "popularity": 16}, 4, (8,), 0.0, None, None, n_pair_fields=2).eval()
    with torch.no_grad():
        net.output.weight.zero_()
        net.output.bias.zero_()
        net.pair_first.zero_()
        net.pair_embed.zero_()
    module = _lightning_module(net, 0.01)
    usable = np.isfinite(offsets[:, 1:]).all(axis=1)
    batch = {name: tensor[torch.from_numpy(usable)] for name, tensor in ranker._tensors(users, items, scores, ranks, offsets).items()}
    with torch.no_grad():
        loss = float(module._loss(batch))
    assert abs(loss - np.log1p(80)) < 1e-4, (loss, np.log1p(80))


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


# --------------------------------------------------------------------------- optional inputs

OCCUPATIONS = ("artist", "doctor", "engineer", "student", "writer")


@pytest.fixture(scope="module")
def movielens_like(tmp_path_factory):
    """The planted interactions with MovieLens-style user attributes (age, gender,
    occupation; the last user has no attribute row, like a rater missing from u.user)
    and item categories (each item's taste cluster plus a second, cross-cutting genre)."""
    frame = planted_interactions(n_users=120, n_items=80)
    users = sorted(frame["user"].unique())
    attributes = pd.DataFrame({
        "age": [15 + (7 * k) % 50 for k in range(len(users) - 1)],
        "gender": ["FM"[k % 2] for k in range(len(users) - 1)],
        "occupation": [OCCUPATIONS[k % len(OCCUPATIONS)] for k in range(len(users) - 1)],
    }, index=users[:-1])
    items = sorted(frame["item"].unique())
    categories = pd.Series([(f"cluster{int(i[1:]) // 20}", f"genre{int(i[1:]) % 3}") for i in items], index=items)
    with pytest.warns(RuntimeWarning, match="1 of 120 users have no row in u.user"):
        dataset = build_dataset("ml-like", frame, source="mem", split=SplitStrategy("random", seed=3),
                                user_attributes=attributes, item_categories=categories, attributes_source="u.user")
    return attach_item_features(dataset, cache_dir=tmp_path_factory.mktemp("cache"), collaborative_dim=16)


def record_initial_parameters(monkeypatch, cls, prefixes: tuple[str, ...]) -> list[dict]:
    """Patch `cls.__init__` to keep a copy of the named parameters of every instance as built."""
    created: list[dict] = []
    original = cls.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append({name: value.detach().clone() for name, value in self.named_parameters() if name.startswith(prefixes)})

    monkeypatch.setattr(cls, "__init__", init)
    return created


def test_two_tower_user_tower_learns_from_user_attributes(movielens_like, monkeypatch):
    initial = record_initial_parameters(monkeypatch, TwoTowerNet, ("attributes.",))
    recall = fit_recall(PipelineConfig.from_dict({"pipeline": "two_tower", **TINY}), movielens_like)
    net = recall.net
    # age, gender, occupation; the user without attributes has a code of its own in each.
    assert [table.num_embeddings for table in net.attributes] == [50 + 1, 2 + 1, len(OCCUPATIONS) + 1]
    assert recall.attributes.min() >= 0
    assert recall.attributes[-1].tolist() == [50, 2, len(OCCUPATIONS)]  # the missing row's codes sort last
    for j, table in enumerate(net.attributes):
        before, after = initial[0][f"attributes.{j}.weight"], table.weight.detach().cpu()
        for code in np.unique(recall.attributes[:, j]):
            assert not torch.allclose(before[code], after[code]), f"attribute {j} code {code} received no update"
    users = np.arange(20)
    vectors = recall.user_vectors(users, movielens_like.train)
    recall.attributes = recall.attributes.copy()
    recall.attributes[:, 1] = 1 - np.minimum(recall.attributes[:, 1], 1)  # swap F and M
    swapped = recall.user_vectors(users, movielens_like.train)
    assert np.abs(vectors - swapped).max(axis=1).min() > 1e-4, "user vectors ignore gender"


def test_deepfm_ranker_learns_from_item_categories(movielens_like, monkeypatch):
    initial = record_initial_parameters(monkeypatch, DeepFMNet, ("category_",))
    pipeline = Pipeline(PipelineConfig.from_dict({"pipeline": "heuristic+deepfm", **TINY})).fit(movielens_like)
    ranker = pipeline.ranker
    # 4 clusters and 3 genres; each item's row averages its two categories.
    assert ranker.net.categories.shape == (movielens_like.n_items, 7)
    np.testing.assert_allclose(ranker.net.categories.sum(dim=1).cpu().numpy(), 1.0)
    assert ranker.net.n_item_fields == 3  # popularity, categories, content
    for name in ("category_embed.weight", "category_first.weight"):
        changed = ~torch.isclose(initial[0][name], dict(ranker.net.named_parameters())[name].detach().cpu()).all(dim=0)
        assert changed.all(), f"{name}: categories {np.flatnonzero(~changed.numpy()).tolist()} received no update"
    users = np.arange(0, movielens_like.n_users, 5)
    candidates = pipeline.recall.candidates(users, 25, movielens_like.train)
    scores = ranker.scores(users, candidates)
    np.testing.assert_allclose(scores, plain_scores(ranker, users, candidates), rtol=1e-4, atol=1e-4)
    ranker.net.categories = ranker.net.categories.roll(1, dims=1)  # relabel every item's categories
    assert np.abs(ranker.scores(users, candidates) - scores).max() > 1e-4, "scores ignore the category field"


# --------------------------------------------------------------------------- formulas

def keep_top_positive(similarity: np.ndarray, neighbors: int) -> np.ndarray:
    """Each row's `neighbors` largest positive off-diagonal entries; the rest zero."""
    similarity = similarity.copy()
    np.fill_diagonal(similarity, 0.0)
    kept = np.zeros_like(similarity)
    for row, values in enumerate(similarity):
        top = np.argsort(-values)[:neighbors]
        top = top[values[top] > 0]
        kept[row, top] = values[top]
    return kept


@pytest.mark.parametrize("embedding_dim, neighbors", [(3, 3), (2, 1)])
def test_heuristic_scores_follow_the_documented_formula(embedding_dim, neighbors):
    history = {"u0": ["i0", "i1"], "u1": ["i1", "i2"], "u2": ["i0", "i2", "i3"], "u3": ["i0", "i1", "i3"]}
    frame = pd.DataFrame([(u, i, "train") for u, items in history.items() for i in items], columns=["user", "item", "split"])
    features = np.array([[1.0, 0.2, 0.4], [0.9, 0.5, -0.1], [-0.3, 1.0, 0.7], [0.1, -0.8, 0.3]])
    dataset = build_dataset("tiny", frame, source="mem", split=SplitStrategy("given"))
    dataset = dataset.with_features(ItemFeatures(features.astype(np.float32), "test"))
    cf_weight, popularity_weight, ease_lambda = 0.3, 0.5, 2.0
    recall = HeuristicRecall(embedding_dim, neighbors, cf_weight, popularity_weight, ease_lambda=ease_lambda)
    recall.fit(dataset, FitContext())

    # The module docstring's recipe, written out densely (no item content: the fallback graph).
    centred = features - features.mean(axis=0)
    reduced = centred @ np.linalg.svd(centred)[2][:embedding_dim].T  # PCA; a no-op rotation at full width
    unit = reduced / np.linalg.norm(reduced, axis=1, keepdims=True)
    kept = keep_top_positive(unit @ unit.T, neighbors)
    adjacency = np.maximum(kept, kept.T)  # symmetric, the larger cosine either way
    degree = adjacency.sum(axis=1)
    content = adjacency / np.sqrt(np.maximum(np.outer(degree, degree), 1e-30))
    train = dataset.train.toarray()
    counts = train.sum(axis=0)
    inverse = np.linalg.inv(train.T @ train + ease_lambda * np.eye(len(counts)))
    ease = np.eye(len(counts)) - inverse / np.diag(inverse)
    collaborative = ease / np.abs(ease).sum(axis=1).mean()
    expected = train @ ((1 - cf_weight) * content + cf_weight * collaborative) + popularity_weight * counts / counts.max()

    users = np.arange(dataset.n_users)
    candidates = recall.candidates(users, dataset.n_items, dataset.train)
    for user in users:
        unseen = np.flatnonzero(train[user] == 0)
        listed = candidates.items[user][candidates.items[user] >= 0]
        assert sorted(listed.tolist()) == unseen.tolist()
        np.testing.assert_allclose(candidates.scores[user][: len(listed)], expected[user, listed], rtol=1e-5)
        assert (np.diff(candidates.scores[user][: len(listed)]) <= 0).all()


def test_fm_second_order_equals_the_pairwise_sum():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(5, 6, 4, generator=generator, dtype=torch.float64)
    pairwise = sum((vectors[:, i] * vectors[:, j]).sum(-1) for i in range(6) for j in range(i + 1, 6))
    torch.testing.assert_close(fm_second_order(vectors), pairwise)

    # The whole network with first order and MLP zeroed is its FM term over all six fields.
    rng = np.random.default_rng(0)
    sizes = {"activity": 3, "popularity": 16}
    categories = rng.random((9, 5)).astype(np.float32)
    content = rng.normal(size=(9, 6)).astype(np.float32)
    torch.manual_seed(0)
    net = DeepFMNet(sizes, 4, (8,), 0.0, categories, content, n_pair_fields=2).eval()
    with torch.no_grad():
        for parameter in (*net.first.parameters(), net.category_first.weight, net.content_first.weight, net.pair_first,
                          net.bias, *net.output.parameters()):
            parameter.zero_()
        for table in net.embed.values():
            table.weight.normal_()  # the 0.01 init would make the check trivially small
    n = 11
    item = torch.from_numpy(rng.integers(0, 9, n))
    activity = torch.from_numpy(rng.integers(0, 3, n))
    popularity, pair = torch.from_numpy(rng.integers(0, 16, n)), torch.from_numpy(rng.normal(size=(n, 2)).astype(np.float32))
    with torch.no_grad():
        fields = [net.embed["activity"](activity), net.embed["popularity"](popularity),
                  net.category_embed(net.categories[item]), net.content_embed(net.content[item]),
                  pair[:, :1] * net.pair_embed[0], pair[:, 1:] * net.pair_embed[1]]
        expected = sum((fields[i] * fields[j]).sum(-1) for i in range(6) for j in range(i + 1, 6))
        torch.testing.assert_close(net(activity, item, popularity, pair), expected, rtol=1e-5, atol=1e-5)


def test_two_tower_smooths_its_item_tables_over_the_content_graph_as_documented():
    import scipy.sparse as sp

    from rectune.models.two_tower import CONTENT_HOP_WEIGHT

    rng = np.random.default_rng(0)
    upper = np.triu(rng.random((5, 5)) * (rng.random((5, 5)) < 0.5), 1)
    graph = (upper + upper.T).astype(np.float32)  # the fused content graph is symmetric
    net = TwoTowerNet(3, 5, 4, None, [], False, sp.csr_matrix(graph), content_layers=2)
    table = net.item_id.weight
    operator = np.eye(5) + CONTENT_HOP_WEIGHT * (graph + graph @ graph)  # E + 2·(S E + S² E)
    np.testing.assert_allclose(net.smoothed(table).detach().numpy(), operator @ table.detach().numpy(), rtol=1e-5, atol=1e-6)
    # The hand-written backward gives autograd's gradient of the dense product.
    upstream = torch.from_numpy(rng.standard_normal((5, 4)).astype(np.float32))
    (net.smoothed(table) * upstream).sum().backward()
    np.testing.assert_allclose(table.grad.numpy(), operator.T @ upstream.numpy(), rtol=1e-5, atol=1e-5)
    # The user tower's history table is smoothed the same way, its padding row left out.
    bag = (torch.tensor([2]), torch.tensor([0]), torch.tensor([1]))
    history = net.history.weight.detach().numpy()
    plain = TwoTowerNet(3, 5, 4, None, [], False)
    plain.load_state_dict(net.state_dict())
    with torch.no_grad():
        plain.history.weight[:5] = torch.from_numpy((operator @ history[:5]).astype(np.float32))
        torch.testing.assert_close(net.users(torch.tensor([0]), bag, torch.zeros(1, 0, dtype=torch.long), torch.tensor([5])),
                                   plain.users(torch.tensor([0]), bag, torch.zeros(1, 0, dtype=torch.long), torch.tensor([5])))


def test_two_tower_adds_the_standardised_heuristic_scores(planted):
    config = PipelineConfig(recall="two_tower", epochs=1, heuristic_weight=0.7)
    recall = fit_recall(config, planted)
    assert recall.heuristic is not None and recall.heuristic_weight == 0.7
    users = np.arange(planted.n_users)
    history = planted.train.tolil()
    history[0] = 0  # a user without history: the heuristic part is the popularity prior alone
    history = history.tocsr()
    candidates = recall.candidates(users, 30, history)
    learned = recall.user_vectors(users, history).astype(np.float64) @ recall.item_vectors.T
    closed_form = recall.heuristic.scores(history[users]).astype(np.float64)

    def by_hand(scores):  # the docstring's "standardised per user", in numpy
        return (scores - scores.mean(axis=1, keepdims=True)) / scores.std(axis=1, keepdims=True)

    expected = by_hand(learned) + 0.7 * by_hand(closed_form)
    np.testing.assert_allclose(candidates.scores, np.take_along_axis(expected, candidates.items, axis=1), rtol=1e-4, atol=1e-4)
    assert not in_rows(history, candidates.items).any()  # seen items stay out
    assert (candidates.items[0] >= 0).all()
    alone = fit_recall(PipelineConfig(recall="two_tower", epochs=1, heuristic_weight=0.0), planted)
    assert alone.heuristic is None
    assert not np.array_equal(alone.candidates(users, 30, planted.train).items, candidates.items)


def test_content_layers_without_item_content_say_they_change_nothing(planted):
    recall = fit_recall(PipelineConfig(recall="two_tower", epochs=1, content_layers=2, heuristic_weight=0.0), planted)
    assert not recall.net.smooths
    assert "no item content" in recall.content_note and "content_layers changes nothing" in recall.content_note


def test_moving_the_heuristic_part_reuses_the_trained_towers(planted):
    first = fit_recall(PipelineConfig(recall="two_tower", epochs=1, heuristic_weight=0.2), planted)
    reweighted = fit_recall(PipelineConfig(recall="two_tower", epochs=1, heuristic_weight=0.5, cf_weight=0.5), planted)
    assert reweighted.net is first.net  # no training: the towers depend on nothing that moved
    retrained = fit_recall(PipelineConfig(recall="two_tower", epochs=1, heuristic_weight=0.2, lr=0.01), planted)
    assert retrained.net is not first.net
    reseeded = fit_recall(PipelineConfig(recall="two_tower", epochs=1, heuristic_weight=0.2, seed=1), planted)
    assert reseeded.net is not first.net and not np.array_equal(reseeded.item_vectors, first.item_vectors)


def test_the_rankers_curve_has_a_training_and_a_validation_loss_per_epoch_and_changes_no_weight(planted, monkeypatch):
    from rectune.models.deepfm import DeepFMRanker
    from rectune.tools.trial import TrialResult

    params = {**TRIAL, "ranker_epochs": 2}
    _, result = trial(planted, "all", "heuristic+deepfm", params=params)
    curve = result.ranker_curve
    assert [p["epoch"] for p in curve] == [1, 2]
    chance = np.log1p(params["negative_pool"])  # a uniform guess over a whole list (sampled softmax)
    assert all(0 < p[name] < chance for p in curve for name in ("train_loss", "val_loss")), (curve, chance)
    assert curve[1]["train_loss"] < curve[0]["train_loss"]  # the planted clusters are learnable
    assert TrialResult.from_dict(result.to_dict()).ranker_curve == curve  # kept in the ledger
    assert trial(planted, "all", "heuristic")[1].ranker_curve is None

    # The validation lists are only read: without them the ranker learns the same weights.
    monkeypatch.setattr(DeepFMRanker, "_validation_batches", lambda *args: None)
    _, blind = trial(planted, "all", "heuristic+deepfm", params=params)
    assert blind.metrics == result.metrics
    assert [p["train_loss"] for p in blind.ranker_curve] == [p["train_loss"] for p in curve]
    assert [p["val_loss"] for p in blind.ranker_curve] == [None, None]
