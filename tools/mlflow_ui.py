"""A real `mlflow server` on 127.0.0.1 against a tracking store, started and stopped by PID.

Used by `rectune ui` to review sessions in the MLflow UI and by the tests that exercise a
real tracking server. The server forks workers into its own process group, so it is
stopped by signalling the group, and the stop waits until the group is gone: a port or
a SQLite file must not stay held by an orphaned worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from models.errors import ConfigError
from tools.tracking import sqlite_path

STARTUP_SECONDS = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


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
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.artifacts_destination = artifacts_destination
        self.cwd = cwd
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        if not port_free(self.port):
            raise ConfigError(f"port {self.port} on 127.0.0.1 is in use (another MLflow UI?); pass --port 0 to pick a free one")
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        if self.artifacts_destination is not None:
            command += ["--artifacts-destination", str(self.artifacts_destination)]
        # Job execution would start a huey consumer per server: nothing here uses MLflow jobs.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        started = time.monotonic()
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() - started > STARTUP_SECONDS:
                why = "exited" if self.process.poll() is not None else f"did not answer /health in {STARTUP_SECONDS:.0f} s"
                self.stop()
                raise ConfigError(f"mlflow server on port {self.port} {why}; {self._log_tail()}")
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - started
        return self

    def wait(self) -> None:
        """Block while the server runs; a server that dies on its own is an error with its log."""
        while self.process is not None and self.process.poll() is None:
            time.sleep(0.5)
        if self.process is not None:
            raise ConfigError(f"mlflow server exited with code {self.process.returncode}; {self._log_tail()}")

    def _log_tail(self) -> str:
        return f"its log {self.log_path} ends with:\n" + self.log_path.read_text(errors="replace")[-3000:]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        pid, self.process = self.process.pid, None
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _group_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _group_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _group_alive(pid):
                _reap(pid)
                time.sleep(0.1)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    """Collect our child's exit status, else it stays a zombie and its group looks alive."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
