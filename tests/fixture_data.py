"""Small synthetic files in the real format of each source, for the loader and download tests.

Each writer returns what it wrote, so tests can derive expected values from the same rows.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from rectune.models.loaders import MOVIELENS_GENRES

BABY_HEADER = ("reviewerID", "asin", "mmrec_userID", "mmrec_itemID", "lattice_userID", "lattice_itemID", "split")
# (reviewerID, asin, split); A2BB/B002 appears twice, so 13 rows hold 12 interactions.
BABY_ROWS = [
    ("A1AA", "B001", "train"), ("A1AA", "B002", "train"), ("A1AA", "B003", "train"), ("A1AA", "B004", "val"), ("A1AA", "B005", "test"),
    ("A2BB", "B002", "train"), ("A2BB", "B003", "train"), ("A2BB", "B001", "val"), ("A2BB", "B004", "test"), ("A2BB", "B002", "train"),
    ("A3CC", "B005", "train"), ("A3CC", "B001", "val"), ("A3CC", "B002", "test"),
]


def write_gz(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(record) + "\n" for record in records)
    if path.suffix == ".gz":
        return write_gz(path, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_baby_tsv(directory: Path, rows: list[tuple[str, str, str]] = BABY_ROWS) -> Path:
    users = {u: k for k, u in enumerate(sorted({r[0] for r in rows}))}
    items = {i: k for k, i in enumerate(sorted({r[1] for r in rows}))}
    lines = ["\t".join(BABY_HEADER)]
    lines += [f"{u}\t{i}\t{users[u]}\t{items[i]}\t{users[u]}\t{items[i]}\t{split}" for u, i, split in rows]
    return write_gz(directory / "interactions.tsv.gz", "\n".join(lines) + "\n")


def amazon_2014_records() -> list[dict]:
    """Three reviewers with 4, 3 and 5 reviews; review times deliberately out of file order."""
    plan = {"A1XX": ["P1", "P2", "P3", "P4"], "A2YY": ["P2", "P3", "P5"], "A3ZZ": ["P1", "P2", "P3", "P4", "P5"]}
    times = iter([1300000300, 1300000100, 1300000400, 1300000200, 1300000900, 1300000700, 1300000800,
                  1300000050, 1300000010, 1300000090, 1300000030, 1300000020])
    return [
        {"reviewerID": user, "asin": item, "reviewerName": "x", "helpful": [0, 0], "reviewText": "fine",
         "overall": 5.0, "summary": "ok", "unixReviewTime": next(times), "reviewTime": "03 13, 2011"}
        for user, items in plan.items() for item in items
    ]


CORE_USERS = ["AEUSER1", "AFUSER2", "AGUSER3", "AHUSER4", "AEUSER5"]
ITEMS_2023 = ["B0ITEM1", "B0ITEM2", "B0ITEM3", "B0ITEM4", "B0ITEM5"]


def amazon_2023_reviews() -> list[dict]:
    """Five users × five items (a 5-core), one repeated review, and two users the
    5-core filter must drop: AFSOLO (1 review) and AHDUP (5 reviews of only 4 items)."""
    rows = [(u, i) for u in CORE_USERS for i in ITEMS_2023] + [(CORE_USERS[0], ITEMS_2023[0])]
    rows += [("AFSOLO", ITEMS_2023[2])] + [("AHDUP", i) for i in ITEMS_2023[:4]] + [("AHDUP", ITEMS_2023[0])]
    return [
        {"rating": 5.0, "title": "t", "text": "x", "images": [], "asin": item + "X", "parent_asin": item, "user_id": user,
         "timestamp": 1600000000000 + 1000 * k, "helpful_vote": 0, "verified_purchase": True}
        for k, (user, item) in enumerate(rows)
    ]


def write_amazon_2023_csv(path: Path) -> Path:
    lines = ["user_id,parent_asin,rating,timestamp"]
    lines += [f"{r['user_id']},{r['parent_asin']},{r['rating']},{r['timestamp']}" for r in amazon_2023_reviews()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def amazon_2023_meta() -> list[dict]:
    base = {"average_rating": 4.5, "rating_number": 10, "features": [], "images": [], "videos": [], "store": "S", "details": {}, "bought_together": None}
    return [
        {**base, "main_category": "All Beauty", "title": "Rose Oil", "description": ["Cold pressed.", "For skin."],
         "price": 9.99, "categories": ["Beauty", "Oils"], "parent_asin": "B0ITEM1"},
        {**base, "main_category": "All Beauty", "title": "Comb", "description": [], "price": None, "categories": [], "parent_asin": "B0ITEM2"},
        {**base, "main_category": None, "title": "Not reviewed", "description": [], "price": 1.0, "categories": ["X"], "parent_asin": "B0OTHER"},
    ]


def movielens_ratings() -> list[tuple[int, int, int, int]]:
    """(user, item, rating, timestamp): users 1–4 rate 10, 20, 3 and 2 movies, in shuffled time order."""
    rng = np.random.default_rng(0)
    rows = []
    for user, count in ((1, 10), (2, 20), (3, 3), (4, 2)):
        times = 880000000 + 100 * user * 1000 + rng.permutation(count) * 60
        rows += [(user, item, 1 + (item + user) % 5, int(t)) for item, t in zip(range(1, count + 1), times)]
    return rows


MOVIELENS_USERS = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "94043"),
                   (3, 23, "M", "writer", "32067"), (4, 9, "F", "student", "15213")]


def movie(item: int) -> tuple[str, tuple[str, ...]]:
    """(title without year, genres in MovieLens order); item 1's title needs latin-1."""
    genres = (MOVIELENS_GENRES[1 + item % 18], MOVIELENS_GENRES[1 + (item * 5) % 18])
    return ("Café Society" if item == 1 else f"Movie {item}"), tuple(g for g in MOVIELENS_GENRES if g in genres)


def write_movielens_atomic(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_gz(directory / "ml-100k.inter.gz", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
             + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in movielens_ratings()))
    (directory / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                            + "".join(f"{i}\t{movie(i)[0]}\t1995\t{' '.join(movie(i)[1])}\n" for i in range(1, 21)))
    (directory / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                            + "".join("\t".join(map(str, row)) + "\n" for row in MOVIELENS_USERS))
    return directory


def movielens_original_files() -> dict[str, bytes]:
    """u.data (tab-separated), u.item ('|'-separated, latin-1, 19 genre flags) and u.user."""
    data = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in movielens_ratings())
    items = ""
    for item in range(1, 21):
        title, genres = movie(item)
        flags = "|".join("1" if g in genres else "0" for g in MOVIELENS_GENRES)
        items += f"{item}|{title} (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?{item}|{flags}\n"
    users = "".join("|".join(map(str, row)) + "\n" for row in MOVIELENS_USERS)
    return {"u.data": data.encode(), "u.item": items.encode("latin-1"), "u.user": users.encode()}


def write_movielens_original(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in movielens_original_files().items():
        (directory / name).write_bytes(content)
    return directory


def movielens_zip(members: tuple[str, ...] = ("u.data", "u.item", "u.user")) -> bytes:
    """An archive laid out like GroupLens' ml-100k.zip: everything under `ml-100k/`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ml-100k/", "")
        archive.writestr("ml-100k/README", "MovieLens 100K fixture")
        for name, content in movielens_original_files().items():
            if name in members:
                archive.writestr(f"ml-100k/{name}", content)
    return buffer.getvalue()


MMREC_ROWS = [  # userID, itemID, rating, timestamp, x_label; the 0/3 pair is repeated
    (0, 0, 5.0, 1373932800, 0), (0, 3, 4.0, 1373932900, 0), (0, 1, 5.0, 1373933000, 1), (0, 2, 3.0, 1373933100, 2),
    (1, 4, 5.0, 1363996800, 0), (1, 0, 5.0, 1363996900, 1), (1, 3, 2.0, 1363997000, 2),
    (2, 1, 4.0, 1370000000, 0), (2, 2, 5.0, 1370000100, 0), (2, 4, 1.0, 1370000200, 1), (2, 0, 5.0, 1370000300, 2),
    (0, 3, 4.0, 1373999999, 0),
]


def write_mmrec(directory: Path, with_rating: bool = True, n_feature_rows: int | None = 6) -> tuple[Path, np.ndarray | None, np.ndarray | None]:
    """`baby.inter` plus, unless n_feature_rows is None, text (4-d) and image (3-d) features."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = ("userID", "itemID", "rating", "timestamp", "x_label") if with_rating else ("userID", "itemID", "x_label")
    rows = [r if with_rating else (r[0], r[1], r[4]) for r in MMREC_ROWS]
    path = directory / "baby.inter"
    path.write_text("\t".join(columns) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    if n_feature_rows is None:
        return path, None, None
    rng = np.random.default_rng(1)
    text, image = rng.normal(size=(n_feature_rows, 4)), rng.normal(size=(n_feature_rows, 3))
    np.save(directory / "text_feat.npy", text)
    np.save(directory / "image_feat.npy", image)
    return path, text, image


KNN_HEADER = ("asin", "neighbor_asin", "modality", "cosine")


def item_knn_rows() -> list[tuple[str, str, str, str]]:
    """Neighbour lists over BABY_ROWS' five items: each item is its own first neighbour
    (cosine 1, as in MMRec's graphs), then two text and one image neighbour."""
    items = sorted({r[1] for r in BABY_ROWS})
    rows = []
    for k, item in enumerate(items):
        rows += [(item, item, "text", "1.000000"), (item, items[(k + 1) % 5], "text", "0.800000"),
                 (item, items[(k + 2) % 5], "text", "0.300000"),
                 (item, item, "image", "1.000000"), (item, items[(k + 4) % 5], "image", "0.600000")]
    return rows


def write_item_knn(directory: Path, rows: list[tuple[str, ...]] | None = None,
                   header: tuple[str, ...] = KNN_HEADER) -> Path:
    rows = item_knn_rows() if rows is None else rows
    text = "\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
    return write_gz(directory / "item_knn.tsv.gz", text)
