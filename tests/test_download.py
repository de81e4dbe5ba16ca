"""`pull` and `rectune data pull` against a local HTTP mirror on 127.0.0.1 serving fixture files."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rectune.models.download as download
from rectune.agent.cli import app
from fixture_data import (
    amazon_2014_records, amazon_2023_meta, amazon_2023_reviews, movielens_original_files, movielens_zip, write_jsonl,
)
from rectune.models.errors import ConfigError, DataError, DownloadError
from rectune.models.loaders import DATASETS, load_dataset

TIMEOUT = 5.0  # bounds every request in these tests; the loopback server answers in milliseconds


@dataclass
class Mirror:
    root: Path
    url: str
    requests: list[str] = field(default_factory=list)
    misbehave: dict[str, str] = field(default_factory=dict)
    """File name → `truncate` (promise 1000 bytes, send 10) or `stall` (send headers, then nothing)."""
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(SimpleHTTPRequestHandler):
    mirror: Mirror

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        self.mirror.requests.append(name)
        mode = self.mirror.misbehave.get(name)
        if mode is None:
            self.path = "/" + name  # serve the files whatever directory the base URL names
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        if mode == "truncate":
            self.wfile.write(b"x" * 10)
        else:
            self.wfile.flush()
            self.mirror.release.wait(10)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """A proxy configured on the test machine must not intercept loopback requests."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)


@pytest.fixture
def mirror(tmp_path) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "ml-100k.zip").write_bytes(movielens_zip())
    write_jsonl(root / "reviews_Baby_5.json.gz", amazon_2014_records())
    write_jsonl(root / "All_Beauty.jsonl.gz", amazon_2023_reviews())
    write_jsonl(root / "meta_All_Beauty.jsonl.gz", amazon_2023_meta())
    state = Mirror(root, "")
    handler = type("Handler", (_Handler,), {"mirror": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    state.url = f"http://127.0.0.1:{server.server_address[1]}/mirror/path"
    # A short poll interval keeps shutdown() (which waits for the next poll) fast.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_in(directory: Path) -> list[str]:
    """Everything in the directory, hidden temporary files included."""
    return sorted(p.name for p in directory.iterdir())


def test_sources_cover_the_registry_with_the_public_urls():
    assert set(download.SOURCES) == set(DATASETS)
    urls = {name: [f.url for f in files] for name, files in download.SOURCES.items()}
    assert urls == {
        "baby": ["https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Baby_5.json.gz"],
        "ml-100k": ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"],
        "beauty-2023": [
            "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/review_categories/All_Beauty.jsonl.gz",
            "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/meta_categories/meta_All_Beauty.jsonl.gz",
        ],
    }


def test_pull_movielens_extracts_the_zip_and_validates(mirror, tmp_path):
    data = tmp_path / "data"
    result = download.pull("ml-100k", data, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    directory = data / "movielens-100k"
    assert result.directory == directory and mirror.requests == ["ml-100k.zip"]
    assert result.downloaded == (directory / "u.data", directory / "u.item", directory / "u.user") and result.skipped == ()
    # Only the three files the loader reads: no archive, README or temporary file left.
    assert files_in(directory) == ["u.data", "u.item", "u.user"]
    assert all((directory / name).read_bytes() == content for name, content in movielens_original_files().items())
    summary = result.summary
    assert (summary["name"], summary["users"], summary["items"], summary["interactions"]) == ("ml-100k", 4, 20, 35)

    again = download.pull("ml-100k", data, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert again.downloaded == () and again.skipped == result.downloaded and mirror.requests == ["ml-100k.zip"]
    forced = download.pull("ml-100k", data, base_url=mirror.url, progress=False, force=True, timeout=TIMEOUT)
    assert forced.downloaded == result.downloaded and len(mirror.requests) == 2


# The fixture's metadata covers 2 of the 5 reviewed items; the summary's note is checked below.
@pytest.mark.filterwarnings("ignore:3 of 5 items have no row in:RuntimeWarning")
def test_pull_amazon_2023_uses_env_base_url_and_fetches_only_what_is_missing(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(download.BASE_URL_ENV, mirror.url + "/")
    data = tmp_path / "data"
    result = download.pull("beauty-2023", data, progress=False, timeout=TIMEOUT)
    directory = data / "amazon-2023-all-beauty"
    assert files_in(directory) == ["All_Beauty.jsonl.gz", "meta_All_Beauty.jsonl.gz"]
    assert (result.summary["users"], result.summary["items"], result.summary["duplicates_dropped"]) == (5, 5, 1)
    assert result.summary["notes"][-1].startswith(f"3 of 5 items have no row in {directory / 'meta_All_Beauty.jsonl.gz'}")
    assert load_dataset("beauty-2023", data).item_text[0] == "Rose Oil. Cold pressed. For skin."

    (directory / "meta_All_Beauty.jsonl.gz").unlink()
    partial_pull = download.pull("beauty-2023", data, progress=False, timeout=TIMEOUT)
    assert partial_pull.downloaded == (directory / "meta_All_Beauty.jsonl.gz",)
    assert partial_pull.skipped == (directory / "All_Beauty.jsonl.gz",)
    assert mirror.requests == ["All_Beauty.jsonl.gz", "meta_All_Beauty.jsonl.gz", "meta_All_Beauty.jsonl.gz"]


def test_pull_baby_gets_the_2014_reviews(mirror, tmp_path):
    result = download.pull("baby", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert result.downloaded == (tmp_path / "amazon-baby" / "reviews_Baby_5.json.gz",)
    assert (result.summary["name"], result.summary["users"], result.summary["items"], result.summary["interactions"]) == ("baby", 3, 5, 12)


def test_pull_from_a_file_url_mirror(mirror, tmp_path):
    result = download.pull("baby", tmp_path / "data", base_url=mirror.root.as_uri(), progress=False, timeout=TIMEOUT)
    assert result.summary["users"] == 3


def test_progress_bar_names_the_file(mirror, tmp_path, capsys):
    download.pull("baby", tmp_path / "data", base_url=mirror.url, progress=True, timeout=TIMEOUT)
    assert "reviews_Baby_5.json.gz" in capsys.readouterr().err


def test_http_error_names_the_url_and_leaves_nothing(mirror, tmp_path):
    (mirror.root / "ml-100k.zip").unlink()
    with pytest.raises(DownloadError) as info:
        download.pull("ml-100k", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert info.value.url == f"{mirror.url}/ml-100k.zip"
    assert str(info.value).startswith(f"cannot download {mirror.url}/ml-100k.zip: the server answered HTTP 404 File not found")
    assert str(info.value).endswith(f"(the source may have moved; copy the files into {tmp_path / 'movielens-100k'} by hand)")
    assert not (tmp_path / "movielens-100k").exists()


def test_closed_port_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(DownloadError) as info:
        download.pull("baby", tmp_path, base_url=url, progress=False, timeout=TIMEOUT)
    message = str(info.value)
    assert message.startswith(f"cannot reach {url}/reviews_Baby_5.json.gz: ") and "Connection refused" in message
    assert message.endswith(f"(the network may be closed; copy the files into {tmp_path / 'amazon-baby'} by hand)")


def test_truncated_download_is_rejected_and_removed(mirror, tmp_path):
    mirror.misbehave["reviews_Baby_5.json.gz"] = "truncate"
    with pytest.raises(DownloadError, match="reviews_Baby_5.json.gz is incomplete: got 10 of 1000 bytes"):
        download.pull("baby", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert not (tmp_path / "amazon-baby").exists()


def test_stalled_server_times_out(mirror, tmp_path):
    mirror.misbehave["reviews_Baby_5.json.gz"] = "stall"
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"reviews_Baby_5.json.gz failed after 0 bytes: timed out"):
        download.pull("baby", tmp_path, base_url=mirror.url, progress=False, timeout=0.3)
    assert time.monotonic() - start < TIMEOUT
    assert not (tmp_path / "amazon-baby").exists()


def test_interrupted_download_leaves_no_partial_file(mirror, tmp_path, monkeypatch):
    class Interrupting:
        def __init__(self, **kwargs): ...
        def __enter__(self): return self
        def __exit__(self, *exc): return False
        def update(self, n): raise KeyboardInterrupt

    monkeypatch.setattr(download, "tqdm", Interrupting)
    directory = tmp_path / "amazon-2023-all-beauty"
    with pytest.raises(KeyboardInterrupt):
        download.pull("beauty-2023", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert not directory.exists()  # pull created it, so pull removes it
    directory.mkdir()
    with pytest.raises(KeyboardInterrupt):
        download.pull("beauty-2023", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert files_in(directory) == []


def test_bad_archives(mirror, tmp_path):
    (mirror.root / "ml-100k.zip").write_bytes(b"PK not really a zip")
    with pytest.raises(DownloadError, match=r"ml-100k.zip is not a valid zip archive"):
        download.pull("ml-100k", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    (mirror.root / "ml-100k.zip").write_bytes(movielens_zip(members=("u.data", "u.item")))
    with pytest.raises(DownloadError, match=r"ml-100k.zip has no \['u.user'\]; it holds \['README', 'u.data', 'u.item'\]"):
        download.pull("ml-100k", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert not (tmp_path / "movielens-100k").exists()


def test_downloaded_files_that_do_not_load_name_the_file(mirror, tmp_path):
    (mirror.root / "reviews_Baby_5.json.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError) as info:
        download.pull("baby", tmp_path, base_url=mirror.url, progress=False, timeout=TIMEOUT)
    assert str(info.value).startswith(f"{tmp_path / 'amazon-baby' / 'reviews_Baby_5.json.gz'}: cannot be read")


def test_bad_names_and_urls(tmp_path):
    with pytest.raises(ConfigError, match=r"no public source for dataset 'ml-1m'; expected one of \['baby', 'beauty-2023', 'ml-100k'\]"):
        download.pull("ml-1m", tmp_path)
    with pytest.raises(ConfigError, match="must start with http://, https:// or file://, but got '127.0.0.1:8000'"):
        download.pull("baby", tmp_path, base_url="127.0.0.1:8000")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot create the dataset directory"):
        download.pull("baby", blocker)


runner = CliRunner()


def test_cli_pull_prints_files_and_summary(mirror, tmp_path):
    args = ["data", "pull", "ml-100k", "--data-dir", str(tmp_path), "--base-url", mirror.url, "--timeout", str(TIMEOUT), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"downloaded {tmp_path / 'movielens-100k' / name}" for name in ("u.data", "u.item", "u.user")]
    assert json.loads("\n".join(lines[3:]))["interactions"] == 35
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.stdout.startswith(f"present    {tmp_path / 'movielens-100k' / 'u.data'} (--force")


def test_cli_pull_network_failure_exits_2_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    result = runner.invoke(app, ["data", "pull", "baby", "--data-dir", str(tmp_path), "--base-url", url, "--timeout", str(TIMEOUT)])
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: cannot reach {url}/reviews_Baby_5.json.gz: ") and result.stderr.count("\n") == 1
    unknown = runner.invoke(app, ["data", "pull", "nope", "--data-dir", str(tmp_path)])
    assert unknown.exit_code == 2 and "expected one of ['baby', 'beauty-2023', 'ml-100k']" in unknown.stderr
