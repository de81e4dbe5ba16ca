"""Fetch the public sources of the registered datasets into the data directory.

Only the standard library touches the network, so a pull works wherever Python runs.
`base_url` (or RECTUNE_DOWNLOAD_BASE_URL) fetches every file as `{base_url}/{file name}`
from a mirror instead, e.g. a local server in tests or an internal cache on a closed
network. Files are written under a temporary name and renamed when complete, so an
interrupted pull never leaves a half-written file where a loader would read it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from rectune.models.config import data_dir as resolve_data_dir
from rectune.models.errors import ConfigError, DataError, DownloadError
from rectune.models.loaders import DATASETS, load_dataset

BASE_URL_ENV = "RECTUNE_DOWNLOAD_BASE_URL"
_AMAZON_2023 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    url: str
    members: tuple[str, ...] = ()
    """For a zip archive, the files to extract (matched by base name); the archive is not kept."""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def targets(self) -> tuple[str, ...]:
        return self.members or (self.filename,)


# Keyed like models.loaders.DATASETS; each file lands in that dataset's sub-directory in
# the form its loader reads.
SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "baby": (RemoteFile("https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Baby_5.json.gz"),),
    "ml-100k": (RemoteFile("https://files.grouplens.org/datasets/movielens/ml-100k.zip", ("u.data", "u.item", "u.user")),),
    "beauty-2023": (
        RemoteFile(f"{_AMAZON_2023}/review_categories/All_Beauty.jsonl.gz"),
        RemoteFile(f"{_AMAZON_2023}/meta_categories/meta_All_Beauty.jsonl.gz"),
    ),
}


@dataclass(frozen=True)
class PullResult:
    directory: Path
    downloaded: tuple[Path, ...]
    skipped: tuple[Path, ...]
    """Files already present (and kept, since `force` was not set)."""
    summary: dict
    """`Dataset.summary()` of the loaded result: proof that the files are usable."""


def pull(name: str, data_dir: str | Path | None = None, base_url: str | None = None, progress: bool = True,
         force: bool = False, timeout: float = 60.0) -> PullResult:
    """Download dataset `name` into `<data dir>/<its directory>`, then load it to validate it.

    timeout: seconds to wait for a connection and for each read.
    """
    if name not in SOURCES:
        raise ConfigError(f"no public source for dataset {name!r}; expected one of {sorted(SOURCES)}")
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    if base_url and urlsplit(base_url).scheme not in ("http", "https", "file"):
        raise ConfigError(f"download base URL must start with http://, https:// or file://, but got {base_url!r}")
    root = resolve_data_dir(data_dir)
    directory = root / DATASETS[name].directory
    created = not directory.is_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(directory, f"cannot create the dataset directory ({exc.strerror or exc})") from exc

    downloaded: list[Path] = []
    skipped: list[Path] = []
    try:
        for remote in SOURCES[name]:
            targets = [directory / target for target in remote.targets]
            if not force and all(target.is_file() for target in targets):
                skipped += targets
                continue
            url = f"{base_url.rstrip('/')}/{remote.filename}" if base_url else remote.url
            with _temporary(directory, remote.filename) as part:
                _fetch(url, part, directory, timeout, progress)
                if remote.members:
                    _extract(part, url, remote.members, directory)
                else:
                    os.replace(part, targets[0])
            downloaded += targets
    except BaseException:
        # `rectune data list` reports a dataset as present when its directory exists.
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
    return PullResult(directory, tuple(downloaded), tuple(skipped), load_dataset(name, root).summary())


@contextmanager
def _temporary(directory: Path, name: str) -> Iterator[Path]:
    """A fresh hidden `.part` file beside the target (same file system, so the rename is
    atomic); it is removed on the way out unless it was renamed into place."""
    handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    os.close(handle)
    try:
        yield Path(path)
    finally:
        Path(path).unlink(missing_ok=True)


def _fetch(url: str, destination: Path, directory: Path, timeout: float, progress: bool) -> None:
    by_hand = f"copy the files into {directory} by hand"
    hint = f"(the network may be closed; {by_hand})"
    received = 0
    try:
        # Some hosts refuse urllib's default agent string.
        with urlopen(Request(url, headers={"User-Agent": "rectune"}), timeout=timeout) as response:
            expected = int(response.headers.get("Content-Length") or 0) or None
            with open(destination, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True,
                                                      desc=url.rsplit("/", 1)[-1], disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except HTTPError as exc:
        raise DownloadError(url, f"cannot download {url}: the server answered HTTP {exc.code} {exc.reason} (the source may have moved; {by_hand})") from exc
    except URLError as exc:
        raise DownloadError(url, f"cannot reach {url}: {exc.reason} {hint}") from exc
    except (OSError, HTTPException) as exc:
        # A timeout or reset in mid-transfer, or a full disk.
        raise DownloadError(url, f"download of {url} failed after {received} bytes: {exc or type(exc).__name__} {hint}") from exc
    # http.client returns a short body without complaint when the connection drops early.
    if expected is not None and received != expected:
        raise DownloadError(url, f"download of {url} is incomplete: got {received} of {expected} bytes {hint}")


def _extract(archive_path: Path, url: str, members: tuple[str, ...], directory: Path) -> None:
    try:
        with zipfile.ZipFile(archive_path) as archive:
            by_name = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
            missing = [member for member in members if member not in by_name]
            if missing:
                raise DownloadError(url, f"the archive {url} has no {missing}; it holds {sorted(by_name)[:10]}")
            for member in members:
                with _temporary(directory, member) as part:
                    with archive.open(by_name[member]) as source, open(part, "wb") as out:
                        shutil.copyfileobj(source, out)
                    os.replace(part, directory / member)
    except zipfile.BadZipFile as exc:
        raise DownloadError(url, f"{url} is not a valid zip archive ({exc})") from exc
