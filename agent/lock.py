"""One process at a time drives a session: an advisory lock held while `tune` or `resume` runs it.

Two processes on one LangGraph thread both read its latest checkpoint and run the same next
step: groups went over budget, proposal ids repeated, MLflow got runs twice. The lock is
- beside a SQLite checkpoint: an flock on `<checkpoint>.locks/<digest>.lock`, whose text
  names the holder (pid, host, start); the kernel drops it when the holder dies, SIGKILL
  included, so a crashed session never stays locked;
- on PostgreSQL: `pg_try_advisory_lock` on a connection of its own, held open for the run
  (the server drops it with the connection); its application_name names the holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rectune.models.errors import ConfigError, RectuneError

_HOLDER_PREFIX = "rectune session lock: "


class SessionBusy(RectuneError):
    """Another live process is driving the session."""


def _postgres(checkpoint: str) -> bool:
    return checkpoint.startswith(("postgres://", "postgresql://"))


def _key(session: str) -> int:
    """A positive 63-bit advisory-lock key for the session."""
    digest = hashlib.sha256(f"rectune-session:{session}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def lock_path(checkpoint: str, session: str) -> Path:
    path = Path(checkpoint)
    return path.with_name(path.name + ".locks") / f"{_key(session):016x}.lock"


def _me() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


def _busy(session: str, holder: str) -> SessionBusy:
    return SessionBusy(f"session {session!r} is being run by another process ({holder}); wait for it to end "
                       "or stop it, then `rectune resume` it")


@contextmanager
def session_lock(checkpoint: str, session: str) -> Iterator[None]:
    """Hold the session's lock for the block; SessionBusy at once when a live process holds it."""
    if _postgres(checkpoint):
        with _postgres_lock(checkpoint, session):
            yield
        return
    path = lock_path(checkpoint, session)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise _busy(session, _holder_text(handle.read())) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"session": session, "holder": _me()}))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder_text(text: str) -> str:
    try:
        return str(json.loads(text)["holder"])
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def holder(checkpoint: str, session: str) -> str | None:
    """Who holds the session's lock now ('pid … on … since …'), None when nobody does."""
    if _postgres(checkpoint):
        return _postgres_holder(checkpoint, session)
    path = lock_path(checkpoint, session)
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(handle.read())
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _connect(checkpoint: str, application_name: str = "rectune"):
    try:
        import psycopg
    except ImportError as error:
        raise ConfigError("a PostgreSQL checkpoint needs the postgres extra: `pip install -e '.[postgres]'`") from error

    from rectune.tools.tracking import one_line, scrub

    try:
        return psycopg.connect(checkpoint, autocommit=True, application_name=application_name)
    except psycopg.Error as error:
        raise ConfigError(scrub(f"cannot open the session store {checkpoint}: {one_line(error)}")) from error


@contextmanager
def _postgres_lock(checkpoint: str, session: str) -> Iterator[None]:
    # application_name holds at most 63 bytes: the holder line without its date fits.
    connection = _connect(checkpoint, (_HOLDER_PREFIX + _me())[:63])
    with connection:
        if not connection.execute("SELECT pg_try_advisory_lock(%s)", (_key(session),)).fetchone()[0]:
            raise _busy(session, _postgres_holder(checkpoint, session) or "holder unknown")
        try:
            yield
        finally:
            connection.execute("SELECT pg_advisory_unlock(%s)", (_key(session),))


def _postgres_holder(checkpoint: str, session: str) -> str | None:
    key = _key(session)
    with _connect(checkpoint) as connection:
        row = connection.execute(
            "SELECT a.application_name, a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1",
            (key >> 32, key & 0xFFFFFFFF)).fetchone()
    if row is None:
        return None
    name, started = row
    who = name.removeprefix(_HOLDER_PREFIX).split(" since ")[0] if name.startswith(_HOLDER_PREFIX) else f"connection {name!r}"
    return f"{who} since {started:%Y-%m-%d %H:%M:%S %Z}"
