"""Any MMRec dataset by its path, in every command that takes --dataset, without registering it."""

import json

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from conftest import planted_interactions
from rectune.agent.cli import app
from rectune.models.errors import ConfigError
from rectune.models.loaders import dataset_label, load_dataset
from rectune.models.splits import SplitStrategy
from rectune.tools.runner import TrialRunner

runner = CliRunner()


def write_mmrec_dataset(directory, name: str = "toy"):
    """The planted interactions as MMRec writes a dataset: `<name>.inter` with integer ids and
    the split in x_label (0/1/2), and text features whose rows are indexed by itemID.
    Returns the x_label counts."""
    frame = planted_interactions(n_users=120, n_items=80)
    labels = SplitStrategy("random", seed=1).assign(frame, "planted")
    users = frame["user"].str[1:].astype(int).to_numpy()
    items = frame["item"].str[1:].astype(int).to_numpy()
    directory.mkdir(parents=True)
    rows = "".join(f"{u}\t{i}\t{t}\t{s}\n" for u, i, t, s in zip(users, items, frame["timestamp"], labels))
    (directory / f"{name}.inter").write_text("userID\titemID\ttimestamp\tx_label\n" + rows)
    clusters = np.eye(4)[np.arange(items.max() + 1) // 20]
    np.save(directory / "text_feat.npy", clusters + np.random.default_rng(0).normal(scale=0.1, size=clusters.shape))
    return np.bincount(labels, minlength=3)


@pytest.fixture
def mmrec_dir(tmp_path):
    directory = tmp_path / "datasets" / "toy"
    write_mmrec_dataset(directory)
    return directory


def test_a_path_loads_as_mmrec_split_by_x_label(tmp_path):
    counts = write_mmrec_dataset(tmp_path / "toy")
    dataset = load_dataset(tmp_path / "toy")
    assert (dataset.name, dataset.report.split) == ("toy", "given")
    assert [dataset.split(s).nnz for s in ("train", "val", "test")] == counts.tolist()
    assert dataset.item_features.source == "npy:text_feat"
    assert load_dataset(tmp_path / "toy" / "toy.inter").n_users == dataset.n_users
    assert dataset_label(tmp_path / "toy") == dataset_label(tmp_path / "toy" / "toy.inter") == "toy"
    assert dataset_label("baby") == "baby"


def test_a_path_that_is_no_mmrec_dataset_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope': neither a registered name \['baby', 'beauty-2023', 'ml-100k'\] nor a path"):
        load_dataset("nope")
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t2\n")  # RecBole, not MMRec
    with pytest.raises(ConfigError, match="a path, but not an MMRec dataset .*--format F"):
        load_dataset(tmp_path / "ml")


def test_data_info_and_evaluate_take_a_relative_path(mmrec_dir, monkeypatch):
    monkeypatch.chdir(mmrec_dir.parent)
    info = runner.invoke(app, ["data", "info", "toy"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["name"] == "toy"
    result = runner.invoke(app, ["evaluate", "--dataset", "toy", "--groups", "activity:2", "--pipelines", "heuristic",
                                 "--set", "k=60", "--set", "top_n=10", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "toy: 120 users, 80 items, item features npy:text_feat" in result.output
    assert {line.split()[0] for line in result.output.splitlines() if "heuristic" in line} == {"overall", "cold", "heavy"}


def test_baseline_records_the_absolute_path_so_workers_load_it_from_anywhere(mmrec_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(mmrec_dir.parent)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = runner.invoke(app, ["baseline", "--dataset", "toy", "--groups", "all", "--group", "all", "--pipeline", "heuristic",
                                 "--budget", "2", "--sampler", "random", "--storage", storage, "--no-progress",
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    (summary,) = optuna.get_all_study_summaries(storage)
    assert str(mmrec_dir) in json.dumps(summary.user_attrs)
    monkeypatch.chdir(tmp_path)
    again = TrialRunner.open(str(mmrec_dir), "all", cache_dir=tmp_path / "cache")
    assert again.dataset.name == "toy" and again.dataset.n_items == 80
