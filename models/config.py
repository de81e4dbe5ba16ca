"""Where rectune looks for data and caches.

Resolution order, first hit wins: explicit argument (the CLI flag) → environment variable
→ `rectune.toml` in the working directory → `~/.config/rectune/config.toml` → default.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from models.errors import ConfigError

DATA_DIR_ENV = "RECTUNE_DATA_DIR"
CACHE_DIR_ENV = "RECTUNE_CACHE_DIR"
# MLflow's own variable comes first: users of MLflow already export it.
TRACKING_URI_ENVS = ("MLFLOW_TRACKING_URI", "RECTUNE_TRACKING_URI")
CONFIG_FILES = (Path("rectune.toml"), Path.home() / ".config" / "rectune" / "config.toml")


def _from_config_files(key: str) -> str | None:
    for path in CONFIG_FILES:
        if not path.is_file():
            continue
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
        if key in values:
            value = values[key]
            if not isinstance(value, str):
                raise ConfigError(f"{path}: '{key}' must be a string path, but got {value!r}")
            return value
    return None


def _resolve(explicit: str | Path | None, env: str, key: str, default: Path) -> Path:
    for candidate in (explicit, os.environ.get(env), _from_config_files(key)):
        if candidate:
            return Path(candidate).expanduser()
    return default


def data_dir(explicit: str | Path | None = None) -> Path:
    """The directory that holds one sub-directory per dataset."""
    return _resolve(explicit, DATA_DIR_ENV, "data_dir", Path("data"))


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Where computed item features (and later trained models) are cached."""
    return _resolve(explicit, CACHE_DIR_ENV, "cache_dir", Path.home() / ".cache" / "rectune")


def tracking_uri(explicit: str | None = None) -> str:
    """The MLflow tracking URI; default a sqlite file in the working directory.

    Made absolute here because MLflow otherwise resolves a relative default against
    whatever directory the process happens to run in.
    """
    candidates = (explicit, *(os.environ.get(env) for env in TRACKING_URI_ENVS), _from_config_files("tracking_uri"))
    uri = next((c for c in candidates if c), f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    scheme = urlsplit(uri).scheme
    # A one-letter scheme is a Windows drive (C:\runs), i.e. a plain path as well.
    if scheme in ("", "file") or len(scheme) == 1:
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; "
            f"use a database such as 'sqlite:///{Path(uri.removeprefix('file://')).expanduser()}.db' or an http(s) server"
        )
    return uri
