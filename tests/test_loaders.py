"""Loaders, split strategies and the data-directory setting, on small synthetic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from rectune.agent.cli import app
from fixture_data import (
    BABY_HEADER, BABY_ROWS, CORE_USERS, ITEMS_2023, MOVIELENS_USERS, amazon_2014_records, amazon_2023_meta, amazon_2023_reviews,
    movie, movielens_ratings, write_amazon_2023_csv, write_baby_tsv, write_gz, write_jsonl, write_mmrec,
    write_movielens_atomic, write_movielens_original,
)
from rectune.models import config
from rectune.models.dataset import build_dataset
from rectune.models.errors import ConfigError, DataError, GroupError
from rectune.models.groups import make_groups
from rectune.models.loaders import load_amazon_2014, load_amazon_2023, load_amazon_baby, load_dataset, load_mmrec, load_movielens
from rectune.models.splits import TEST, TRAIN, VAL, SplitStrategy


def split_of(dataset, user, item) -> str | None:
    """Which split holds the raw (user, item) pair, or None."""
    u = int(np.searchsorted(dataset.user_ids, user))
    i = int(np.flatnonzero(dataset.item_ids == item)[0])
    hits = [name for name in ("train", "val", "test") if dataset.split(name)[u, i]]
    assert len(hits) <= 1
    return hits[0] if hits else None


def per_user(dataset, name: str) -> dict:
    counts = np.diff(dataset.split(name).indptr)
    return {user: int(c) for user, c in zip(dataset.user_ids.tolist(), counts)}


# --------------------------------------------------------------------------- Amazon Baby

def test_baby_shared_tsv_keeps_given_split_and_drops_duplicates(tmp_path):
    dataset = load_amazon_baby(write_baby_tsv(tmp_path).parent)
    summary = dataset.summary()
    assert (summary["users"], summary["items"], summary["interactions"]) == (3, 5, 12)
    assert (summary["train"], summary["val"], summary["test"]) == (6, 3, 3)
    assert summary["split"] == "given" and summary["duplicates_dropped"] == 1
    assert dataset.report.rows_read == len(BABY_ROWS) == 13
    # Indices follow sorted raw ids.
    assert dataset.user_ids.tolist() == ["A1AA", "A2BB", "A3CC"]
    assert dataset.item_ids.tolist() == ["B001", "B002", "B003", "B004", "B005"]
    for user, item, split in BABY_ROWS:
        assert split_of(dataset, user, item) == split
    assert dataset.test[2, 1] == 1  # A3CC / B002


def test_baby_resplit_random_overrides_given(tmp_path):
    write_baby_tsv(tmp_path)
    dataset = load_amazon_baby(tmp_path, SplitStrategy("random", seed=3))
    # Every user has ≥ 3 interactions, so each keeps exactly one val and one test.
    assert per_user(dataset, "val") == per_user(dataset, "test") == {"A1AA": 1, "A2BB": 1, "A3CC": 1}


def test_baby_falls_back_to_2014_reviews(tmp_path):
    records = amazon_2014_records()
    write_jsonl(tmp_path / "reviews_Baby_5.json.gz", records)
    dataset = load_amazon_baby(tmp_path, SplitStrategy("leave-last-out"))
    assert dataset.name == "baby" and (dataset.n_users, dataset.n_items) == (3, 5)
    for user in ("A1XX", "A2YY", "A3ZZ"):
        mine = sorted((r["unixReviewTime"], r["asin"]) for r in records if r["reviewerID"] == user)
        assert split_of(dataset, user, mine[-1][1]) == "test"
        assert split_of(dataset, user, mine[-2][1]) == "val"
        assert all(split_of(dataset, user, item) == "train" for _, item in mine[:-2])


def test_baby_directory_without_data_names_the_pull_command(tmp_path):
    with pytest.raises(DataError, match="rectune data pull baby") as info:
        load_amazon_baby(tmp_path)
    assert info.value.path == tmp_path


# --------------------------------------------------------------------------- MMRec

def test_mmrec_features_are_aligned_with_item_ids(tmp_path):
    path, text, image = write_mmrec(tmp_path)
    dataset = load_mmrec(tmp_path)
    assert dataset.report.sources == (str(path),)
    # Item 5 has no interaction but a feature row, so it still gets an index.
    assert dataset.item_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert (dataset.n_users, dataset.summary()["interactions"], dataset.report.duplicates_dropped) == (3, 11, 1)
    assert (dataset.train.nnz, dataset.val.nnz, dataset.test.nnz) == (5, 3, 3)
    assert dataset.train[1, 4] == 1 and dataset.val[2, 4] == 1 and dataset.test[0, 2] == 1
    features = dataset.item_features
    assert features.source == "npy:text_feat+image_feat" and features.matrix.shape == (6, 7)
    for item in range(6):
        expected = np.r_[text[item] / np.linalg.norm(text[item]), image[item] / np.linalg.norm(image[item])]
        np.testing.assert_allclose(features.matrix[item], expected, rtol=1e-5)


def test_mmrec_without_rating_and_timestamp(tmp_path):
    write_mmrec(tmp_path, with_rating=False, n_feature_rows=None)
    dataset = load_mmrec(tmp_path / "baby.inter")
    assert dataset.item_features is None and dataset.n_items == 5
    assert (dataset.train.nnz, dataset.val.nnz, dataset.test.nnz) == (5, 3, 3)
    with pytest.raises(DataError, match="leave-last-out needs a timestamp column"):
        load_mmrec(tmp_path, SplitStrategy("leave-last-out"))


def test_mmrec_without_x_label_is_split_randomly(tmp_path):
    (tmp_path / "toy.inter").write_text("userID\titemID\n" + "".join(f"0\t{i}\n" for i in range(10)))
    dataset = load_mmrec(tmp_path)
    assert dataset.report.split.startswith("random") and (dataset.train.nnz, dataset.val.nnz, dataset.test.nnz) == (8, 1, 1)
    with pytest.raises(DataError, match="split 'given' needs a split column"):
        load_mmrec(tmp_path, SplitStrategy("given"))


def test_mmrec_feature_files_must_agree(tmp_path):
    write_mmrec(tmp_path)
    np.save(tmp_path / "image_feat.npy", np.ones((7, 3)))
    with pytest.raises(DataError, match=r"disagree on the number of items: \[6, 7\]"):
        load_mmrec(tmp_path)
    np.save(tmp_path / "image_feat.npy", np.ones((4, 3)))
    np.save(tmp_path / "text_feat.npy", np.ones((4, 3)))
    with pytest.raises(DataError, match="outside the item range of the feature files"):
        load_mmrec(tmp_path)
    np.save(tmp_path / "text_feat.npy", np.ones(4))
    with pytest.raises(DataError, match=r"text_feat.npy: must be a 2-d array"):
        load_mmrec(tmp_path)


# --------------------------------------------------------------------------- Amazon 2023

def test_amazon_2023_csv_applies_5core_on_distinct_pairs(tmp_path):
    path = write_amazon_2023_csv(tmp_path / "all_beauty.csv")
    dataset = load_amazon_2023(path)
    assert dataset.name == "beauty-2023"
    # AHDUP has 5 reviews but only 4 distinct items: the 5-core must drop it.
    assert sorted(dataset.user_ids.tolist()) == sorted(CORE_USERS)
    assert dataset.item_ids.tolist() == ITEMS_2023
    assert dataset.report.notes == ("5-core filter kept 5 of 7 users",)
    summary = dataset.summary()
    assert (summary["interactions"], summary["duplicates_dropped"]) == (25, 1)
    assert (summary["train"], summary["val"], summary["test"]) == (15, 5, 5)
    assert load_amazon_2023(path, min_interactions=1).n_users == 7


def test_amazon_2023_jsonl_gz_with_meta(tmp_path):
    write_jsonl(tmp_path / "All_Beauty.jsonl.gz", amazon_2023_reviews())
    meta = write_jsonl(tmp_path / "meta_All_Beauty.jsonl", amazon_2023_meta())
    with pytest.warns(RuntimeWarning, match=f"3 of 5 items have no row in {meta}"):
        dataset = load_amazon_2023(tmp_path, SplitStrategy("leave-last-out"))
    assert dataset.summary()["notes"][-1] == f"3 of 5 items have no row in {meta} (e.g. 'B0ITEM3'); they are kept without text or categories"
    assert dataset.report.sources == (str(tmp_path / "All_Beauty.jsonl.gz"), str(tmp_path / "meta_All_Beauty.jsonl"))
    assert dataset.item_text == ["Rose Oil. Cold pressed. For skin.", "Comb", "", "", ""]
    assert dataset.item_categories == [("Beauty", "Oils"), ("All Beauty",), (), (), ()]
    # Reviews were written in time order, so each user's last one (item 5) is the test item.
    assert all(split_of(dataset, user, "B0ITEM5") == "test" for user in CORE_USERS)
    assert all(split_of(dataset, user, "B0ITEM4") == "val" for user in CORE_USERS)


def test_amazon_2023_jsonl_falls_back_to_asin(tmp_path):
    records = [{"user_id": f"U{u}", "asin": f"I{i}", "timestamp": 10 * u + i} for u in range(2) for i in range(3)]
    dataset = load_amazon_2023(write_jsonl(tmp_path / "r.jsonl", records), min_interactions=1)
    assert dataset.item_ids.tolist() == ["I0", "I1", "I2"]


# --------------------------------------------------------------------------- MovieLens

def check_movielens(dataset, title_suffix: str) -> None:
    assert (dataset.n_users, dataset.n_items, dataset.summary()["interactions"]) == (4, 20, 35)
    assert dataset.user_ids.tolist() == [1, 2, 3, 4] and dataset.item_ids.tolist() == list(range(1, 21))
    assert dataset.user_attributes.to_dict("list") == {
        "age": [r[1] for r in MOVIELENS_USERS], "gender": [r[2] for r in MOVIELENS_USERS], "occupation": [r[3] for r in MOVIELENS_USERS],
    }
    title, genres = movie(1)
    assert dataset.item_text[0] == f"{title}{title_suffix}. {' '.join(genres)}" and dataset.item_categories[0] == genres
    assert dataset.item_text[0].startswith("Café Society")


def test_movielens_recbole_atomic(tmp_path):
    check_movielens(load_movielens(write_movielens_atomic(tmp_path)), "")


def test_movielens_original_files(tmp_path):
    check_movielens(load_movielens(write_movielens_original(tmp_path)), " (1995)")
    # As unzipped from GroupLens: the files sit in an ml-100k/ sub-directory.
    nested = write_movielens_original(tmp_path / "zipped" / "ml-100k").parent
    check_movielens(load_movielens(nested), " (1995)")


@pytest.mark.parametrize("layout", ["original", "atomic"])
def test_movielens_users_and_items_without_a_row_are_counted(tmp_path, layout):
    # The ratings name user 4 and item 20; the user and item files no longer do.
    if layout == "original":
        directory = write_movielens_original(tmp_path)
        user_file, item_file = directory / "u.user", directory / "u.item"
    else:
        directory = write_movielens_atomic(tmp_path)
        user_file, item_file = directory / "ml-100k.user", directory / "ml-100k.item"
    for path in (user_file, item_file):
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:-1]))
    with pytest.warns(RuntimeWarning) as caught:
        dataset = load_movielens(directory)
    notes = [f"1 of 4 users have no row in {user_file} (e.g. 4); they are kept without attributes",
             f"1 of 20 items have no row in {item_file} (e.g. 20); they are kept without text or categories"]
    assert [str(w.message) for w in caught] == notes
    assert dataset.summary()["notes"] == notes and dataset.n_users == 4 and dataset.n_items == 20
    assert dataset.user_attributes.iloc[3].isna().all() and dataset.item_text[19] == "" and dataset.item_categories[19] == ()
    # Attribute groups give them an explicit unknown group. Without user 4 no one is a child
    # or elderly, so the age bands are refused by name (not a crash on the missing age).
    assert make_groups(dataset, "gender").sizes() == {"F": 1, "M": 2, "unknown": 1}
    with pytest.raises(GroupError, match=r"\['children', 'elderly'\] of 'age' have no users; sizes: .*'unknown': 1"):
        make_groups(dataset, "age")


def test_movielens_repeated_user_row_is_refused(tmp_path):
    directory = write_movielens_original(tmp_path)
    with (directory / "u.user").open("a") as handle:
        handle.write("2|30|M|writer|10001\n")
    assert_data_error(lambda: load_movielens(directory), directory / "u.user", "1 user id(s) have more than one row, e.g. 2")


def test_movielens_min_rating_keeps_only_high_ratings(tmp_path):
    dataset = load_movielens(write_movielens_atomic(tmp_path), min_rating=4)
    assert dataset.summary()["interactions"] == sum(1 for r in movielens_ratings() if r[2] >= 4)


def test_random_split_counts_per_user_and_seed(tmp_path):
    write_movielens_atomic(tmp_path)
    first = load_movielens(tmp_path, SplitStrategy("random", seed=7))
    # 10 → 8:1:1, 20 → 16:2:2, 3 → one each, 2 → too few to evaluate: all train.
    assert per_user(first, "train") == {1: 8, 2: 16, 3: 1, 4: 2}
    assert per_user(first, "val") == {1: 1, 2: 2, 3: 1, 4: 0}
    assert per_user(first, "test") == {1: 1, 2: 2, 3: 1, 4: 0}
    again = load_movielens(tmp_path, SplitStrategy("random", seed=7))
    other = load_movielens(tmp_path, SplitStrategy("random", seed=8))
    assert all((first.split(s) != again.split(s)).nnz == 0 for s in ("train", "val", "test"))
    assert (first.test != other.test).nnz > 0


def test_leave_last_out_puts_latest_in_test(tmp_path):
    dataset = load_movielens(write_movielens_atomic(tmp_path), SplitStrategy("leave-last-out"))
    rows = pd.DataFrame(movielens_ratings(), columns=["user", "item", "rating", "timestamp"])
    for user, mine in rows.groupby("user"):
        ordered = mine.sort_values("timestamp")["item"].tolist()
        expected = ["train"] * len(ordered) if len(ordered) < 3 else ["train"] * (len(ordered) - 2) + ["val", "test"]
        assert [split_of(dataset, user, item) for item in ordered] == expected


def test_random_split_counts_survive_float_error():
    frame = pd.DataFrame({"user": 0, "item": np.arange(180)})
    labels = SplitStrategy("random", (0.3, 0.35, 0.35)).assign(frame, "mem")
    # 180 × 0.35 is 62.99999999999999 in floating point; the share is still 63.
    assert np.bincount(labels).tolist() == [54, 63, 63]


def test_split_strategy_parse():
    assert SplitStrategy.parse("random:0.7,0.2,0.1", seed=5) == SplitStrategy("random", (0.7, 0.2, 0.1), 5)
    assert SplitStrategy.parse("leave-last-out").describe() == "leave-last-out"
    for bad, message in (("random:a,b,c", "must be numbers"), ("random:0.5,0.5,0.5", "summing to 1"),
                         ("given:x", "takes no options"), ("shuffle", "must be one of")):
        with pytest.raises(ConfigError, match=message):
            SplitStrategy.parse(bad)


def test_given_split_accepts_label_aliases():
    frame = pd.DataFrame({"user": [0, 0, 0, 0], "item": [0, 1, 2, 3], "split": ["Train", "valid", " 2 ", "validation"]})
    assert SplitStrategy("given").assign(frame, "mem").tolist() == [TRAIN, VAL, TEST, VAL]


# --------------------------------------------------------------------------- bad inputs

def assert_data_error(call, path: Path, problem: str) -> None:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert str(path) in message and problem in message, message
    assert "\n" not in message


def test_missing_file(tmp_path):
    write_movielens_original(tmp_path)
    (tmp_path / "u.item").unlink()
    assert_data_error(lambda: load_movielens(tmp_path), tmp_path / "u.item", "file not found")


def test_empty_files(tmp_path):
    (tmp_path / "u.data").touch()
    assert_data_error(lambda: load_movielens(tmp_path), tmp_path / "u.data", "file is empty")
    # A gzip of nothing is not zero bytes on disk, but is still empty.
    path = write_gz(tmp_path / "baby" / "interactions.tsv.gz", "")
    assert_data_error(lambda: load_amazon_baby(path.parent), path, "file is empty")
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text("\n\n")
    assert_data_error(lambda: load_amazon_2023(jsonl), jsonl, "has no records")


def test_header_only(tmp_path):
    path = tmp_path / "all_beauty.csv"
    path.write_text("user_id,parent_asin,rating,timestamp\n")
    assert_data_error(lambda: load_amazon_2023(path), path, "has a header but no rows")


def test_missing_column(tmp_path):
    path = write_gz(tmp_path / "interactions.tsv.gz", "reviewerID\tasin\nA1\tB1\n")
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "missing column(s) ['split']; found columns ['reviewerID', 'asin']")
    atomic = write_movielens_atomic(tmp_path / "ml")
    (atomic / "ml-100k.user").write_text("user_id:token\tage:token\n1\t20\n")
    assert_data_error(lambda: load_movielens(atomic), atomic / "ml-100k.user", "missing column(s) ['gender', 'occupation']")
    records = tmp_path / "no_user.jsonl"
    write_jsonl(records, [{"parent_asin": "B1"}])
    assert_data_error(lambda: load_amazon_2023(records), records, "missing field 'user_id' in every record")


def test_unknown_split_label(tmp_path):
    path = write_baby_tsv(tmp_path, [*BABY_ROWS, ("A4DD", "B001", "holdout"), ("A4DD", "B002", "holdout")])
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "unknown split label(s) {'holdout': 2}")


def test_bad_json_lines(tmp_path):
    path = tmp_path / "All_Beauty.jsonl"
    path.write_text('{"user_id": "U1", "parent_asin": "B1"}\n{"user_id": "U2", "parent_asin": \n')
    assert_data_error(lambda: load_amazon_2023(path), path, "line 2 is not valid JSON")
    path.write_text('{"user_id": "U1", "parent_asin": "B1"}\n\n["U2", "B2"]\n')
    assert_data_error(lambda: load_amazon_2023(path), path, "line 3 is a JSON list, not an object")
    path.write_text('{"user_id": "U1", "parent_asin": "B1"}\n{"user_id": "U2"}\n')
    assert_data_error(lambda: load_amazon_2023(path), path, "record 2 has neither 'parent_asin' nor 'asin'")
    meta = write_jsonl(tmp_path / "meta.jsonl", [{"title": "no id"}])
    path.write_text('{"user_id": "U1", "parent_asin": "B1"}\n')
    assert_data_error(lambda: load_amazon_2023(path, meta=meta, min_interactions=1), meta, "missing field 'parent_asin'")


def test_not_gzip(tmp_path):
    path = tmp_path / "reviews_Baby_5.json.gz"
    path.write_text('{"reviewerID": "A1", "asin": "B1"}\n')
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "cannot be read: Not a gzipped file")


def test_non_numeric_values(tmp_path):
    path = tmp_path / "baby.inter"
    path.write_text("userID\titemID\tx_label\n0\t1\t0\nu7\t2\t0\n")
    assert_data_error(lambda: load_mmrec(path), path, "column 'userID' has a non-numeric value 'u7' (data row 2)")
    data = write_movielens_original(tmp_path / "ml") / "u.data"
    data.write_text("1\t1\t5\t881250949\n1\tx\t5\t881250950\n")
    assert_data_error(lambda: load_movielens(data.parent), data, "column 'item_id' has a non-numeric value 'x'")
    reviews = write_jsonl(tmp_path / "r.json", [{"reviewerID": "A1", "asin": "B1", "unixReviewTime": "soon"}])
    assert_data_error(lambda: load_amazon_2014(reviews), reviews, "column 'unixReviewTime' has a non-numeric value 'soon'")


def test_bad_npy(tmp_path):
    write_mmrec(tmp_path)
    (tmp_path / "image_feat.npy").write_bytes(b"not numpy")
    assert_data_error(lambda: load_mmrec(tmp_path), tmp_path / "image_feat.npy", "is not a readable .npy array")


def test_nothing_survives_the_5core(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"user_id": "U1", "parent_asin": "B1", "timestamp": 1}])
    assert_data_error(lambda: load_amazon_2023(path), path, "no user and item is left after the 5-core filter")


def test_non_finite_npy_features_are_refused(tmp_path):
    _, text, _ = write_mmrec(tmp_path)
    text[0, 1], text[3, 2], text[3, 3] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "text_feat.npy", text)
    assert_data_error(lambda: load_mmrec(tmp_path), tmp_path / "text_feat.npy", "has 3 NaN or infinite value(s) (as float32) in 2 of 6 rows")
    # Finite in float64, infinite once read as float32.
    write_mmrec(tmp_path)
    np.save(tmp_path / "image_feat.npy", np.full((6, 3), 1e300))
    assert_data_error(lambda: load_mmrec(tmp_path), tmp_path / "image_feat.npy", "has 18 NaN or infinite value(s) (as float32) in 6 of 6 rows")


def test_blank_ids_are_dropped_and_counted_like_duplicates(tmp_path):
    write_baby_tsv(tmp_path, [*BABY_ROWS, ("", "B001", "train"), ("A1AA", " ", "test"), ("  ", "", "val")])
    dataset = load_amazon_baby(tmp_path)
    summary = dataset.summary()
    assert (summary["users"], summary["items"], summary["interactions"]) == (3, 5, 12)
    assert (summary["blank_ids_dropped"], summary["duplicates_dropped"], dataset.report.rows_read) == (3, 1, 16)
    # Integer ids (MMRec, MovieLens) take the same path.
    path = tmp_path / "toy.inter"
    path.write_text("userID\titemID\tx_label\n0\t1\t0\n\t2\t0\n0\t\t1\n1\t1\t2\n0\t1\t0\n")
    dataset = load_mmrec(path)
    assert dataset.user_ids.dtype == np.int64 and dataset.user_ids.tolist() == [0, 1] and dataset.item_ids.tolist() == [1]
    assert (dataset.report.blank_ids_dropped, dataset.report.duplicates_dropped) == (2, 1)
    path.write_text("userID\titemID\tx_label\n\t1\t0\n0\t \t0\n")
    assert_data_error(lambda: load_mmrec(path), path, "no interactions: all 2 rows have a blank user or item id")
    path.write_text("userID\titemID\tx_label\n0\t1\t0\n1.5\t1\t0\n")
    assert_data_error(lambda: load_mmrec(path), path, "column 'userID' has a non-integer id '1.5' (data row 2)")


def test_rows_with_extra_fields_name_the_line(tmp_path):
    header = "\t".join(BABY_HEADER)
    path = write_gz(tmp_path / "interactions.tsv.gz", f"{header}\nA1\tB1\t0\t0\t0\t0\ttrain\tx\ty\nA1\tB2\t0\t1\t0\t1\ttest\n")
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "line 2 has 9 fields, but the header has 7")
    write_gz(path, f"{header}\nA1\tB1\t0\t0\t0\t0\ttrain\nA1\tB2\t0\t1\t0\t1\ttest\textra\n")
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "line 3 has 8 fields, but the header has 7")
    write_gz(path, "reviewerID\tasin\tasin\tsplit\nA1\tB1\tB1\ttrain\n")
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "the header repeats column(s) ['asin']")
    data = write_movielens_original(tmp_path / "ml") / "u.data"
    data.write_text("1\t1\t5\t881250949\t7\n1\t2\t5\t881250950\t7\n")
    assert_data_error(lambda: load_movielens(data.parent), data, "line 1 has 5 fields, but expected 4 (user_id, item_id, rating, timestamp)")
    data.write_text("1\t1\t5\t881250949\n1\t2\t5\t881250950\t7\n")
    assert_data_error(lambda: load_movielens(data.parent), data, "line 2 has 5 fields, but the first line has 4")


def test_loaders_accept_a_file_of_their_directory(tmp_path):
    directory = write_movielens_original(tmp_path / "original")
    for path in (directory / "u.data", write_movielens_atomic(tmp_path / "atomic") / "ml-100k.inter.gz"):
        check_movielens(load_dataset(path, format="movielens"), " (1995)" if path.name == "u.data" else "")
    assert load_dataset(write_baby_tsv(tmp_path / "baby"), format="baby").n_users == 3
    assert_data_error(lambda: load_dataset(directory / "u.item", format="movielens"), directory / "u.item",
                      "is a file; expected a directory holding ml-100k.inter.gz or ml-100k.inter or u.data, or one of those files")


def test_build_dataset_checks_columns():
    with pytest.raises(DataError, match="mem: missing column 'item'"):
        build_dataset("x", pd.DataFrame({"user": [1]}), source="mem", split=SplitStrategy())


# --------------------------------------------------------------------------- registry and data directory

@pytest.fixture
def isolated_config(tmp_path, monkeypatch):
    """No env var, no config file outside tmp_path, cwd = tmp_path."""
    monkeypatch.delenv(config.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(config, "CONFIG_FILES", (Path("rectune.toml"),))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_data_dir_resolution_order(isolated_config, monkeypatch):
    assert config.data_dir() == Path("data")
    (isolated_config / "rectune.toml").write_text('data_dir = "from-file"\n')
    assert config.data_dir() == Path("from-file")
    monkeypatch.setenv(config.DATA_DIR_ENV, "from-env")
    assert config.data_dir() == Path("from-env")
    assert config.data_dir("from-flag") == Path("from-flag")


def test_data_dir_config_file_errors(isolated_config):
    (isolated_config / "rectune.toml").write_text("data_dir = \n")
    with pytest.raises(ConfigError, match="rectune.toml: not valid TOML"):
        config.data_dir()
    (isolated_config / "rectune.toml").write_text("data_dir = 3\n")
    with pytest.raises(ConfigError, match="'data_dir' must be a string path"):
        config.data_dir()


def test_load_dataset_by_name_from_data_dir(isolated_config, monkeypatch):
    write_movielens_atomic(isolated_config / "store" / "movielens-100k")
    monkeypatch.setenv(config.DATA_DIR_ENV, str(isolated_config / "store"))
    assert load_dataset("ml-100k").n_users == 4
    with pytest.raises(DataError, match=r"dataset 'baby' is not in the data directory .*rectune data pull baby"):
        load_dataset("baby")
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope': neither a registered name \['baby', 'beauty-2023', 'ml-100k'\] nor a path"):
        load_dataset("nope")
    with pytest.raises(ConfigError, match="unknown format 'xml'"):
        load_dataset("anything", format="xml")
    path = write_amazon_2023_csv(isolated_config / "x" / "reviews.csv")
    assert load_dataset(path, format="amazon2023").n_users == 5


runner = CliRunner()


def test_cli_data_info_and_list(tmp_path):
    write_movielens_original(tmp_path / "movielens-100k")
    result = runner.invoke(app, ["data", "info", "ml-100k", "--data-dir", str(tmp_path), "--split", "leave-last-out"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["users"], summary["items"], summary["test"], summary["split"]) == (4, 20, 3, "leave-last-out")
    listing = runner.invoke(app, ["data", "list", "--data-dir", str(tmp_path)]).stdout
    assert "ml-100k      present" in listing and "baby         missing" in listing


def test_cli_data_info_errors_are_one_line(tmp_path):
    write_movielens_original(tmp_path / "movielens-100k")
    (tmp_path / "movielens-100k" / "u.data").write_text("1\t1\t5\n")
    result = runner.invoke(app, ["data", "info", "ml-100k", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert "u.data: column 'timestamp' has a non-numeric value" in result.stderr
    bad_split = runner.invoke(app, ["data", "info", "ml-100k", "--data-dir", str(tmp_path), "--split", "random:x"])
    assert bad_split.exit_code == 2 and "split ratios must be numbers" in bad_split.stderr


def test_a_short_row_is_named_by_its_line(tmp_path):
    header = "\t".join(BABY_HEADER)
    rows = "A1\tB1\t0\t0\t0\t0\ttrain\nA1\tB2\t0\t1\t0\t1\tval\n\nA1\tB3\t0\t2\nA1\tB4\t0\t3\t0\t3\ttest\n"
    path = write_gz(tmp_path / "interactions.tsv.gz", f"{header}\n{rows}")
    # Line 4 is blank (skipped); the short row is line 5, read as data row 3.
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "line 5 has 4 fields, but the header has 7")
    # An empty field is a field: the split check still names the value.
    write_gz(path, f"{header}\nA1\tB1\t0\t0\t0\t0\t\nA1\tB2\t0\t1\t0\t1\ttest\n")
    assert_data_error(lambda: load_amazon_baby(tmp_path), path, "unknown split label(s) {'': 1}")


def test_negative_ages_are_named_in_plain_numbers_with_their_file(tmp_path):
    directory = write_movielens_original(tmp_path / "ml")
    users = directory / "u.user"
    users.write_text(users.read_text().replace("2|53|F", "2|-4|F"))
    with pytest.raises(GroupError) as error:
        make_groups(load_movielens(directory), "age")
    message = str(error.value)
    assert "e.g. user 2 has age -4" in message and f"(in {users})" in message
    assert "np." not in message and "\n" not in message


def all_train_baby(directory: Path, labels: dict[str, str] | None = None) -> Path:
    """The planted Baby-format file with every split label replaced by `labels` (default: all train)."""
    import gzip

    from conftest import write_baby_format

    path = write_baby_format(directory) / "amazon-baby" / "interactions.tsv.gz"
    lines = gzip.open(path, "rt").read().splitlines()
    swap = labels or {"val": "train", "test": "train"}
    rewritten = [lines[0]] + [line.rsplit("\t", 1)[0] + "\t" + swap.get(line.rsplit("\t", 1)[1], line.rsplit("\t", 1)[1])
                              for line in lines[1:]]
    write_gz(path, "\n".join(rewritten) + "\n")
    return path


def test_a_split_without_held_out_rows_is_refused_up_front(tmp_path):
    from rectune.models.groups import require_held_out

    path = all_train_baby(tmp_path / "data")
    # `data info` still shows the file, with a warning on stderr.
    info = runner.invoke(app, ["data", "info", "baby", "--data-dir", str(tmp_path / "data")])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["val"] == 0
    warnings = info.stderr.splitlines()
    assert any(line.startswith("warning: ") and "no validation rows" in line and "refuse" in line for line in warnings), info.stderr
    dataset = load_amazon_baby(path.parent)
    with pytest.raises(DataError, match="no validation rows") as error:
        require_held_out(dataset, make_groups(dataset, "all"))
    assert str(path) in str(error.value)
    with pytest.raises(DataError, match="no test rows"):
        require_held_out(dataset, make_groups(dataset, "all"), ("test",))


def test_a_group_without_a_user_with_a_held_out_item_is_refused():
    from rectune.models.groups import require_held_out

    # Users a and b have validation and test items; c and d only train ones.
    rows = [(u, f"i{j}", s) for u in "ab" for j, s in enumerate(("train", "train", "val", "test"))]
    rows += [(u, f"i{j}", "train") for u in "cd" for j in range(4)]
    frame = pd.DataFrame(rows, columns=["user", "item", "split"])
    dataset = build_dataset("t", frame, source="t.tsv", split=SplitStrategy("given"))
    groups = make_groups(dataset, "prefix:1:4")  # one group per user
    with pytest.raises(GroupError, match=r"group 'c' of 'prefix:1:4' has no user with a validation item \(1 users\)"):
        require_held_out(dataset, groups)
    require_held_out(dataset, make_groups(dataset, "all"))  # together they are scored
