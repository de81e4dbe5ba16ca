"""Loaders for the supported sources, and the registry of named datasets.

Each loader reads real files in the format the public source ships (or the format of
our shared copies), checks what it reads, and fails with a `DataError` that names the
file and the problem.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from rectune.models.config import data_dir as resolve_data_dir
from rectune.models.dataset import Dataset, ItemContent, ItemFeatures, build_dataset
from rectune.models.errors import ConfigError, DataError
from rectune.models.formats import LOADER_FUNCTIONS
from rectune.models.splits import SplitStrategy

# pandas' tokenizer error for a row with too many fields.
_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")

MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


# --------------------------------------------------------------------------- reading

def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "is not a regular file")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")


def read_table(path: Path, required: tuple[str, ...], sep: str = "\t", names: list[str] | None = None, **kwargs) -> pd.DataFrame:
    """Read a delimited file whose first line is the header (or, with `names`, a file
    without one); strip RecBole `name:type` suffixes; check columns and field counts."""
    _check_file(path)
    what = f"{'tab' if sep == chr(9) else repr(sep)}-separated table"
    try:
        # header=None: with a header row, pandas takes extra fields on the first data row
        # for an index and shifts every column left (a 5-field row under a 3-field header
        # had its 5th field read as the split label); read as plain rows, any line with
        # extra fields is a tokenizer error that names the line.
        frame = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, **kwargs)
    except pd.errors.ParserError as exc:
        counts = _FIELD_COUNT.search(str(exc))
        if counts:
            expected, line, saw = counts.groups()
            raise DataError(path, f"line {line} has {saw} fields, but the {'header' if names is None else 'first line'} has {expected}") from exc
        raise DataError(path, f"cannot be parsed as a {what}: {exc}") from exc
    except (UnicodeDecodeError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise DataError(path, f"cannot be parsed as a {what}: {exc}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(path, "file is empty") from exc
    if names is None:
        columns = [str(c).split(":")[0].strip() for c in frame.iloc[0]]
        frame = frame.iloc[1:].reset_index(drop=True)
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise DataError(path, f"the header repeats column(s) {repeated}")
        # pandas fills a short row's missing fields with '' (keep_default_na=False), like empty
        # fields: only a row ending in '' can be short, and only then is the file read again.
        if frame.shape[1] > 1 and frame.iloc[:, -1].eq("").any():
            short = _short_line(path, sep, len(columns), kwargs.get("encoding", "utf-8"))
            if short is not None:
                raise DataError(path, f"line {short[0]} has {short[1]} fields, but the header has {len(columns)}")
    else:
        if frame.shape[1] > len(names):
            raise DataError(path, f"line 1 has {frame.shape[1]} fields, but expected {len(names)} ({', '.join(names)})")
        # Short rows keep their missing fields as '' (the column checks then name them).
        frame = frame.reindex(columns=range(len(names)), fill_value="")
        columns = list(names)
    frame.columns = columns
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found columns {list(frame.columns)}")
    if frame.empty:
        raise DataError(path, "has a header but no rows")
    return frame


def _short_line(path: Path, sep: str, expected: int, encoding: str) -> tuple[int, int] | None:
    """(line number, field count) of the first non-blank line with fewer than `expected` fields."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=sep)
        try:
            for row in reader:
                if row and len(row) < expected:
                    return reader.line_num, len(row)
        except csv.Error:  # a field over csv's size limit: pandas read it, so no line is named
            return None
    return None


def read_jsonl(path: Path, fields: tuple[str, ...], required: tuple[str, ...]) -> pd.DataFrame:
    """Read JSON lines (optionally gzipped), keeping `fields`; a bad line names its number."""
    _check_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[dict] = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(path, f"line {number} is not valid JSON ({exc.msg})") from exc
                # A valid JSON value that is not an object (a list, a string) has no fields to read.
                if not isinstance(record, dict):
                    raise DataError(path, f"line {number} is a JSON {type(record).__name__}, not an object")
                records.append({k: record.get(k) for k in fields})
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot be read: {exc}") from exc
    if not records:
        raise DataError(path, "has no records")
    frame = pd.DataFrame.from_records(records, columns=list(fields))
    for column in required:
        if frame[column].isna().all():
            raise DataError(path, f"missing field {column!r} in every record")
        if frame[column].isna().any():
            line = int(frame.index[frame[column].isna()][0]) + 1
            raise DataError(path, f"record {line} has no {column!r}")
    return frame


def _numeric(frame: pd.DataFrame, column: str, path: Path, blank_ok: bool = False) -> pd.Series:
    """The column as numbers; with `blank_ok`, blank cells become NaN instead of an error."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna()
    if blank_ok:
        bad &= frame[column].astype(str).str.strip().ne("")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(path, f"column {column!r} has a non-numeric value {frame[column].iloc[row]!r} (data row {row + 1})")
    return values


def _integer_ids(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """Integer ids; blank ones stay missing so that `build_dataset` drops and counts them."""
    values = _numeric(frame, column, path, blank_ok=True)
    fractional = values.notna() & (values != np.floor(values))
    if fractional.any():
        row = int(np.flatnonzero(fractional.to_numpy())[0])
        raise DataError(path, f"column {column!r} has a non-integer id {frame[column].iloc[row]!r} (data row {row + 1})")
    return values.astype("Int64")


def kcore(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Keep users and items with ≥ k interactions, repeated until stable (the 5-core rule)."""
    while True:
        # Count distinct user–item pairs: repeated reviews are dropped later as duplicates,
        # so counting them here would let users and items below k through.
        pairs = frame.drop_duplicates(["user", "item"])
        users = frame["user"].map(pairs["user"].value_counts())
        items = frame["item"].map(pairs["item"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            return frame
        frame = frame[keep]


def _directory_of(path: Path, names: tuple[str, ...]) -> Path:
    """The directory a loader reads: `path` itself, or the directory of one of its files."""
    if path.is_file():
        if path.name in names:
            return path.parent
        raise DataError(path, f"is a file; expected a directory holding {' or '.join(names)}, or one of those files")
    return path


def _find(directory: Path, *names: str) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _l2_normalise(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- loaders

_BABY_FILES = ("interactions.tsv.gz", "interactions.tsv", "reviews_Baby_5.json.gz", "reviews_Baby_5.json")
_MOVIELENS_FILES = ("ml-100k.inter.gz", "ml-100k.inter", "u.data")


def load_amazon_baby(directory: Path, split: SplitStrategy | None = None) -> Dataset:
    """Amazon Baby 5-core: our shared `interactions.tsv.gz` (raw ids and the LATTICE split)
    or, as `rectune data pull baby` fetches it, the 2014 `reviews_Baby_5.json.gz`."""
    directory = _directory_of(directory, _BABY_FILES)
    tsv = _find(directory, *_BABY_FILES[:2])
    if tsv is not None:
        frame = read_table(tsv, ("reviewerID", "asin", "split"))
        interactions = frame.rename(columns={"reviewerID": "user", "asin": "item"})[["user", "item", "split"]]
        return with_neighbour_lists(build_dataset("baby", interactions, source=tsv, split=split or SplitStrategy("given")), directory)
    reviews = _find(directory, *_BABY_FILES[2:])
    if reviews is None:
        raise DataError(directory, "no interactions.tsv.gz or reviews_Baby_5.json.gz here (try `rectune data pull baby`)")
    return load_amazon_2014(reviews, split, name="baby")


def load_amazon_2014(path: Path, split: SplitStrategy | None = None, name: str = "amazon-2014") -> Dataset:
    """Amazon reviews 2014 JSON lines (`reviewerID`, `asin`, `overall`, `unixReviewTime`)."""
    frame = read_jsonl(path, ("reviewerID", "asin", "overall", "unixReviewTime"), ("reviewerID", "asin"))
    interactions = pd.DataFrame({"user": frame["reviewerID"].astype(str), "item": frame["asin"].astype(str)})
    if frame["unixReviewTime"].notna().all():
        interactions["timestamp"] = _numeric(frame, "unixReviewTime", path).astype("int64")
    return build_dataset(name, interactions, source=path, split=split or SplitStrategy("random"))


def load_amazon_2023(path: Path, split: SplitStrategy | None = None, meta: Path | None = None, min_interactions: int = 5) -> Dataset:
    """Amazon Reviews 2023 (`user_id, parent_asin, rating, timestamp`) as csv or jsonl[.gz].

    `path` may be a directory: it then holds one review file and optionally a
    `meta_*.jsonl[.gz]` with item title, description, categories and price.
    Users and items are filtered to the `min_interactions`-core (the raw dumps are not).
    """
    if path.is_dir():
        directory = path
        reviews = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("meta") and p.name.endswith((".csv", ".jsonl", ".jsonl.gz", ".csv.gz")))
        if not reviews:
            raise DataError(directory, "no review file (*.csv or *.jsonl[.gz]) here (try `rectune data pull beauty-2023`)")
        path = reviews[0]
        metas = sorted(directory.glob("meta*.jsonl*"))
        meta = meta or (metas[0] if metas else None)
    if ".csv" in path.suffixes:
        frame = read_table(path, ("user_id", "parent_asin"), sep=",")
    else:
        frame = read_jsonl(path, ("user_id", "parent_asin", "asin", "rating", "timestamp"), ("user_id",))
        frame["parent_asin"] = frame["parent_asin"].fillna(frame["asin"])
        # Without this check a record lacking both ids would become an item named "None".
        if frame["parent_asin"].isna().any():
            record = int(np.flatnonzero(frame["parent_asin"].isna().to_numpy())[0]) + 1
            raise DataError(path, f"record {record} has neither 'parent_asin' nor 'asin'")
    interactions = pd.DataFrame({"user": frame["user_id"].astype(str), "item": frame["parent_asin"].astype(str)})
    if "timestamp" in frame and frame["timestamp"].notna().all():
        interactions["timestamp"] = _numeric(frame, "timestamp", path).astype("int64")
    before = interactions["user"].nunique()
    interactions = kcore(interactions, min_interactions) if min_interactions > 1 else interactions
    if interactions.empty:
        raise DataError(path, f"no user and item is left after the {min_interactions}-core filter")
    notes = (f"{min_interactions}-core filter kept {interactions['user'].nunique()} of {before} users",)
    item_text = item_categories = None
    extra: tuple[str, ...] = ()
    if meta is not None:
        item_text, item_categories = _amazon_2023_meta(meta)
        extra = (str(meta),)
    return build_dataset(
        "beauty-2023" if "beauty" in path.name.lower() else path.stem.split(".")[0],
        interactions, source=path, split=split or SplitStrategy("random"),
        item_text=item_text, item_categories=item_categories, extra_sources=extra, notes=notes,
        content_source=str(meta) if meta is not None else None,
    )


def _amazon_2023_meta(path: Path) -> tuple[pd.Series, pd.Series]:
    frame = read_jsonl(path, ("parent_asin", "title", "description", "categories", "price", "main_category"), ("parent_asin",))

    def text(row) -> str:
        description = row["description"]
        if isinstance(description, list):
            description = " ".join(str(d) for d in description)
        parts = [row["title"], description]
        return ". ".join(str(p) for p in parts if isinstance(p, str) and p)

    def categories(row) -> tuple[str, ...]:
        cats = row["categories"] if isinstance(row["categories"], list) else []
        return tuple(cats) or ((row["main_category"],) if isinstance(row["main_category"], str) else ())

    frame = frame.drop_duplicates("parent_asin").set_index("parent_asin")
    return frame.apply(text, axis=1), frame.apply(categories, axis=1)


def load_movielens(directory: Path, split: SplitStrategy | None = None, min_rating: float | None = None) -> Dataset:
    """MovieLens-100K: RecBole atomic files (`ml-100k.inter[.gz]`, `.item`, `.user`) or the
    original GroupLens files (`u.data`, `u.item`, `u.user`, possibly inside `ml-100k/`).
    `directory` may also be one of those files (its directory is read).
    Every rating counts as an interaction unless `min_rating` is given. Rated users without
    a row in the user file and rated items without a row in the item file are kept (with
    missing attributes / no text), counted in the dataset's notes and warned about."""
    directory = _directory_of(directory, _MOVIELENS_FILES)
    if (directory / "ml-100k").is_dir() and not _find(directory, "ml-100k.inter", "ml-100k.inter.gz", "u.data"):
        directory = directory / "ml-100k"
    atomic = _find(directory, "ml-100k.inter.gz", "ml-100k.inter")
    if atomic is not None:
        ratings = read_table(atomic, ("user_id", "item_id", "rating", "timestamp"))
        items = read_table(directory / "ml-100k.item", ("item_id", "movie_title"))
        users = read_table(directory / "ml-100k.user", ("user_id", "age", "gender", "occupation"))
        genres = items.get("class", pd.Series([""] * len(items))).str.split()
        titles = items["movie_title"]
        sources = (str(directory / "ml-100k.item"), str(directory / "ml-100k.user"))
    else:
        data = _find(directory, "u.data")
        if data is None:
            raise DataError(directory, "no ml-100k.inter[.gz] or u.data here (try `rectune data pull ml-100k`)")
        ratings = read_table(data, (), names=["user_id", "item_id", "rating", "timestamp"])
        items = read_table(directory / "u.item", (), sep="|", encoding="latin-1",
                           names=["item_id", "movie_title", "release_date", "video_release", "url", *MOVIELENS_GENRES])
        users = read_table(directory / "u.user", (), sep="|", names=["user_id", "age", "gender", "occupation", "zip_code"])
        flags = items[list(MOVIELENS_GENRES)] == "1"
        genres = flags.apply(lambda row: [g for g, on in row.items() if on], axis=1)
        titles = items["movie_title"]
        sources = (str(directory / "u.item"), str(directory / "u.user"))
        atomic = data
    rating = _numeric(ratings, "rating", atomic)
    interactions = pd.DataFrame({
        "user": _integer_ids(ratings, "user_id", atomic),
        "item": _integer_ids(ratings, "item_id", atomic),
        "timestamp": _numeric(ratings, "timestamp", atomic).astype("int64"),
    })
    if min_rating is not None:
        interactions = interactions[rating.to_numpy() >= min_rating]
    item_index = _numeric(items, "item_id", Path(sources[0])).astype("int64")
    genres = pd.Series(list(genres), index=item_index)
    text = pd.Series([f"{t}. {' '.join(g)}" for t, g in zip(titles, genres)], index=item_index)
    attributes = pd.DataFrame({
        "age": _numeric(users, "age", Path(sources[1])).astype("int64").to_numpy(),
        "gender": users["gender"].to_numpy(),
        "occupation": users["occupation"].to_numpy(),
    }, index=_numeric(users, "user_id", Path(sources[1])).astype("int64"))
    return build_dataset("ml-100k", interactions, source=atomic, split=split or SplitStrategy("random"),
                         user_attributes=attributes, item_text=text, item_categories=genres, extra_sources=sources,
                         attributes_source=sources[1], content_source=sources[0])


def load_mmrec(path: Path, split: SplitStrategy | None = None) -> Dataset:
    """An MMRec dataset: `<name>.inter` (`userID itemID [rating timestamp] x_label`, x_label
    0/1/2 = train/val/test) with optional `text_feat.npy` / `image_feat.npy` beside it,
    whose rows are indexed by itemID."""
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if not inters:
            raise DataError(path, "no *.inter file here")
        path = inters[0]
    frame = read_table(path, ("userID", "itemID"))
    interactions = pd.DataFrame({
        "user": _integer_ids(frame, "userID", path),
        "item": _integer_ids(frame, "itemID", path),
    })
    if "timestamp" in frame:
        interactions["timestamp"] = _numeric(frame, "timestamp", path)
    if "x_label" in frame:
        interactions["split"] = frame["x_label"]
    blocks, names = [], []
    for name in ("text_feat.npy", "image_feat.npy"):
        feature_path = path.parent / name
        if feature_path.is_file():
            try:
                # An overflow becomes inf, which the finiteness check below reports.
                with np.errstate(over="ignore", invalid="ignore"):
                    block = np.load(feature_path).astype(np.float32)
            except (ValueError, OSError) as exc:
                raise DataError(feature_path, f"is not a readable .npy array: {exc}") from exc
            if block.ndim != 2:
                raise DataError(feature_path, f"must be a 2-d array (items × dims), but has shape {block.shape}")
            # A NaN would silently turn every similarity and score it touches into NaN.
            invalid = ~np.isfinite(block)
            if invalid.any():
                rows = int(invalid.any(axis=1).sum())
                raise DataError(feature_path, f"has {int(invalid.sum())} NaN or infinite value(s) (as float32) in {rows} of {block.shape[0]} rows")
            blocks.append(_l2_normalise(block))
            names.append(name.removesuffix(".npy"))
    item_order = None
    if blocks:
        rows = {b.shape[0] for b in blocks}
        if len(rows) > 1:
            raise DataError(path.parent, f"feature files disagree on the number of items: {sorted(rows)}")
        item_order = np.arange(rows.pop())
    dataset = build_dataset(path.stem, interactions, source=path,
                            split=split or SplitStrategy("given" if "split" in interactions else "random"),
                            item_order=item_order)
    if blocks:
        dataset = dataset.with_features(ItemFeatures(np.hstack(blocks), "npy:" + "+".join(names)))
        modalities = [n.removesuffix("_feat") for n in names]
        dataset = replace(dataset, content=ItemContent(features=dict(zip(modalities, blocks)),
                                                       sources={m: f"{m}_feat.npy" for m in modalities}))
    return with_neighbour_lists(dataset, path.parent)


def with_neighbour_lists(dataset: Dataset, directory: Path) -> Dataset:
    """The dataset with the kNN graphs of an `item_knn.tsv[.gz]` in `directory`, if there is one."""
    from rectune.models.content import find_neighbour_file, read_neighbour_lists

    path = find_neighbour_file(directory)
    if path is None:
        return dataset
    lists = read_neighbour_lists(path, dataset.item_ids)
    content = dataset.content or ItemContent()
    return replace(dataset, content=ItemContent({**content.graphs, **lists.graphs}, content.features,
                                                {**content.sources, **lists.sources}))


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class DatasetSource:
    name: str
    directory: str
    """Sub-directory of the data directory."""
    loader: Callable[..., Dataset]
    description: str


DATASETS: dict[str, DatasetSource] = {
    source.name: source
    for source in (
        DatasetSource("baby", "amazon-baby", load_amazon_baby, "Amazon Baby 5-core (McAuley 2014), LATTICE 8:1:1 split"),
        DatasetSource("ml-100k", "movielens-100k", load_movielens, "MovieLens 100K with age/gender/occupation"),
        DatasetSource("beauty-2023", "amazon-2023-all-beauty", load_amazon_2023, "Amazon Reviews 2023 All_Beauty, 5-core"),
    )
}

FORMATS: dict[str, Callable[..., Dataset]] = {name: globals()[function] for name, function in LOADER_FUNCTIONS.items()}


def is_mmrec(path: Path) -> bool:
    """Whether `path` is an MMRec `.inter` file, or a directory holding one (its header names
    userID and itemID; RecBole's `ml-100k.inter` names user_id:token and item_id:token)."""
    inters = [path] if path.is_file() else sorted(path.glob("*.inter")) if path.is_dir() else []
    if not inters or inters[0].suffix != ".inter":
        return False
    try:
        with inters[0].open(encoding="utf-8") as handle:
            header = handle.readline().rstrip("\n").split("\t")
    except (OSError, UnicodeDecodeError):
        return False
    return {"userID", "itemID"} <= set(header)


def dataset_label(name_or_path: str | Path) -> str:
    """A short name for a dataset in study, session and report names: a registered name as it
    is, a path by its last part (`data/clothing/clothing.inter` → `clothing`)."""
    name = str(name_or_path)
    return name if name in DATASETS else Path(name).stem if Path(name).is_file() else Path(name).name


def load_dataset(name_or_path: str | Path, data_dir: str | Path | None = None, split: SplitStrategy | None = None,
                 format: str | None = None) -> Dataset:
    """Load a registered dataset by name (from the data directory), an MMRec dataset by its
    path (a directory with `NAME.inter`, split by its x_label), or any path with `format`."""
    name = str(name_or_path)
    if format is None and name in DATASETS:
        source = DATASETS[name]
        directory = resolve_data_dir(data_dir) / source.directory
        if not directory.is_dir():
            raise DataError(directory, f"dataset {name!r} is not in the data directory (set --data-dir or RECTUNE_DATA_DIR, or run `rectune data pull {name}`)")
        return source.loader(directory, split)
    path = Path(name_or_path).expanduser()
    if format is None and is_mmrec(path):
        format = "mmrec"
    if format is None:
        why = (f"neither a registered name {sorted(DATASETS)} nor a path" if not path.exists() else
               "a path, but not an MMRec dataset (a NAME.inter whose header names userID and itemID, or its directory)")
        raise ConfigError(f"unknown dataset {name!r}: {why}; other formats load with "
                          f"`rectune data info PATH --format F` ({', '.join(sorted(FORMATS))})")
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; expected one of {sorted(FORMATS)}")
    if not path.exists():
        raise DataError(path, "not found")
    return FORMATS[format](path, split)
