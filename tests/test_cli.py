"""The `rectune` commands, run in-process on a Baby-format file generated from the planted data."""

import json
import re

import pytest
from typer.testing import CliRunner

from agent.cli import app

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
    # Without --format a path is not a registered name; the error names the option.
    plain = runner.invoke(app, ["data", "info", str(path)])
    assert plain.exit_code == 2 and "give a path with a format (--format on the command line)" in plain.stderr
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
