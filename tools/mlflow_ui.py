"""A real `mlflow server` on 127.0.0.1 against a tracking store, started and stopped by PID.

Used by `rectune ui` to review sessions in the MLflow UI and by the tests that exercise a
real tracking server.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rectune.models.errors import ConfigError
from rectune.tools.loopback import LoopbackProcess, pick_free_port, port_in_use
from rectune.tools.tracking import sqlite_path

STARTUP_SECONDS = 90.0


def ui_server(tracking_uri: str, port: int) -> "MlflowServer":
    """A server for browsing an existing store, its log beside a sqlite file.

    A missing sqlite file is refused rather than served: the server would create an
    empty store there and the user would look at nothing, wondering where the runs went.
    """
    database = sqlite_path(tracking_uri)
    if database is not None:
        if not database.is_file():
            raise ConfigError(f"no MLflow store at {database}: run `rectune tune` or `rectune compare` first, "
                              "or pass --tracking-uri")
        # Absolute, because the server runs in the store's directory (where its ./mlartifacts
        # default coincides with the artifact root that Tracker gives new experiments).
        tracking_uri = f"sqlite:///{database}"
    home = database.parent if database is not None else Path.cwd()
    return MlflowServer(tracking_uri, home / "mlflow-ui.log", port=port, cwd=home)


def experiment_pages(tracking_uri: str, base_url: str) -> list[tuple[str, str]]:
    """(experiment name, URL of its runs table), skipping empty experiments.

    The runs table, not the experiment's landing page: with LLM traces logged, MLflow 3
    lands on a GenAI overview that does not list the training runs.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return [(experiment.name, f"{base_url}/#/experiments/{experiment.experiment_id}/runs")
            for experiment in client.search_experiments()
            if client.search_runs([experiment.experiment_id], max_results=1)]


class MlflowServer:
    """`with MlflowServer("sqlite:///mlflow.db", log_path) as server: server.url`.

    artifacts_destination: serve artifacts through the server (proxied, like a remote
    one); without it, runs keep their own artifact locations and the server reads them.
    """

    def __init__(self, backend_store_uri: str, log_path: Path, port: int = 0,
                 artifacts_destination: Path | None = None, cwd: Path | None = None):
        if backend_store_uri.startswith(("http://", "https://")):
            raise ConfigError(f"the tracking URI {backend_store_uri} is already a server: open it in a browser")
        self.backend_store_uri = backend_store_uri
        self.port = port or pick_free_port()
        self.artifacts_destination = artifacts_destination
        self.cwd = cwd
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = LoopbackProcess(f"mlflow server on port {self.port}", ConfigError, Path(log_path))

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def start(self) -> "MlflowServer":
        if port_in_use(self.port):
            raise ConfigError(f"port {self.port} on 127.0.0.1 is in use (another MLflow UI?); pass --port 0 to pick a free one")
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        if self.artifacts_destination is not None:
            command += ["--artifacts-destination", str(self.artifacts_destination)]
        # Job execution would start a huey consumer per server: nothing here uses MLflow jobs.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.server.start(command, f"{self.url}/health", STARTUP_SECONDS, cwd=self.cwd, env=env)
        return self

    def wait(self) -> None:
        self.server.wait()

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
