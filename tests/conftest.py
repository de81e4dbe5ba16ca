"""Shared fixtures: a small dataset with planted structure, generated here (no shared data).

Users belong to one of four taste clusters and mostly interact with their cluster's
items, so a model that learns anything ranks held-out items far above the random floor.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rectune.models.dataset import build_dataset
from rectune.models.features import attach_item_features
from rectune.models.splits import SplitStrategy

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def planted_interactions(n_users: int = 240, n_items: int = 160, clusters: int = 4, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    items_per_cluster = n_items // clusters
    for user in range(n_users):
        cluster = user % clusters
        n = int(rng.integers(8, 16))
        own = rng.choice(items_per_cluster, size=n - 1, replace=False) + cluster * items_per_cluster
        noise = rng.integers(0, n_items, size=1)
        for item in np.unique(np.concatenate([own, noise])):
            rows.append((f"U{user:04d}", f"I{item:04d}", int(rng.integers(0, 10**6))))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def write_baby_format(directory, n_users: int = 120, n_items: int = 80):
    """The planted interactions as `<directory>/amazon-baby/interactions.tsv.gz`, so that
    commands that load datasets by name can run on them."""
    import gzip

    frame = planted_interactions(n_users=n_users, n_items=n_items)
    labels = SplitStrategy("random", seed=1).assign(frame, "planted")
    lines = ["reviewerID\tasin\tmmrec_userID\tmmrec_itemID\tlattice_userID\tlattice_itemID\tsplit"]
    lines += [f"{u}\t{i}\t0\t0\t0\t0\t{('train', 'val', 'test')[s]}" for u, i, s in zip(frame["user"], frame["item"], labels)]
    (directory / "amazon-baby").mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / "amazon-baby" / "interactions.tsv.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return directory


@pytest.fixture
def baby_format_dir(tmp_path):
    return write_baby_format(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One feature and model cache for agent sessions on the baby-format fixture: each session
    after the first skips retraining the default pipelines."""
    return str(tmp_path_factory.mktemp("shared-cache"))


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    frame = planted_interactions()
    dataset = build_dataset("planted", frame, source="planted", split=SplitStrategy("random", seed=3))
    return attach_item_features(dataset, cache_dir=tmp_path_factory.mktemp("cache"), collaborative_dim=16)


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server on 127.0.0.1 for this test run, stopped at the end.

    Yields the URL of its maintenance database; tests create their own databases."""
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from rectune.tools.loopback import pick_free_port

    programs = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    pg_ctl = str(programs[-1]) if programs else shutil.which("pg_ctl")
    if pg_ctl is None:
        pytest.skip("PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)")
    initdb = str(Path(pg_ctl).with_name("initdb"))
    # PostgreSQL refuses to run as root; the Debian package's `postgres` user owns the cluster
    # then, in a directory of its own (pytest's temporary tree is closed to other users).
    as_owner = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no `postgres` user to run PostgreSQL as")
        as_owner = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="rectune-postgres-"))
    if as_owner:
        shutil.chown(root, "postgres")
    data = root / "data"

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_owner, *command], capture_output=True, text=True, timeout=120)

    try:
        done = run(initdb, "-D", str(data), "-A", "trust", "-U", "rectune")
        assert done.returncode == 0, f"initdb failed: {done.stdout}{done.stderr}"
        for _ in range(3):  # another process may take the free port before the server binds it
            port = pick_free_port()
            options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
            started = run(pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
            if started.returncode == 0:
                break
        assert started.returncode == 0, f"pg_ctl start failed: {started.stdout}{started.stderr}"
        yield f"postgresql://rectune@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database on the test run's PostgreSQL server."""
    import re

    import psycopg

    name = "t_" + re.sub(r"\W", "_", request.node.name.lower())[:50]
    with psycopg.connect(postgres_server, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.rsplit("/", 1)[0] + "/" + name
