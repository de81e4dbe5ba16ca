"""A server process of ours on 127.0.0.1: the embedded LLM, `mlflow server`.

It runs in its own process group — a terminal's Ctrl-C reaches only us, and we stop the
server and whatever it forked deliberately — is polled on /health until it answers, and
is stopped by signalling the group and waiting until the group is gone, so that no
orphaned worker keeps a port or a SQLite file. An atexit hook covers exits that skip
`stop`.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

# An http_proxy in the environment must not capture loopback traffic.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def pick_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LoopbackProcess:
    """`what` names the server in errors, which are raised as `error`; without a log path
    the output goes to a temporary file that is removed on stop."""

    def __init__(self, what: str, error: type[Exception], log_path: Path | None = None):
        self.what = what
        self.error = error
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._temporary_log = None

    def start(self, command: list[str], health_url: str, startup_seconds: float,
              cwd: Path | None = None, env: dict | None = None) -> float:
        """Start it and return the seconds it took to answer /health; stopped again on any failure."""
        if self.log_path is None:
            self._temporary_log = tempfile.NamedTemporaryFile(prefix="rectune-", suffix=".log")
            self.log_path = Path(self._temporary_log.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # A file, not a pipe: nobody reads the output while the server runs, and a full pipe would block it.
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)
        try:
            while not self._healthy(health_url):
                if self.process.poll() is not None:
                    raise self._failure(f"exited with code {self.process.returncode} while starting")
                if time.monotonic() - started > startup_seconds:
                    raise self._failure(f"did not answer {health_url} within {startup_seconds:.0f} s")
                time.sleep(0.25)
        except BaseException:  # Ctrl-C while it starts included: nothing may outlive us
            self.stop()
            raise
        return time.monotonic() - started

    def wait(self) -> None:
        """Block while it runs; a server that dies on its own is an error, with its log."""
        if self.process is not None:
            raise self._failure(f"exited with code {self.process.wait()}")

    def stop(self, grace_seconds: float = 10.0) -> None:
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is not None:
            _signal_group(process.pid, signal.SIGTERM)
            if not _wait_group(process, grace_seconds):
                _signal_group(process.pid, signal.SIGKILL)
                # A container whose init does not reap could keep zombies in the group: give up then.
                _wait_group(process, grace_seconds)
        if self._temporary_log is not None:
            self._temporary_log.close()
            self._temporary_log = None

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:] if self.log_path else ""
        except FileNotFoundError:
            return ""

    def _failure(self, what_happened: str) -> Exception:
        return self.error(f"{self.what} {what_happened}; its log {self.log_path} ends with:\n{self.log_tail()}")

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            with DIRECT.open(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _wait_group(process: subprocess.Popen, seconds: float) -> bool:
    """Whether the whole group is gone within `seconds`; reaping the leader as we go, or
    its zombie would keep the group alive."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
