"""Item content as kNN graphs, EASE, and the heuristic recall built on both."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import rectune.models.content as content
from fixture_data import BABY_ROWS, item_knn_rows, write_baby_tsv, write_item_knn, write_mmrec
from rectune.models.base import FitContext
from rectune.models.content import (attach_content, graph_embedding, item_content_matrix, knn_from_features, modality_weights, normalised_graph,
                                    read_neighbour_lists, top_neighbours)
from rectune.models.dataset import ItemContent, ItemFeatures, build_dataset
from rectune.models.ease import EaseRecall, PopularityRecall, ease_weights
from rectune.models.errors import ConfigError, DataError
from rectune.models.heuristic import HeuristicRecall
from rectune.models.loaders import load_amazon_baby, load_mmrec
from rectune.models.pipeline import PipelineConfig, build_recall
from rectune.models.splits import SplitStrategy

ITEMS = sorted({r[1] for r in BABY_ROWS})


# --------------------------------------------------------------------------- neighbour files

def test_neighbour_lists_become_one_graph_per_modality(tmp_path):
    path = write_item_knn(tmp_path)
    lists = read_neighbour_lists(path, np.array(ITEMS))
    assert lists.modalities == ("image", "text")
    text, image = lists.graphs["text"].toarray(), lists.graphs["image"].toarray()
    assert np.all(np.diag(text) == 0) and np.all(np.diag(image) == 0)  # self-neighbours dropped
    for item, neighbour, modality, cosine in item_knn_rows():
        if item != neighbour:
            graph = text if modality == "text" else image
            assert graph[ITEMS.index(item), ITEMS.index(neighbour)] == pytest.approx(float(cosine))
    assert (text != 0).sum() == 10 and (image != 0).sum() == 5
    assert "item_knn.tsv.gz: up to 2 neighbours per item" in lists.sources["text"]


def test_baby_loader_attaches_the_neighbour_file(tmp_path):
    write_baby_tsv(tmp_path)
    write_item_knn(tmp_path)
    dataset = load_amazon_baby(tmp_path)
    assert dataset.content.modalities == ("image", "text")
    assert set(dataset.summary()["content_modalities"]) == {"image", "text"}
    bare = tmp_path / "bare"
    write_baby_tsv(bare)
    assert load_amazon_baby(bare).content is None and load_amazon_baby(bare).summary()["content_modalities"] == {}


def test_data_info_names_the_modalities_and_refuses_a_bad_file_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from rectune.agent.cli import app

    write_baby_tsv(tmp_path)
    write_item_knn(tmp_path)
    shown = CliRunner().invoke(app, ["data", "info", str(tmp_path), "--format", "baby"])
    assert shown.exit_code == 0, shown.output
    assert "item_knn.tsv.gz: up to 2 neighbours per item" in shown.output and '"image"' in shown.output
    path = write_item_knn(tmp_path, _rows_with(lambda rows: rows[2].__setitem__(3, "NaN")))
    refused = CliRunner().invoke(app, ["data", "info", str(tmp_path), "--format", "baby"])
    assert refused.exit_code != 0
    assert refused.output.strip().splitlines() == [f"error: {path}: column 'cosine' has a non-numeric value 'NaN' (data row 3)"]


def _rows_with(change) -> list[tuple[str, ...]]:
    rows = [list(r) for r in item_knn_rows()]
    change(rows)
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("change, header, message", [
    (lambda rows: rows[3].__setitem__(1, "B999"), None, "column 'neighbor_asin' names an item the interactions do not have: 'B999' (data row 4)"),
    (lambda rows: rows[0].__setitem__(0, "X"), None, "column 'asin' names an item the interactions do not have: 'X' (data row 1)"),
    (lambda rows: rows[2].__setitem__(3, "1.5"), None, "column 'cosine' has '1.5' outside [-1, 1] (data row 3)"),
    (lambda rows: rows[4].__setitem__(3, "-1.01"), None, "outside [-1, 1] (data row 5)"),
    (lambda rows: rows[1].__setitem__(3, "nan"), None, "column 'cosine' has a non-numeric value 'nan' (data row 2)"),
    (lambda rows: rows[1].__setitem__(3, ""), None, "column 'cosine' has a non-numeric value '' (data row 2)"),
    (lambda rows: rows[1].__setitem__(2, " "), None, "column 'modality' is blank in data row 2"),
    (lambda rows: rows.append(rows[1]), None, "repeats the pair ('B001', 'B002') for modality 'text'"),
    (lambda rows: [r.pop() for r in rows], ("asin", "neighbor_asin", "modality"), "missing column(s) ['cosine']"),
])
def test_malformed_neighbour_file_is_refused_in_one_line(tmp_path, change, header, message):
    write_baby_tsv(tmp_path)
    path = write_item_knn(tmp_path, _rows_with(change), header or ("asin", "neighbor_asin", "modality", "cosine"))
    with pytest.raises(DataError) as error:
        load_amazon_baby(tmp_path)
    text = str(error.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text


# --------------------------------------------------------------------------- feature kNN

def brute_force_knn(features: np.ndarray, k: int) -> list[list[int]]:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)
    return [[j for j in np.lexsort((np.arange(len(row)), -row))[:k] if row[j] > 0] for row in cosine]


def test_knn_from_features_is_exact_and_excludes_self():
    features = np.random.default_rng(3).normal(size=(60, 8)).astype(np.float32)
    graph = knn_from_features(features, 5)
    expected = brute_force_knn(features, 5)
    for row in range(60):
        start, stop = graph.indptr[row], graph.indptr[row + 1]
        assert sorted(graph.indices[start:stop]) == sorted(expected[row])
        assert row not in graph.indices[start:stop]
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    rows, cols = graph.nonzero()
    np.testing.assert_allclose(graph.data, np.asarray(graph[rows, cols]).ravel())
    np.testing.assert_allclose(np.asarray(graph[rows, cols]).ravel(), np.sum(unit[rows] * unit[cols], axis=1), atol=1e-5)


def test_faiss_and_matmul_search_give_the_same_graph(monkeypatch):
    pytest.importorskip("faiss")
    features = np.random.default_rng(4).normal(size=(300, 16)).astype(np.float32)
    with_faiss = knn_from_features(features, 7)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss now raises ImportError
    without = knn_from_features(features, 7)
    assert (with_faiss != without).nnz == 0 or np.abs((with_faiss - without).toarray()).max() < 1e-5
    np.testing.assert_array_equal(with_faiss.indices, without.indices)


def test_top_neighbours_keeps_the_largest_per_row():
    graph = sp.csr_matrix(np.array([[0, .5, .9, .1], [.2, 0, .2, .7], [0, 0, 0, 0], [.3, .3, .3, 0]], dtype=np.float32))
    cut = top_neighbours(graph, 2).toarray()
    np.testing.assert_array_equal(cut, np.array([[0, .5, .9, 0], [.2, 0, 0, .7], [0, 0, 0, 0], [.3, .3, 0, 0]], dtype=np.float32))
    assert (top_neighbours(graph, 3) != graph).nnz == 0  # no row has more than 3


def test_mmrec_features_become_cached_graphs(tmp_path, monkeypatch):
    write_mmrec(tmp_path / "data")
    dataset = load_mmrec(tmp_path / "data")
    assert dataset.content.modalities == ("image", "text") and not dataset.content.graphs
    calls = []
    real = content.knn_from_features
    monkeypatch.setattr(content, "knn_from_features", lambda *a: calls.append(a) or real(*a))
    first = attach_content(dataset, tmp_path / "cache")
    assert sorted(first.content.graphs) == ["image", "text"] and len(calls) == 2
    for modality in ("text", "image"):
        expected = brute_force_knn(dataset.content.features[modality], content.GRAPH_NEIGHBORS)
        assert [sorted(first.content.graphs[modality][i].indices) for i in range(dataset.n_items)] == [sorted(e) for e in expected]
    second = attach_content(dataset, tmp_path / "cache")
    assert len(calls) == 2  # read back from the cache
    for modality in ("text", "image"):
        assert (second.content.graphs[modality] != first.content.graphs[modality]).nnz == 0
    assert attach_content(first, tmp_path / "cache") is first


def test_text_embeddings_become_a_text_graph(tmp_path):
    pytest.importorskip("torch")
    from rectune.models.features import attach_item_features

    frame = pd.DataFrame([(u, i, "train") for u in "abc" for i in "pqrs"] + [("a", "t", "val"), ("b", "t", "test")],
                         columns=["user", "item", "split"])
    text = pd.Series({"p": "baby bottle", "q": "feeding bottle for infants", "r": "car seat", "s": "infant car seat", "t": "stroller"})
    dataset = attach_item_features(build_dataset("tiny", frame, source="tiny.tsv", split=SplitStrategy("given"), item_text=text),
                                   cache_dir=tmp_path)
    assert "computed on first use" in build_dataset("tiny", frame, source="tiny.tsv", split=SplitStrategy("given"),
                                                    item_text=text).summary()["content_modalities"]["text"]
    graph = dataset.content.graphs["text"]
    assert dataset.content.modalities == ("text",) and "all-MiniLM-L6-v2" in dataset.content.sources["text"]
    items = list(dataset.item_ids)
    def nearest(item):
        row = graph[items.index(item)].toarray().ravel()
        return items[int(row.argmax())]
    assert nearest("p") == "q" and nearest("r") == "s"


# --------------------------------------------------------------------------- EASE

def clustered_dataset(seed: int = 0, n_users: int = 150, n_items: int = 200, clusters: int = 10):
    """Users who each like one cluster of items; few train interactions, so CF alone is thin.
    Returns the dataset and a content graph linking every item to its cluster mates."""
    rng = np.random.default_rng(seed)
    size = n_items // clusters
    rows = []
    for user in range(n_users):
        cluster = rng.integers(clusters)
        picked = rng.choice(size, size=4, replace=False) + cluster * size
        rows += [(f"u{user:03d}", f"i{item:03d}", label) for item, label in zip(picked, ("train", "train", "val", "test"))]
    frame = pd.DataFrame(rows, columns=["user", "item", "split"])
    dataset = build_dataset("clusters", frame, source="clusters.tsv", split=SplitStrategy("given"))
    index = {item: k for k, item in enumerate(dataset.item_ids)}
    mates = [(index[f"i{a:03d}"], index[f"i{b:03d}"]) for a in range(n_items) for b in range(n_items)
             if a != b and a // size == b // size and f"i{a:03d}" in index and f"i{b:03d}" in index]
    rows_, cols_ = zip(*mates)
    graph = sp.csr_matrix((np.full(len(mates), 0.9, np.float32), (rows_, cols_)), shape=(dataset.n_items,) * 2)
    return dataset, graph


def test_ease_matches_the_closed_form():
    dataset, _ = clustered_dataset()
    x = dataset.train.toarray().astype(np.float64)
    p = np.linalg.inv(x.T @ x + 50.0 * np.eye(x.shape[1]))
    expected = np.eye(x.shape[1]) - p / np.diag(p)
    np.testing.assert_allclose(ease_weights(dataset.train, 50.0), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="ease_lambda must be positive"):
        ease_weights(dataset.train, 0.0)


def test_ease_weights_are_cached_per_train_matrix_and_lambda(monkeypatch):
    import rectune.models.ease as ease

    dataset, _ = clustered_dataset()
    fits = []
    real = ease._fit_ease
    monkeypatch.setattr(ease, "_fit_ease", lambda *a: fits.append(a) or real(*a))
    monkeypatch.setattr(ease, "_cache", {})
    first = ease_weights(dataset.train, 20.0)
    assert ease_weights(dataset.train.copy(), 20.0) is first and len(fits) == 1
    assert not first.flags.writeable
    changed = dataset.train.tolil()
    changed[0, 0] = 1.0 - changed[0, 0]
    assert not np.array_equal(ease_weights(changed.tocsr(), 20.0), first) and len(fits) == 2
    ease_weights(dataset.train, 30.0)
    ease_weights(dataset.train, 20.0)  # evicted by the two fits since: computed again
    assert len(fits) == 4 and len(ease._cache) == 2


def recall_at(recall, dataset, split: str = "val", k: int = 5) -> float:
    users = np.flatnonzero(np.diff(dataset.split(split).indptr))
    items = recall.candidates(users, k, dataset.seen(split)).items
    target = dataset.split(split)[users].toarray()
    return float(np.mean(np.take_along_axis(target, np.maximum(items, 0), axis=1).sum(1) / target.sum(1)))


def test_popularity_and_ease_rank_unseen_items():
    dataset, _ = clustered_dataset()
    popular = PopularityRecall()
    popular.fit(dataset, FitContext())
    counts = np.asarray(dataset.train.sum(0)).ravel()
    items = popular.candidates(np.arange(3), 5, dataset.train).items
    for user, row in enumerate(items):
        assert not set(row) & set(dataset.train[user].indices)
        assert list(counts[row]) == sorted(counts[row], reverse=True)
    ease = EaseRecall(10.0)
    ease.fit(dataset, FitContext())
    assert recall_at(ease, dataset) > 2 * recall_at(popular, dataset)


# --------------------------------------------------------------------------- heuristic

def with_content(dataset, graphs: dict):
    return replace(dataset, content=ItemContent(graphs=graphs, sources={m: "test" for m in graphs}))


def fitted(dataset, **values) -> HeuristicRecall:
    config = PipelineConfig.from_dict({"pipeline": "heuristic", "ease_lambda": 10.0, **values})
    recall = build_recall(config)
    recall.fit(dataset, FitContext())
    return recall


def test_cf_weight_one_is_ease_and_content_helps_on_thin_data():
    dataset, graph = clustered_dataset()
    dataset = with_content(dataset, {"text": graph})
    ease = EaseRecall(10.0)
    ease.fit(dataset, FitContext())
    pure = fitted(dataset, cf_weight=1.0, popularity_weight=0.0)
    users = np.arange(dataset.n_users)
    # EASE rescaled: the same scores up to one factor, so the same score at every rank. (Not the same
    # item ids: the fixture's clusters tie items exactly, and float32 breaks such ties by one ulp.)
    scale = np.abs(pure.similarity).max() / np.abs(ease.weights).max()
    np.testing.assert_allclose(pure.similarity, ease.weights * scale, rtol=1e-5, atol=1e-7)
    ranked, reference = pure.candidates(users, 10, dataset.train), ease.candidates(users, 10, dataset.train)
    np.testing.assert_allclose(ranked.scores, reference.scores * scale, rtol=1e-5, atol=1e-7)
    assert (ranked.items == reference.items).mean() > 0.99
    blended = fitted(dataset, cf_weight=0.5, popularity_weight=0.0)
    assert "content: text" in blended.content_note
    assert recall_at(blended, dataset) > recall_at(pure, dataset) + 0.05


def test_a_noise_modality_is_weighed_by_text_weight():
    dataset, graph = clustered_dataset()
    rng = np.random.default_rng(9)
    noise = sp.random(dataset.n_items, dataset.n_items, density=0.15, random_state=rng, dtype=np.float32, format="csr")
    dataset = with_content(dataset, {"text": graph, "image": noise})
    text_only = fitted(dataset, cf_weight=0.3, popularity_weight=0.0, text_weight=1.0)
    image_only = fitted(dataset, cf_weight=0.3, popularity_weight=0.0, text_weight=0.0)
    assert recall_at(text_only, dataset) > recall_at(image_only, dataset) + 0.05
    np.testing.assert_allclose(text_only.similarity, fitted(with_content(dataset, {"text": graph}), cf_weight=0.3,
                                                           popularity_weight=0.0).similarity)


def test_modality_weights():
    assert modality_weights(("image", "text"), 0.9) == pytest.approx({"image": 0.1, "text": 0.9})
    assert modality_weights(("text",), 0.0) == {"text": 1.0}
    assert modality_weights(("audio", "image", "text"), 0.25) == pytest.approx({"audio": 0.5, "image": 0.375, "text": 0.125})


def test_normalised_graph_is_symmetric_and_degree_scaled():
    graph = sp.csr_matrix(np.array([[0, .9, 0, 0], [.5, 0, .4, 0], [0, 0, 0, -.3], [0, 0, 0, 0]], dtype=np.float32))
    normalised = normalised_graph(graph).toarray()
    np.testing.assert_allclose(normalised, normalised.T, rtol=1e-6)
    degree = np.array([.9, .9 + .4, .4, 0.0])  # the larger cosine of 0–1 both ways; negative edges dropped
    np.testing.assert_allclose(normalised[0, 1], .9 / np.sqrt(degree[0] * degree[1]), rtol=1e-6)
    np.testing.assert_allclose(normalised[1, 2], .4 / np.sqrt(degree[1] * degree[2]), rtol=1e-6)
    assert normalised[0, 2] == 0 and normalised[2, 3] == 0 and np.all(np.diag(normalised) == 0)


def test_without_content_the_heuristic_falls_back_and_says_so(tmp_path):
    pytest.importorskip("torch")
    from rectune.models.features import attach_item_features

    dataset, _ = clustered_dataset()
    recall = fitted(attach_item_features(dataset, cache_dir=tmp_path, collaborative_dim=8), embedding_dim=8, neighbors=5)
    assert "no item content on 'clusters'" in recall.content_note and "collaborative:svd8" in recall.content_note
    assert recall_at(recall, dataset) > 0
    with pytest.raises(ConfigError, match="text_weight must be in"):
        PipelineConfig.from_dict({"pipeline": "heuristic", "text_weight": 1.5})


def test_graph_embedding_places_content_neighbours_together():
    dataset, graph = clustered_dataset()
    embedding = graph_embedding({"text": graph}, dim=10)
    assert embedding.shape == (dataset.n_items, 10)
    np.testing.assert_array_equal(embedding, graph_embedding({"text": graph}, dim=10))  # deterministic
    unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    cosine = unit @ unit.T
    mates = graph.toarray() > 0
    off_diagonal = ~np.eye(len(mates), dtype=bool)
    assert cosine[mates].mean() > 0.9 and cosine[~mates & off_diagonal].mean() < 0.1


def test_item_content_matrix_joins_features_and_graph_embedding():
    dataset, graph = clustered_dataset()
    assert item_content_matrix(dataset) is None
    features = np.ones((dataset.n_items, 3), dtype=np.float32)
    plain = dataset.with_features(ItemFeatures(features, "test"))
    np.testing.assert_array_equal(item_content_matrix(plain), features)
    both = item_content_matrix(with_content(plain, {"text": graph}))
    assert both.shape == (dataset.n_items, 3 + min(content.EMBEDDING_DIM, dataset.n_items - 2))
    np.testing.assert_array_equal(both[:, :3], features)


def test_the_model_cache_key_changes_with_the_content_and_features():
    from rectune.tools.cache import dataset_fingerprint

    dataset, graph = clustered_dataset()
    features = ItemFeatures(np.ones((dataset.n_items, 4), np.float32), "test")
    base = with_content(replace(dataset, item_features=features), {"text": graph})
    reweighted = graph.copy()
    reweighted.data = reweighted.data * 0.5
    changed = {
        "another graph": with_content(replace(dataset, item_features=features), {"text": reweighted}),
        "another modality": with_content(replace(dataset, item_features=features), {"image": graph}),
        "no content": replace(dataset, item_features=features),
        "other features": with_content(replace(dataset, item_features=ItemFeatures(np.zeros((dataset.n_items, 4), np.float32),
                                                                                   "test")), {"text": graph}),
    }
    assert dataset_fingerprint(base) == dataset_fingerprint(with_content(replace(dataset, item_features=features), {"text": graph}))
    for name, other in changed.items():
        assert dataset_fingerprint(other) != dataset_fingerprint(base), name


def test_what_content_makes_inert_no_tuner_searches(tmp_path):
    from rectune.models.heuristic import inert_parameters
    from rectune.tools.space import SearchSpace

    write_baby_tsv(tmp_path)
    write_item_knn(tmp_path)
    both = load_amazon_baby(tmp_path)
    # At most 2 neighbours listed per item: every neighbors value from 10 up keeps them all.
    assert set(inert_parameters(both, 10)) == {"embedding_dim", "neighbors"}
    assert set(inert_parameters(both, 1)) == {"embedding_dim"}
    write_item_knn(tmp_path, [row for row in item_knn_rows() if row[2] == "text"])
    text_only = inert_parameters(load_amazon_baby(tmp_path), 10)
    assert set(text_only) == {"embedding_dim", "neighbors", "text_weight"} and "one content modality (text)" in text_only["text_weight"]
    bare = tmp_path / "bare"
    write_baby_tsv(bare)
    assert inert_parameters(load_amazon_baby(bare), 10) == {}  # the SVD fallback reads embedding_dim and neighbors

    space = SearchSpace.load().with_inert({"heuristic": text_only})
    tunable = {p.name for p in space.tunable("heuristic+deepfm", "ndcg@20")}
    assert not tunable & set(text_only) and "cf_weight" in tunable
    assert "embedding_dim" in {p.name for p in space.tunable("two_tower", "ndcg@20")}  # only the heuristic's
    assert "embedding_dim" not in space.describe("heuristic", "ndcg@20") and "embedding_dim" in space.describe("heuristic")
