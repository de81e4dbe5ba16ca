"""Where rectune looks for data and caches.

Resolution order, first hit wins: explicit argument (the CLI flag) → environment variable
→ `rectune.toml` in the working directory → `~/.config/rectune/config.toml` → default.
The same order picks the agent's LLM endpoint and model (`llm_base_url`, `llm_model`).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from rectune.models.errors import ConfigError

DATA_DIR_ENV = "RECTUNE_DATA_DIR"
CACHE_DIR_ENV = "RECTUNE_CACHE_DIR"
# MLflow's own variable comes first: users of MLflow already export it.
TRACKING_URI_ENVS = ("MLFLOW_TRACKING_URI", "RECTUNE_TRACKING_URI")
LLM_BASE_URL_ENV = "RECTUNE_LLM_BASE_URL"
LLM_MODEL_ENV = "RECTUNE_LLM_MODEL"
CONFIG_FILES = (Path("rectune.toml"), Path.home() / ".config" / "rectune" / "config.toml")


def _from_config_files(key: str, kind: str = "path") -> str | None:
    return _config_entry(key, kind)[0]


def _config_entry(key: str, kind: str = "path") -> tuple[str | None, Path | None]:
    """The value of `key` in the first config file that has it, and that file."""
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
                raise ConfigError(f"{path}: '{key}' must be a string {kind}, but got {value!r}")
            return value, path
    return None, None


def _first(explicit: str | Path | None, envs: tuple[str, ...], key: str, kind: str = "path") -> str | Path | None:
    """The first setting given: the explicit value, then each environment variable, then the config files."""
    candidates = (explicit, *(os.environ.get(env) for env in envs), _from_config_files(key, kind))
    return next((c for c in candidates if c), None)


def _resolve(explicit: str | Path | None, env: str, key: str, default: Path) -> Path:
    found = _first(explicit, (env,), key)
    return Path(found).expanduser() if found else default


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
    uri = _first(explicit, TRACKING_URI_ENVS, "tracking_uri") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    scheme = urlsplit(uri).scheme
    # A one-letter scheme is a Windows drive (C:\runs), i.e. a plain path as well.
    if scheme in ("", "file") or len(scheme) == 1:
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; "
            f"use a database such as 'sqlite:///{Path(uri.removeprefix('file://')).expanduser()}.db' or an http(s) server"
        )
    return uri


def llm_base_url(explicit: str | None = None) -> str | None:
    """The agent's OpenAI-compatible endpoint; None: DeepSeek/OpenAI by key, else the embedded model."""
    return _first(explicit, (LLM_BASE_URL_ENV,), "llm_base_url", "URL")


def llm_base_url_from_working_directory(explicit: str | None = None) -> bool:
    """Whether the endpoint comes from the working directory's rectune.toml — a file that may
    arrive with a cloned repository, so it is not trusted with the user's API key."""
    if explicit or os.environ.get(LLM_BASE_URL_ENV):
        return False
    source = _config_entry("llm_base_url", "URL")[1]
    return source is not None and not source.is_absolute()


def llm_model(explicit: str | None = None) -> str | None:
    """The model name at the endpoint; None: the endpoint's default (see agent/llm.py)."""
    return _first(explicit, (LLM_MODEL_ENV,), "llm_model", "model name")
