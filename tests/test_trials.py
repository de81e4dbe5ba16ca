"""The trial runner, its model cache, the Optuna ledger, the baseline and the workers."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

import rectune.models.deepfm
import rectune.models.two_tower
from rectune.models.errors import ConfigError, InvalidProposal
from rectune.models.groups import make_groups
from rectune.tools import ledger
from rectune.tools.adoption import adopt
from rectune.tools.baseline import run_baseline
from rectune.tools.cache import ModelCache
from rectune.tools.ledger import reclaim_orphans
from rectune.tools.runner import TrialRunner, resolve_objective
from rectune.tools.space import SearchSpace
from rectune.tools.study import Study, StudyContext
from rectune.tools.tracking import Tracker
from rectune.tools.trial import TrialRecord, TrialSpec

SMALL = {"epochs": 1, "ranker_epochs": 1, "embedding_dim": 32, "k": 60, "top_n": 10, "negative_pool": 100, "batch_size": 256}


@pytest.fixture
def fit_counts(monkeypatch):
    """Counts every call of the stages' fit methods (the thing a cache must avoid)."""
    counts = {"two_tower": 0, "deepfm": 0}

    def counting(cls, name):
        original = cls.fit

        def fit(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "fit", fit)

    counting(rectune.models.two_tower.TwoTowerRecall, "two_tower")
    counting(rectune.models.deepfm.DeepFMRanker, "deepfm")
    return counts


@pytest.fixture
def runner(planted):
    return TrialRunner(planted, make_groups(planted, "activity:2"), cache=ModelCache())


def spec(params, group="cold", pipeline="two_tower+deepfm", objective="ndcg@20"):
    small = {k: v for k, v in SMALL.items() if k in SearchSpace.load().defaults(pipeline)}
    return TrialSpec("planted", "activity:2", group, pipeline, {**small, **params}, seed=0, objective=objective)


def test_k_and_top_n_changes_do_not_retrain(runner, fit_counts, monkeypatch):
    first = runner.run(spec({}))
    # The ranker learns from lists of a second recall stage: two two-tower fits, one DeepFM.
    assert fit_counts == {"two_tower": 2, "deepfm": 1} and first.cache == "none"
    more_candidates = runner.run(spec({"k": 80}))
    assert fit_counts == {"two_tower": 2, "deepfm": 1} and more_candidates.cache == "model"
    longer_list = runner.run(spec({"k": 80, "top_n": 15}))
    assert fit_counts == {"two_tower": 2, "deepfm": 1} and longer_list.cache == "ranking"
    assert "precision@15" in longer_list.metrics["cold"]
    # A ranker parameter: the ranker learns again, from the held-out recall stage it learned from before.
    ranker_only = runner.run(spec({"k": 80, "ranker_lr": 0.005}))
    assert fit_counts == {"two_tower": 2, "deepfm": 2} and ranker_only.cache == "recall"
    new_embedding = runner.run(spec({"embedding_dim": 48}))
    assert fit_counts == {"two_tower": 4, "deepfm": 3} and new_embedding.cache == "none"
    # Reusing the held-out recall changes nothing: a fresh runner, with the process's trained towers
    # forgotten, fits it again and gets the same metrics.
    monkeypatch.setattr(rectune.models.two_tower, "_trained", {})
    fresh = TrialRunner(runner.dataset, runner.groups, cache=ModelCache()).run(spec({"k": 80, "ranker_lr": 0.005}))
    assert fit_counts == {"two_tower": 6, "deepfm": 4} and fresh.metrics == ranker_only.metrics


def test_a_cached_pipeline_still_reports_what_fitting_it_cost(runner, tmp_path):
    first = runner.run(spec({}))
    assert first.fit_seconds >= first.train_seconds * 0.5 > 0  # ranker and recall fits, timed inside the trial
    again = runner.run(spec({}, group="heavy"))  # the model selection's next group: same pipeline, from memory
    assert again.cache == "model" and again.train_seconds < 0.1 * first.fit_seconds
    assert again.fit_seconds == first.fit_seconds
    on_disk = TrialRunner(runner.dataset, runner.groups, cache=ModelCache(tmp_path)).run(spec({}))
    assert TrialRunner(runner.dataset, runner.groups, cache=ModelCache(tmp_path)).run(spec({})).fit_seconds == on_disk.fit_seconds


def test_trial_result_holds_the_group_objective_and_metrics(runner):
    result = runner.run(spec({}, pipeline="heuristic", objective="recall@20"), report_test=True)
    assert result.objective == result.metrics["cold"]["recall@20"]
    assert set(result.metrics) == {"overall", "cold"}  # only the group's users are ranked
    assert result.metrics["overall"]["users"] == result.metrics["cold"]["users"]
    assert set(result.test_metrics) == {"overall", "cold"}
    assert result.latency_ms_per_user > 0 and result.feasible
    everyone = runner.run(spec({}, group="all", pipeline="heuristic"))
    assert set(everyone.metrics) == {"overall", "cold", "heavy"}
    assert everyone.objective == everyone.metrics["overall"]["ndcg@20"]


def test_a_trial_keeps_its_objective_per_evaluated_user_of_its_group(runner):
    from rectune.tools.noise import vector

    for group, scope in (("cold", "cold"), ("all", "overall")):
        trial = spec({}, group=group, pipeline="heuristic", objective="recall@20")
        result = runner.run(trial)
        users, values = runner.per_user(trial)
        # Users without validation items are left out: one value per evaluated user, in index order.
        assert result.per_user["n"] == len(users) == result.metrics[scope]["users"] and np.all(np.diff(users) > 0)
        assert np.array_equal(vector(result.per_user), np.round(values, 6))
        assert vector(result.per_user).mean() == pytest.approx(result.objective, abs=1e-6)
    # Coverage belongs to the whole list: there is nothing per user to pair.
    assert runner.run(spec({}, pipeline="heuristic", objective="coverage@20")).per_user is None


def test_run_trial_is_one_reproducible_trial(planted):
    from rectune.tools.runner import run_trial

    groups = make_groups(planted, "activity:2")
    params = spec({}).params
    first = run_trial(planted, groups, "cold", "two_tower+deepfm", params, seed=0)
    again = run_trial(planted, groups, "cold", "two_tower+deepfm", params, seed=0)
    other = run_trial(planted, groups, "cold", "two_tower+deepfm", params, seed=1)
    assert first.cache == again.cache == "none"  # each call trains from scratch
    assert first.objective == first.metrics["cold"]["ndcg@20"]
    assert first.metrics == again.metrics, "the same seed must give the same metrics"
    assert other.metrics != first.metrics


def test_latency_budget_marks_trials_infeasible(planted):
    runner = TrialRunner(planted, make_groups(planted, "all"), max_latency_ms=1e-9)
    assert not runner.run(spec({}, group="all", pipeline="heuristic")).feasible


def test_bad_trials_fail_before_training(runner, fit_counts):
    with pytest.raises(InvalidProposal, match="k=10 must be ≥ top_n=20"):
        runner.run(spec({"k": 10, "top_n": 20}))
    with pytest.raises(ConfigError, match="unknown objective metric 'auc'"):
        runner.run(spec({}, objective="auc@20"))
    assert fit_counts == {"two_tower": 0, "deepfm": 0}


def test_objective_names_resolve_against_the_config():
    from rectune.models.pipeline import PipelineConfig

    config = PipelineConfig(k=100, top_n=30)
    assert resolve_objective("NDCG@20", config) == ("ndcg@20", 20)
    assert resolve_objective("f1@topn", config) == ("f1@30", 30)
    assert resolve_objective("candidate_recall@k", config) == ("candidate_recall@100", None)
    with pytest.raises(ConfigError, match="needs a list of 500"):
        resolve_objective("recall@500", config)
    with pytest.raises(ConfigError, match="must look like"):
        resolve_objective("ndcg", config)
    with pytest.raises(ConfigError, match="at least 1"):
        resolve_objective("ndcg@0", config)


def test_disk_cache_serves_a_second_runner(planted, tmp_path, fit_counts):
    groups = make_groups(planted, "activity:2")
    first = TrialRunner(planted, groups, cache=ModelCache(tmp_path)).run(spec({}))
    assert fit_counts["two_tower"] == 2
    second = TrialRunner(planted, groups, cache=ModelCache(tmp_path)).run(spec({}))
    assert fit_counts["two_tower"] == 2 and second.cache == "model"
    assert second.objective == first.objective


def _must_not_fit():
    raise AssertionError("the stage on disk was not used")


def test_disk_cache_stores_arrays_as_raw_records_and_gives_them_back(tmp_path):
    fitted = {"similarity": np.arange(12, dtype=np.float32).reshape(3, 4).T, "names": np.array(["a", "bc"]),
              "frozen": np.frombuffer(b"abcd", dtype=np.uint8), "scalar": np.array(2.5)}
    ModelCache(tmp_path).get_or_fit("stage", lambda: fitted)
    loaded, cached = ModelCache(tmp_path).get_or_fit("stage", _must_not_fit)
    assert cached
    for name, array in fitted.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert np.array_equal(loaded[name], array)
    with zipfile.ZipFile(tmp_path / "stage.pt") as archive:
        records = [entry for entry in archive.namelist() if "/data/" in entry and not entry.endswith(".pkl")]
    assert len(records) == 3  # the numeric arrays, outside the pickle; the strings stay inside it


def test_disk_cache_stores_a_large_array_once_for_every_stage_that_holds_it(tmp_path, monkeypatch):
    monkeypatch.setattr("rectune.tools.cache.SHARED_ARRAY_BYTES", 4000)
    similarity = np.arange(1000, dtype=np.float64)  # 8,000 bytes: shared
    stages = {"two_tower": {"similarity": similarity, "vectors": np.ones(10), "transposed": similarity.reshape(20, 50).T},
              "heuristic": {"similarity": similarity.copy(), "prior": np.zeros(3)}}
    cache = ModelCache(tmp_path)
    for key, fitted in stages.items():
        cache.get_or_fit(key, lambda fitted=fitted: fitted)
    # One file per distinct large array (the transposed view is other content), none for the small ones.
    assert len(list((tmp_path / "blobs").glob("*.npy"))) == 2
    assert all((tmp_path / f"{key}.pt").stat().st_size < 8000 for key in stages)
    fresh = ModelCache(tmp_path)
    for key, fitted in stages.items():
        loaded, cached = fresh.get_or_fit(key, _must_not_fit)
        assert cached and loaded.keys() == fitted.keys()
        for name, array in fitted.items():
            assert loaded[name].shape == array.shape and np.array_equal(loaded[name], array)


def test_disk_cache_drops_a_shared_array_with_the_last_stage_that_uses_it(tmp_path, monkeypatch):
    monkeypatch.setattr("rectune.tools.cache.SHARED_ARRAY_BYTES", 4000)
    shared, other = np.arange(1000, dtype=np.float64), np.ones(1000)
    cache = ModelCache(tmp_path)
    for i, key in enumerate(("a", "b")):
        cache.get_or_fit(key, lambda: {"similarity": shared, "id": key})
        os.utime(tmp_path / f"{key}.pt", (i, i))
    blob = next((tmp_path / "blobs").glob("*.npy"))
    # Room for one stage and its array: c's arrival evicts a (the array stays: b uses it), then b (it goes).
    small = ModelCache(tmp_path, max_disk_bytes=blob.stat().st_size + 4000)
    killed = tmp_path / "blobs" / "killed-save.tmp"  # what a save killed while writing its blob leaves
    killed.write_bytes(b"x" * 100)
    small.get_or_fit("c", lambda: {"similarity": other})
    assert not killed.exists()
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists() and not blob.exists()
    assert (tmp_path / "c.pt").exists() and len(list((tmp_path / "blobs").glob("*.npy"))) == 1
    assert np.array_equal(ModelCache(tmp_path).get_or_fit("c", _must_not_fit)[0]["similarity"], other)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_disk_cache_fits_again_a_stage_whose_shared_array_is_gone_or_torn(tmp_path, monkeypatch, damage):
    monkeypatch.setattr("rectune.tools.cache.SHARED_ARRAY_BYTES", 4000)
    fitted = {"similarity": np.arange(1000, dtype=np.float64)}
    ModelCache(tmp_path).get_or_fit("stage", lambda: fitted)
    blob = next((tmp_path / "blobs").glob("*.npy"))
    if damage == "deleted":
        blob.unlink()
    else:  # as a power loss may leave it: the header intact, the data cut short
        blob.write_bytes(blob.read_bytes()[:2000])
    again = ModelCache(tmp_path)
    loaded, cached = again.get_or_fit("stage", lambda: fitted)
    assert not cached and again.fits == 1
    # The torn blob was replaced, not trusted again: the stage now loads from disk.
    assert np.array_equal(ModelCache(tmp_path).get_or_fit("stage", _must_not_fit)[0]["similarity"], fitted["similarity"])
    assert not list((tmp_path / "blobs").glob("*.tmp"))


def test_disk_cache_keeps_large_arrays_of_other_than_plain_numbers_in_the_stage_file(tmp_path, monkeypatch):
    monkeypatch.setattr("rectune.tools.cache.SHARED_ARRAY_BYTES", 64)
    fitted = {"when": np.arange(100).astype("datetime64[D]"),
              "pairs": np.zeros(16, dtype=[("a", "f8"), ("b", "i8")]), "other_pairs": np.zeros(16, dtype=[("x", "i8"), ("y", "f8")])}
    ModelCache(tmp_path).get_or_fit("stage", lambda: fitted)
    assert not list((tmp_path / "blobs").glob("*.npy"))
    loaded = ModelCache(tmp_path).get_or_fit("stage", _must_not_fit)[0]
    for name, array in fitted.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array)


def test_disk_cache_evicts_oldest_beyond_its_budget(tmp_path):
    cache = ModelCache(tmp_path, max_disk_bytes=3000)
    for i in range(3):
        cache.get_or_fit(f"key{i}", lambda: np.zeros(200))  # ~1.8 KB each on disk
        os.utime(tmp_path / f"key{i}.pt", (i, i))
    assert not (tmp_path / "key0.pt").exists() and (tmp_path / "key2.pt").exists()


def test_disk_budget_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RECTUNE_CACHE_MAX_GB", str(3000 / 2**30))
    cache = ModelCache(tmp_path)
    for i in range(3):
        cache.get_or_fit(f"key{i}", lambda: np.zeros(200))
        os.utime(tmp_path / f"key{i}.pt", (i, i))
    assert not (tmp_path / "key0.pt").exists() and (tmp_path / "key2.pt").exists()
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv("RECTUNE_CACHE_MAX_GB", bad)
        with pytest.raises(ConfigError, match=f"RECTUNE_CACHE_MAX_GB='{bad}': expected a size in GB above 0"):
            ModelCache(tmp_path)


def test_two_processes_fit_a_stage_once(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from rectune.tools.cache import ModelCache
        def fit():
            with open({str(tmp_path / 'fits.log')!r}, "a") as log:
                log.write("fit\\n")
            time.sleep(1.5)
            return {{"weights": [1, 2, 3]}}
        value, cached = ModelCache({str(tmp_path / 'cache')!r}).get_or_fit("shared", fit)
        print(value["weights"], cached)
    """)
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
    assert outputs == ["[1, 2, 3] False", "[1, 2, 3] True"]
    assert (tmp_path / "fits.log").read_text() == "fit\n"


def heuristic_context(**changes):
    values = {"dataset": "planted", "groups": "activity:2", "group": "cold", "pipeline": "heuristic", "budget": 3, "tuner": "tpe"}
    return StudyContext(**{**values, **changes})


def queue(study: Study, params: dict, tuner: str = "llm", **attrs) -> int:
    return ledger.enqueue(study.optuna, TrialRecord(-1, tuner, "waiting", params, **attrs))


def claim_without_owner(study: Study, number: int) -> None:
    """What a process that dies between claiming a trial and naming itself its owner leaves."""
    storage, trial_id = ledger._handle(study.optuna, number)
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING)


def test_baseline_continues_to_the_budget_without_repeating(runner, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_baseline(heuristic_context(budget=3), runner, storage, "s", tracker, progress=False)
    study = run_baseline(heuristic_context(budget=5), runner, storage, "s", tracker, progress=False)
    trials = study.history()
    assert [t.state for t in trials] == ["complete"] * 5 and len(study.optuna.get_trials()) == 5
    assert trials[0].tuner == "default"
    assert trials[0].params == runner.space.defaults("heuristic")
    assert [t.tuner for t in trials[1:]] == ["tpe"] * 4
    params = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(params)) == 5, "a continued study replayed its samples"
    again = run_baseline(heuristic_context(budget=5), runner, storage, "s", tracker, progress=False)
    assert len(again.optuna.get_trials()) == 5 and again.ran == 0

    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("planted").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 5
    assert parents[0].data.params["tpe.multivariate"] == "True" and parents[0].data.tags["budget"] == "5"
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1, 2, 3, 4]
    child = next(c for c in children if c.data.tags["trial_number"] == "0")
    assert child.data.tags["tuner"] == "default" and child.data.tags["optuna_study"] == "s"
    assert child.data.metrics["objective"] == pytest.approx(trials[0].objective)
    assert child.data.metrics["val/cold/ndcg_at_20"] == pytest.approx(trials[0].objective)


def test_a_study_refuses_other_settings(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    Study.open(storage, "s", heuristic_context())
    with pytest.raises(ConfigError, match="pipeline='two_tower'"):
        Study.open(storage, "s", heuristic_context(pipeline="two_tower"))
    with pytest.raises(ConfigError, match="no study 'other'"):
        Study.open(storage, "other")


def test_a_trial_whose_process_died_is_run_again(runner, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = Study.open(storage, "s", heuristic_context(budget=2))
    number = queue(study, runner.space.defaults("heuristic"), "default", proposal_id="default")
    assert ledger.claim(study.optuna, number, runner.space.distributions("heuristic"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage_, trial_id = ledger._handle(study.optuna, number)
    storage_.set_trial_user_attr(trial_id, "owner", {"host": os.uname().nodename, "pid": dead.pid})
    study = run_baseline(heuristic_context(budget=2), runner, storage, "s", progress=False)
    states = [t.state for t in study.optuna.get_trials()]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.FAIL) == 1
    retried = [t for t in study.optuna.get_trials() if "retry_of" in t.user_attrs]
    assert len(retried) == 1 and retried[0].user_attrs["tuner"] == "default"
    assert study.spent() == 2 and [r.tuner for r in study.history()] == ["default", "tpe"]


def test_a_trial_popped_but_never_claimed_is_queued_again_with_its_proposal(tmp_path):
    study = Study.open(f"sqlite:///{tmp_path / 'optuna.db'}", "s", heuristic_context())
    claim_without_owner(study, queue(study, {"top_n": 7}, rationale="why", proposal_id="p1"))
    assert reclaim_orphans(study.optuna, grace_seconds=0.3) == 1
    waiting = study.optuna.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].system_attrs["fixed_params"] == {"top_n": 7}
    assert waiting[0].user_attrs["proposal_id"] == "p1" and waiting[0].user_attrs["rationale"] == "why"
    assert study.optuna.get_trials(states=(TrialState.RUNNING,)) == []
    assert study.find("p1").state == "waiting" and study.history() == []


def test_a_trial_being_claimed_is_left_to_its_process(tmp_path):
    import threading

    study = Study.open(f"sqlite:///{tmp_path / 'optuna.db'}", "s", heuristic_context())
    number = queue(study, {"top_n": 7})
    claim_without_owner(study, number)
    storage, trial_id = ledger._handle(study.optuna, number)
    claim = threading.Timer(0.2, storage.set_trial_user_attr, (trial_id, "owner", {"host": os.uname().nodename, "pid": os.getpid()}))
    claim.start()
    assert reclaim_orphans(study.optuna, grace_seconds=30) == 0
    claim.join()
    assert [t.number for t in study.optuna.get_trials(states=(TrialState.RUNNING,))] == [number]


def test_a_watched_trial_that_ends_without_an_owner_ends_the_watch(tmp_path):
    # E.g. another process reclaimed it meanwhile (it fails the trial, then queues it again).
    import threading

    study = Study.open(f"sqlite:///{tmp_path / 'optuna.db'}", "s", heuristic_context())
    number = queue(study, {"top_n": 7})
    claim_without_owner(study, number)
    abandon = threading.Timer(0.2, study.optuna.tell, (number,), {"state": TrialState.FAIL})
    abandon.start()
    result = []
    # In a thread, so that a reclaimer that never stops watching fails the test instead of hanging it.
    watch = threading.Thread(target=lambda: result.append(reclaim_orphans(study.optuna, grace_seconds=600)), daemon=True)
    watch.start()
    watch.join(timeout=30)
    abandon.join()
    assert not watch.is_alive() and result == [0]
    assert study.optuna.get_trials(states=(TrialState.WAITING,)) == []


def test_an_orphan_reclaimed_by_two_processes_is_queued_once(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = Study.open(storage, "s", heuristic_context())
    claim_without_owner(first, queue(first, {"top_n": 7}, proposal_id="p1"))
    second = Study.open(storage, "s")
    orphan = second.optuna.get_trials(states=(TrialState.RUNNING,))[0]
    assert reclaim_orphans(first.optuna, grace_seconds=0.1) == 1
    # The second process saw the same orphan before the first one failed it.
    assert ledger.retry(second.optuna, orphan) is False
    assert len(second.queued()) == 1


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_workers_run_each_queued_trial_once(baby_format_dir, tmp_path, backend, request):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    context = StudyContext("baby", "activity:2", "all", "heuristic", budget=6, tuner="random")
    study = Study.open(storage, "queue", context)
    for neighbors in (10, 20, 30, 40, 50, 60):
        queue(study, {"neighbors": neighbors, "k": 60}, rationale=f"try {neighbors} neighbours")
    env = {**os.environ, "RECTUNE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "rectune.agent.cli", "worker", "--study", "queue", "--storage", storage, "--no-sample",
               "--data-dir", str(baby_format_dir), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    ran = [int(out.split("ran ")[1].split()[0]) for out, _ in outputs]
    assert sum(ran) == 6
    trials = optuna.load_study(study_name="queue", storage=storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["neighbors"] for t in complete) == [10, 20, 30, 40, 50, 60]
    assert len(complete) == len(trials), "a worker ran or made a trial beyond the queue"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("baby").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == sorted(t.number for t in complete)
    assert all(r.data.tags["tuner"] == "llm" for r in children)


def test_two_sampling_workers_share_one_budget(baby_format_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    Study.open(storage, "pool", StudyContext("baby", "activity:2", "all", "heuristic", budget=4, tuner="random"))
    env = {**os.environ, "RECTUNE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "rectune.agent.cli", "worker", "--study", "pool", "--storage", storage,
               "--data-dir", str(baby_format_dir), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    history = Study.open(storage, "pool").history()
    ran = sum(int(out.split("ran ")[1].split()[0]) for out, _ in outputs)
    assert ran == len(history) and all(r.state == "complete" for r in history)
    assert [r.tuner for r in history].count("default") == 1 and history[0].tuner == "default"
    assert len({json.dumps(r.params, sort_keys=True) for r in history}) == len(history), "two workers ran one configuration"
    # Each worker counts the other's running trial: together they overshoot by at most one.
    assert 4 <= len(history) <= 5


def baseline_command(data_dir, tmp_path, *options):
    """`rectune baseline` on the baby-format fixture (all users, heuristic); later options win."""
    from typer.testing import CliRunner

    from rectune.agent.cli import app

    return CliRunner().invoke(app, [
        "baseline", "--dataset", "baby", "--groups", "activity:2", "--group", "all", "--pipeline", "heuristic",
        "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--no-progress", *options])


def test_baseline_command_runs_any_registered_tuner(baby_format_dir, tmp_path):
    result = baseline_command(baby_format_dir, tmp_path, "--budget", "3", "--sampler", "local")
    assert result.exit_code == 0, result.output
    history = Study.open(f"sqlite:///{tmp_path / 'optuna.db'}", "baby-activity:2-all-heuristic-local-seed0").history()
    assert [r.tuner for r in history] == ["default", "local", "local"]
    assert all(r.rationale.startswith("neighbour of trial ") for r in history[1:])
    assert "best ndcg@20 = " in result.output
    adoption = adopt(history, SearchSpace.load().defaults("heuristic"), seed=0)
    kept = "the default" if adoption.kept_default else f"trial {adoption.record.number}"
    assert f"adopted: {kept} — {adoption.reason}" in result.output


def test_worker_on_a_missing_study_says_so(tmp_path):
    from typer.testing import CliRunner

    from rectune.agent.cli import app

    result = CliRunner().invoke(app, ["worker", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'o.db'}"])
    assert result.exit_code == 2 and "no study 'nope'" in result.output


def test_a_trial_told_to_the_ledger_but_not_logged_reaches_mlflow_on_resume(runner, tmp_path, monkeypatch):
    from rectune.tools.tracking import TrackingSession

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    log_trial = TrackingSession.log_trial

    def dies_after_the_ledger(self, result, *args, **kwargs):
        if kwargs["trial_number"] == 1:  # the process "dies" after telling the ledger, before the MLflow run
            raise KeyboardInterrupt
        return log_trial(self, result, *args, **kwargs)

    monkeypatch.setattr(TrackingSession, "log_trial", dies_after_the_ledger)
    with pytest.raises(KeyboardInterrupt):
        run_baseline(heuristic_context(budget=3), runner, storage, "s", tracker, progress=False)
    monkeypatch.setattr(TrackingSession, "log_trial", log_trial)
    study = run_baseline(heuristic_context(budget=3), runner, storage, "s", tracker, progress=False)

    trials = study.optuna.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    client = MlflowClient(tracker.tracking_uri)
    children = [r for r in client.search_runs([client.get_experiment_by_name("planted").experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1, 2]
    late = next(c for c in children if c.data.tags["trial_number"] == "1")
    assert late.data.metrics["objective"] == pytest.approx(trials[1].value)
    assert late.data.tags["tuner"] == "tpe" and late.data.params["k"] == str(trials[1].user_attrs["params"]["k"])


@pytest.mark.parametrize("option, message", [
    (["--sampler", "llm"], "'tpe', 'tpe-warm'], but got 'llm'"),
    (["--objective", "auc@20"], "unknown objective metric 'auc'"),
    (["--pipeline", "nope"], "pipeline must be one of"),
    (["--max-latency-ms", "0"], "--max-latency-ms must be above 0 (ms per user), but got 0"),
    (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking server http://127.0.0.1:9"),
    (["--group", "nope"], "unknown group 'nope'"),
])
def test_baseline_command_refuses_bad_settings_before_writing_a_study(baby_format_dir, tmp_path, option, message):
    result = baseline_command(baby_format_dir, tmp_path, "--budget", "2", *option)
    assert result.exit_code == 2 and message in result.output, result.output
    # A study written with bad settings would hold a failed trial 0 and refuse the corrected command.
    assert not (tmp_path / "optuna.db").exists()


def test_baseline_command_says_when_no_trial_met_the_latency_budget(baby_format_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = baseline_command(baby_format_dir, tmp_path, "--budget", "2", "--max-latency-ms", "1e-9")
    assert result.exit_code == 1 and "no trial met --max-latency-ms 1e-09" in result.output, result.output
    trials = optuna.load_study(study_name="baby-activity:2-all-heuristic-tpe-seed0", storage=storage).get_trials()
    assert len(trials) == 2 and not any(t.user_attrs["feasible"] for t in trials)
    # TPE learns the budget from each trial's constraint: above 0 is infeasible.
    assert all(t.constraints["latency_ms_per_user"] > 0 for t in trials)


def test_a_trial_is_back_filled_only_when_no_live_process_may_still_log_it():
    import socket
    import time
    from types import SimpleNamespace

    from rectune.tools.ledger import LOG_GRACE_SECONDS, may_still_log

    here, now = socket.gethostname(), time.time()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        def trial(host, pid, told_at=now):
            return SimpleNamespace(user_attrs={"owner": {"host": host, "pid": pid}, "told_at": told_at})

        assert may_still_log(trial(here, sleeper.pid))  # alive here: it is logging it
        assert not may_still_log(trial(here, os.getpid()))  # this process: its own log failed
        assert may_still_log(trial("elsewhere", 1))  # another host, just told
        assert not may_still_log(trial("elsewhere", 1, now - LOG_GRACE_SECONDS - 1))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not may_still_log(trial(here, sleeper.pid))  # dead here
