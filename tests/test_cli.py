"""The `rectune` commands, run in-process on a Baby-format file generated from the planted data."""

import json
import re

import pytest
from typer.testing import CliRunner

from rectune.agent.cli import app

runner = CliRunner()


@pytest.fixture
def data_dir(baby_format_dir):
    return baby_format_dir


def test_evaluate_compares_pipelines_per_group(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RECTUNE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["evaluate", "--data-dir", str(data_dir), "--groups", "activity:2", "--pipelines", "heuristic,two_tower",
                                 "--set", "epochs=1", "--set", "k=40", "--objective", "recall@20", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "cold" in result.output and "heavy" in result.output
    marked = [line.split()[0] for line in result.output.splitlines() if re.match(r"^\S+\s+\*", line)]
    assert marked == ["overall", "cold", "heavy"]  # one best pipeline per group and overall
    written = json.loads(out.read_text())
    assert set(written["results"]) == {"heuristic", "two_tower"}
    assert written["results"]["two_tower"]["config"]["epochs"] == 1


@pytest.mark.parametrize("args, message", [
    (["--set", "k=5", "--set", "top_n=20"], "k (candidates) must be ≥ top_n"),
    (["--set", "embedding=3"], "unknown parameter(s) ['embedding']"),
    (["--groups", "age"], "needs the user attribute 'age'"),
    (["--pipelines", "bpr"], "pipeline must be one of"),
])
def test_evaluate_bad_input_is_one_clear_line(data_dir, args, message):
    result = runner.invoke(app, ["evaluate", "--data-dir", str(data_dir), "--no-progress", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_evaluate_missing_dataset_names_the_directory(tmp_path):
    result = runner.invoke(app, ["evaluate", "--data-dir", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2
    assert "amazon-baby" in result.output and "rectune data pull baby" in result.output


def test_data_info_reads_a_path_in_a_given_format(tmp_path):
    from fixture_data import write_mmrec

    path, _, _ = write_mmrec(tmp_path / "mmrec")
    result = runner.invoke(app, ["data", "info", str(path), "--format", "mmrec"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["name"], summary["users"], summary["items"], summary["item_features"]) == ("baby", 3, 6, "npy:text_feat+image_feat")
    # An MMRec dataset is recognised by its header, without --format.
    plain = runner.invoke(app, ["data", "info", str(path)])
    assert plain.exit_code == 0 and json.loads(plain.stdout) == summary
    unknown = runner.invoke(app, ["data", "info", str(path), "--format", "xml"], env={"COLUMNS": "200"})
    assert unknown.exit_code == 2
    assert "'xml' is not one of 'amazon2014', 'amazon2023', 'baby', 'mmrec', 'movielens'" in unknown.output


def test_data_info_prints_data_warnings_one_line_each(tmp_path):
    from fixture_data import write_movielens_original

    directory = write_movielens_original(tmp_path / "ml")
    lines = (directory / "u.user").read_text().splitlines(keepends=True)
    (directory / "u.user").write_text("".join(lines[:-1]))
    result = runner.invoke(app, ["data", "info", str(directory / "u.data"), "--format", "movielens"])
    assert result.exit_code == 0, result.output
    warning = f"1 of 4 users have no row in {directory / 'u.user'} (e.g. 4); they are kept without attributes"
    assert result.stderr == f"warning: {warning}\n"
    assert json.loads(result.stdout)["notes"] == [warning]


def test_evaluate_baseline_and_tune_refuse_a_split_without_validation_rows(tmp_path):
    from test_loaders import all_train_baby

    data = tmp_path / "data"
    all_train_baby(data)
    stores = ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
              "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache")]
    checkpoint = str(tmp_path / "sessions.db")
    commands = {
        "evaluate": ["evaluate", "--data-dir", str(data), "--groups", "all", "--pipelines", "heuristic", "--no-progress"],
        "baseline": ["baseline", "--dataset", "baby", "--groups", "all", "--group", "all", "--pipeline", "heuristic",
                     "--budget", "2", *stores],
        # Refused before the LLM is started: nothing listens at the discard port.
        "tune": ["tune", "--session", "s", "--dataset", "baby", "--groups", "all", "--budget", "2", "--approve", "auto",
                 "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--checkpoint", checkpoint, "--no-trace-llm", *stores],
    }
    for name, args in commands.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "interactions.tsv.gz: no validation rows (split 'given')" in errors[0], (name, result.stderr)
        assert "nan" not in result.stdout and "Traceback" not in result.output
    assert "no sessions in" in runner.invoke(app, ["sessions", "--checkpoint", checkpoint]).output


def test_tune_refuses_a_group_label_mlflow_cannot_hold_before_the_first_checkpoint(tmp_path, baby_format_dir):
    groups = tmp_path / "groups.csv"
    label = "customers who bought " + "very " * 50 + "much"
    groups.write_text("user_id,group\n" + "".join(f"U{u:04d},{label if u % 2 else 'rest'}\n" for u in range(120)))
    checkpoint = str(tmp_path / "sessions.db")
    result = runner.invoke(app, [
        "tune", "--session", "s", "--dataset", "baby", "--groups", f"file:{groups}", "--budget", "2", "--approve", "auto",
        "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--checkpoint", checkpoint, "--no-trace-llm",
        "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--data-dir", str(baby_format_dir), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert f"group label {label[:60] + '…'!r} of 'file:{groups}' is {len(label)} characters long" in result.stderr
    assert "no sessions in" in runner.invoke(app, ["sessions", "--checkpoint", checkpoint]).output


def test_one_process_at_a_time_drives_a_session(tmp_path, baby_format_dir, shared_cache):
    """A live `tune` holds its session: `sessions` names it, a second `resume` process is refused;
    killed, it holds nothing (the kernel drops the lock), and the session resumes."""
    import signal
    import subprocess
    import sys
    import time

    from rectune.agent.lock import holder
    from scripted_llm import ScriptedLLM
    from test_llm_endpoint import DENSER

    checkpoint = str(tmp_path / "sessions.db")
    common = ["--checkpoint", checkpoint, "--no-trace-llm"]
    with ScriptedLLM([DENSER]) as llm:  # its one proposal (no pick: ndcg@20 leaves no tie on all users)
        first = subprocess.Popen(
            [sys.executable, "-m", "rectune.agent.cli", "tune", "--session", "s", "--dataset", "baby", "--groups", "all",
             "--budget", "3", "--approve", "ask", "--llm-base-url", llm.base_url, "--llm-model", "scripted",
             "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--data-dir", str(baby_format_dir), "--cache-dir", shared_cache, *common],
            cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while not llm.requests and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)  # it asks the person about the proposal now, holding the session
            assert len(llm.requests) == 1 and first.poll() is None, first.communicate(timeout=30)[0]
            assert holder(checkpoint, "s").startswith(f"pid {first.pid} on ")
            listing = runner.invoke(app, ["sessions", "--checkpoint", checkpoint])
            assert f"running (pid {first.pid} on " in listing.output, listing.output

            second = subprocess.run([sys.executable, "-m", "rectune.agent.cli", "resume", "s", *common], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"error: session 's' is being run by another process (pid {first.pid} on " in second.stderr
            assert "wait for it to end or stop it" in second.stderr and "Traceback" not in second.stderr
            assert len(llm.requests) == 1  # the refused process asked the LLM nothing
            # Kill it only once its question is checkpointed: a kill before that leaves a session
            # interrupted before its approval step, which is another test's subject.
            from rectune.agent.session import latest_checkpoint, session_status

            while time.monotonic() < deadline and session_status(latest_checkpoint("s", checkpoint)) != "waiting for approval":
                time.sleep(0.5)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        assert holder(checkpoint, "s") is None
        listing = runner.invoke(app, ["sessions", "--checkpoint", checkpoint]).output
        assert "waiting for approval" in listing and "running" not in listing
        resumed = runner.invoke(app, ["resume", "s", *common], input="")  # asked again; nobody answers: it waits
        assert resumed.exit_code == 0, resumed.output
        assert "[approve] group all (heuristic), trial 2/3" in resumed.output and "neighbors" in resumed.output
    assert len(llm.requests) == 1


@pytest.mark.postgres
def test_a_session_lock_on_postgresql_names_its_holder_and_refuses_a_second(postgres_url):
    import os

    from rectune.agent.lock import SessionBusy, holder, session_lock

    assert holder(postgres_url, "s") is None
    with session_lock(postgres_url, "s"):
        assert holder(postgres_url, "s").startswith(f"pid {os.getpid()} on ")
        # Advisory locks belong to a connection: a second one, even from this process, is refused.
        with pytest.raises(SessionBusy, match=f"session 's' is being run by another process \\(pid {os.getpid()} on "):
            with session_lock(postgres_url, "s"):
                pass
        with session_lock(postgres_url, "another session"):
            assert holder(postgres_url, "another session") is not None
    assert holder(postgres_url, "s") is None and holder(postgres_url, "another session") is None
