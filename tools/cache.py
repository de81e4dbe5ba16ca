"""Fitted pipeline stages cached by the values that determine them.

A trial that changes only K or TopN reuses the trained stages (and, for TopN alone, the
ranked lists). The cache is bounded in memory (least recently used stages are dropped)
and on disk (oldest files are deleted past a byte budget; large arrays are stored once, by
content, however many stages hold them), and safe for several
processes: one process fits a given stage while the others wait on its file lock, then
load what it wrote; files appear atomically (write to a temporary name, then rename).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rectune.models.errors import ConfigError

if TYPE_CHECKING:  # numpy and the dataset (pandas, scipy) stay out of light commands' start-up
    from rectune.models.dataset import Dataset


def dataset_fingerprint(dataset: Dataset) -> str:
    """What identifies the training data: name, split, sizes, the train matrix, and the item
    features and content graphs by value (a replaced neighbour file or .npy under the same
    dataset name must not bring back stages fitted on the old one)."""
    import numpy as np

    digest = hashlib.sha256()
    arrays = [dataset.train.indptr, dataset.train.indices]
    if dataset.item_features is not None:
        arrays.append(dataset.item_features.matrix)
    content = dataset.content
    for modality in content.modalities if content else ():
        digest.update(modality.encode())
        if modality in content.graphs:
            graph = content.graphs[modality]
            arrays += [graph.indptr, graph.indices, graph.data]
        if modality in content.features:
            arrays.append(content.features[modality])
    for part in arrays:
        digest.update(np.ascontiguousarray(part).tobytes())
    features = dataset.item_features.source if dataset.item_features else "none"
    return f"{dataset.name}|{dataset.report.split}|{dataset.n_users}x{dataset.n_items}|{features}|{digest.hexdigest()[:16]}"


# Bump when fitted stages change shape or meaning, so that files pickled by older code are
# never loaded (4: user groups are no longer a two-tower or DeepFM input).
STAGE_FORMAT = 4


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([STAGE_FORMAT, *parts], sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes on this machine, held for the block."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _written_atomically(path: Path):
    """A temporary file beside `path` for the block to write; it becomes `path` when the block
    succeeds and is removed either way (a full disk or an interrupt leaves nothing behind)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


DISK_BUDGET_ENV = "RECTUNE_CACHE_MAX_GB"


def disk_budget_bytes() -> int:
    """The model cache's disk budget: RECTUNE_CACHE_MAX_GB, else 4 GB (on Baby a recall stage takes 210 MB, 199 MB
    of it the heuristic's similarity, which stages with the same heuristic share; a DeepFM ranker 3 MB)."""
    raw = os.environ.get(DISK_BUDGET_ENV)
    if raw is None:
        return 4 * 2**30
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = float("nan")
    if not 0 < gigabytes < float("inf"):
        raise ConfigError(f"{DISK_BUDGET_ENV}={raw!r}: expected a size in GB above 0, e.g. 4 or 0.5")
    return int(gigabytes * 2**30)


def _array_from_tensor(tensor):
    return tensor.numpy()


class _ArraysAsTensors:
    """The pickle module of the cache's torch.save: numpy arrays travel as tensors, which torch
    writes as raw records beside the pickle instead of inside it — a fitted heuristic's 200 MB
    similarity saved in 0.24 s instead of 2.9 s and loaded in 0.15 s instead of 1.9 s (Baby,
    2026-12-02), where pickling was 19 s of a 5-minute main job."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            import numpy as np
            import torch

            if type(obj) is not np.ndarray:
                return NotImplemented
            # torch.from_numpy warns on a read-only array (EASE's weights): those travel as a copy.
            array = obj if obj.flags.c_contiguous and obj.flags.writeable else obj.copy(order="C")
            try:
                return _array_from_tensor, (torch.from_numpy(array),)
            except (TypeError, ValueError):  # a dtype torch has no tensor for (strings, objects): pickled as numpy does
                return NotImplemented


SHARED_ARRAY_BYTES = 16 * 2**20
"""Arrays at least this large are stored once by content in `blobs/`, and every stage file that
holds one refers to it: on Baby each heuristic and two-tower stage holds the heuristic's 199 MB
item-item similarity, most of them the same one (the two-tower trials of a session share the
default's), and the default 4 GB budget kept ~19 stages."""

_SHARED_KINDS = "biufc"
"""Only plain numbers are shared: their dtype string and shape say all their bytes mean."""

_blobs_being_read: ContextVar[Path | None] = ContextVar("blobs_being_read", default=None)


def _array_from_blob(digest: str):
    import numpy as np

    return np.load(_blobs_being_read.get() / f"{digest}.npy")


def _store_blob(blobs: Path, array) -> str:
    """The array's content digest (`_SHARED_KINDS` only), its file written unless one with that content is there."""
    import numpy as np

    array = array if array.flags.c_contiguous else array.copy(order="C")
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.reshape(-1).view(np.uint8))
    name = digest.hexdigest()
    path = blobs / f"{name}.npy"
    if not path.exists():
        blobs.mkdir(exist_ok=True)
        # Into a handle: np.save given a path would add ".npy" to it.
        with _written_atomically(path) as temporary, open(temporary, "wb") as handle:
            np.save(handle, array)
    return name


def _readable(blob: Path) -> bool:
    """Whether the blob's header parses and the file holds all the bytes it announces (a
    truncated blob would otherwise fail every stage that uses it, refit after refit)."""
    import numpy as np

    try:
        np.load(blob, mmap_mode="r")
        return True
    except (OSError, ValueError, EOFError):
        return False


def _stage_pickle_module(blobs: Path, shared: list[str]):
    """torch.save's pickle module for one stage file: `_ArraysAsTensors`, with large arrays
    stored in `blobs` and their digests appended to `shared`."""

    class StagePickleModule:
        class Pickler(_ArraysAsTensors.Pickler):
            def reducer_override(self, obj):
                import numpy as np

                if type(obj) is np.ndarray and obj.nbytes >= SHARED_ARRAY_BYTES and obj.dtype.kind in _SHARED_KINDS:
                    shared.append(_store_blob(blobs, obj))
                    return _array_from_blob, (shared[-1],)
                return super().reducer_override(obj)

    return StagePickleModule


class ModelCache:
    """get_or_fit(key, fit) → (value, was_cached). `directory=None` keeps it in memory only.

    Bounded twice: at most `max_in_memory` fitted stages in this process (least recently used
    go first) and `max_disk_bytes` on disk (oldest files go first), default RECTUNE_CACHE_MAX_GB."""

    def __init__(self, directory: str | Path | None = None, max_in_memory: int = 6, max_disk_bytes: int | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.max_in_memory = max_in_memory
        self.max_disk_bytes = disk_budget_bytes() if max_disk_bytes is None else max_disk_bytes
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self.fits = 0
        """How many values this process had to compute (the rest came from a cache)."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def get_or_fit(self, key: str, fit: Callable[[], Any]) -> tuple[Any, bool]:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key], True
        if self.directory is None:
            value, cached = self._fit(fit), False
        else:
            value, cached = self._from_disk_or_fit(key, fit)
        self._memory[key] = value
        while len(self._memory) > self.max_in_memory:
            self._memory.popitem(last=False)
        return value, cached

    def _fit(self, fit: Callable[[], Any]) -> Any:
        self.fits += 1
        return fit()

    def _from_disk_or_fit(self, key: str, fit: Callable[[], Any]) -> tuple[Any, bool]:
        import torch

        path = self.directory / f"{key}.pt"
        with file_lock(self.directory / f"{key}.lock"):
            if path.exists():
                reading = _blobs_being_read.set(self.blobs)
                try:
                    value = torch.load(path, weights_only=False)
                    os.utime(path)  # recently used: evicted last
                    return value, True
                except Exception:  # a torn or foreign file, or one whose blob is gone or torn, is recomputed, not fatal
                    with file_lock(self._blob_lock):
                        for name in _shares(path):
                            if not _readable(self.blobs / f"{name}.npy"):
                                (self.blobs / f"{name}.npy").unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                    _shares_path(path).unlink(missing_ok=True)
                finally:
                    _blobs_being_read.reset(reading)
            value = self._fit(fit)
            # Under the blob lock, an eviction never sees a blob whose stage is not yet listed.
            with file_lock(self._blob_lock), _written_atomically(path) as temporary:
                shared: list[str] = []
                torch.save(value, temporary, pickle_module=_stage_pickle_module(self.blobs, shared))
                _shares_path(path).write_text(json.dumps(sorted(set(shared))))
        self._evict_disk(keep=path)
        return value, False

    @property
    def blobs(self) -> Path:
        return self.directory / "blobs"

    @property
    def _blob_lock(self) -> Path:
        return self.directory / "blobs.lock"

    def _evict_disk(self, keep: Path) -> None:
        """Oldest stage files first, until the stages and the blobs they still use fit the budget;
        a blob no stage uses (its stage evicted, or a save that crashed) goes at once."""
        with file_lock(self._blob_lock):
            for temporary in self.blobs.glob("*.tmp"):  # a killed save's: blobs are written only under this lock
                temporary.unlink(missing_ok=True)
            stages = sorted(self.directory.glob("*.pt"), key=_mtime)
            shares = {stage: _shares(stage) for stage in stages}
            blob_sizes = {blob.stem: _size(blob) for blob in self.blobs.glob("*.npy")}

            def drop_unused() -> None:
                used = set().union(*shares.values())
                for name in [name for name in blob_sizes if name not in used]:
                    (self.blobs / f"{name}.npy").unlink(missing_ok=True)
                    del blob_sizes[name]

            drop_unused()
            total = sum(map(_size, stages)) + sum(blob_sizes.values())
            for stage in stages:
                if total <= self.max_disk_bytes:
                    break
                if stage == keep:
                    continue
                total -= _size(stage)
                stage.unlink(missing_ok=True)
                _shares_path(stage).unlink(missing_ok=True)
                del shares[stage]
                before = sum(blob_sizes.values())
                drop_unused()
                total -= before - sum(blob_sizes.values())


def _shares_path(stage: Path) -> Path:
    return stage.with_suffix(".shares")


def _shares(stage: Path) -> set[str]:
    """The blobs a stage file refers to (none for files written before blobs existed)."""
    try:
        return set(json.loads(_shares_path(stage).read_text()))
    except (OSError, ValueError):
        return set()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed by a process that held the stage's lock
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
