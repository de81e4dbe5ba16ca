"""Issue 15: an agent session killed between the ledger and MLflow, or between the ledger and
its checkpoint, resumes without a gap or a second run; and no test-split metric reaches the
LLM or the ledger. Real HTTP against the scripted server, real Optuna, MLflow and SqliteSaver."""

import re
import subprocess
import sys

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from rectune.agent.session import run
from rectune.tools.adoption import best_record
from rectune.tools.study import Study
from rectune.tools.tracking import Tracker
from scripted_llm import ScriptedLLM, call
from test_agent import assert_exactly_the_budget, cli, no_real_keys, settings, start, tuning  # noqa: F401 (a fixture)

# The tuning calls, one per trial; a pick, where the objective leaves pipelines tied, is answered by the server itself.
TUNE = [call("propose_change", changes={"neighbors": 20}, rationale="denser"),
        call("propose_change", changes={"neighbors": 30}, rationale="denser still")]

# The child dies as a SIGKILL would kill it: after the ledger holds its first LLM trial, before MLflow does.
DIES_BEFORE_MLFLOW = """
import os, signal, sys
from rectune.tools import tracking
original = tracking.TrackingSession.log_trial
def log_trial(self, result, tuner, key, **options):
    if tuner == "llm" and options.get("trial_number") is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, result, tuner, key, **options)
tracking.TrackingSession.log_trial = log_trial
from rectune.agent.cli import app
app(sys.argv[1:], prog_name="rectune")
"""


class Killed(Exception):
    """Stands in for a kill right after a trial reached the ledger, before its node returned."""


def logged_trials(tracking_uri: str, study: str) -> list[int]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("baby").experiment_id
    return [int(r.data.tags["trial_number"]) for r in client.search_runs([experiment], f"tags.optuna_study = '{study}'")
            if "trial_number" in r.data.tags]


def test_killed_between_the_ledger_and_mlflow_then_resume_logs_each_trial_once(tmp_path, baby_format_dir):
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "dies.py").write_text(DIES_BEFORE_MLFLOW)
    with ScriptedLLM(TUNE) as llm:
        command = cli(tmp_path, baby_format_dir, llm.base_url, "tune", "--approve", "auto", "--session", "c1")
        process = start([sys.executable, str(tmp_path / "dies.py"), *command[3:]], tmp_path,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = process.communicate(timeout=300)[0]
        assert process.returncode == -9, output[-3000:]
        # The kill came where it should: trial 1 is in the ledger, MLflow holds only trial 0.
        done = [t.number for t in optuna.load_study(study_name="c1-all", storage=storage).get_trials()
                if t.state == TrialState.COMPLETE]
        assert done == [0, 1] and logged_trials(tracking_uri, "c1-all") == [0]
        resumed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "resume", "c1"), cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = assert_exactly_the_budget(storage, "c1-all", 3)
    # One MLflow run per complete ledger trial: the one the kill skipped is there, none twice.
    assert sorted(logged_trials(tracking_uri, "c1-all")) == [t.number for t in trials if t.state == TrialState.COMPLETE]
    # Two proposals, each run once: the killed trial was not proposed again, nor the pick (if any) asked again.
    assert len(tuning(llm)) == 2 and len(llm.requests) - len(tuning(llm)) <= 1
    assert [t.user_attrs["params"]["neighbors"] for t in trials[1:]] == [20, 30]


def test_a_trial_in_the_ledger_but_not_the_checkpoint_is_reused_on_resume(tmp_path, baby_format_dir, shared_cache, monkeypatch):
    from rectune.tools.runner import TrialRunner
    from rectune.tools.study import Study
    from rectune.tools.trial import TrialRecord, canonical

    original, ran = TrialRunner.run, []

    def counted(self, spec, *args, **kwargs):
        ran.append(canonical(spec.params))
        return original(self, spec, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", counted)

    def dies_after_the_first_llm_trial(line: str) -> None:
        # run_trial echoes after Study.run returned: the ledger (and MLflow) hold the trial, the checkpoint not.
        if line.startswith("[tune] all: trial 2/3"):
            raise Killed

    with ScriptedLLM(TUNE) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3), "cache_dir": shared_cache}
        options = {"checkpoint": str(tmp_path / "sessions.db"), "tracker": Tracker(config["tracking_uri"]), "report_dir": tmp_path / "r"}
        try:
            run(config, None, echo=dies_after_the_first_llm_trial, **options)
        except Killed:
            pass
        else:
            raise AssertionError("the session was not killed after its first LLM trial")
        assert [t.state for t in optuna.load_study(study_name="s1-all", storage=config["storage"]).get_trials()] == \
            [TrialState.COMPLETE, TrialState.COMPLETE]
        values = run(config, None, echo=lambda line: None, resume=True, **options)

    assert values["phase"] == "done"
    assert len(llm.requests) == 2  # two proposals (no pick under ndcg@20): the first was not asked for again
    trials = assert_exactly_the_budget(config["storage"], "s1-all", 3)
    assert len(trials) == 3  # no failed or abandoned extra either
    configurations = [canonical(t.user_attrs["params"]) for t in trials]
    assert len(set(configurations)) == 3
    assert [ran.count(canonical({**trials[0].user_attrs["params"], "neighbors": n})) for n in (20, 30)] == [1, 1]
    ledger = Study.open(config["storage"], "s1-all").history()
    state = [TrialRecord.from_json(row) for row in values["history"]["all"]]
    assert [(r.number, r.state, r.params, r.proposal_id, r.objective) for r in state] == \
        [(r.number, r.state, r.params, r.proposal_id, r.objective) for r in ledger]


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d+", text))


def _spellings(value: float) -> set[str]:
    """How a metric can appear in a prompt: the tables' 5 decimals, or the rounded float's repr."""
    return {f"{value:.5f}", repr(round(value, 5)), repr(value)}


def test_no_test_split_metric_reaches_the_llm_or_the_ledger(tmp_path, baby_format_dir, shared_cache, monkeypatch):
    import json

    from rectune.tools.runner import TrialRunner

    original, test_runs, validation = TrialRunner.run, [], set()

    def watched(self, spec, report_test=False):
        result = original(self, spec, report_test=report_test)
        for by_metric in result.metrics.values():
            validation.update(s for v in by_metric.values() for s in _spellings(v))
        if report_test:
            test_runs.append((len(llm.requests), result.test_metrics))
        return result

    monkeypatch.setattr(TrialRunner, "run", watched)
    with ScriptedLLM(TUNE) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3), "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"),
                     tracker=Tracker(config["tracking_uri"]), report_dir=tmp_path / "r")
    assert values["phase"] == "done" and len(llm.requests) == 2
    # The report evaluated on test (the default, and the best when it is another trial), after the LLM's last call.
    history = Study.open(config["storage"], "s1-all").history()
    best_is_default = best_record(history).number == 0
    assert len(test_runs) == (1 if best_is_default else 2) and all(asked == 2 for asked, _ in test_runs)
    bodies = [json.dumps(body) for body in llm.requests]
    # Test metrics are `test/<group>/<metric>` in MLflow and `test_metrics` in a result.
    assert not [body for body in bodies if re.search(r"test[/_]|\btest\b", body, re.IGNORECASE)]
    sent = set().union(*(_numbers(body) for body in bodies))
    leaked, checked = [], 0
    for _, test_metrics in test_runs:
        for by_metric in test_metrics.values():
            for name, value in by_metric.items():
                spellings = _spellings(value)
                if spellings & validation or len(f"{value:.5f}".rstrip("0")) < 5:
                    continue  # the same number on validation, or too round to tell apart
                checked += 1
                leaked += [(name, value)] if spellings & sent else []
    assert checked >= 10 and not leaked
    # The prompts do carry the validation numbers: a number-based check can see a leak.
    assert sent & validation
    # Nor does any ledger trial, the session's history or a trial's MLflow run hold them.
    trials = optuna.load_study(study_name="s1-all", storage=config["storage"]).get_trials()
    assert len(trials) == 3 and all("test_metrics" in t.user_attrs and t.user_attrs["test_metrics"] is None for t in trials)
    assert all(row["result"]["test_metrics"] is None for row in values["history"]["all"])
    client = MlflowClient(config["tracking_uri"])
    experiment = client.get_experiment_by_name("baby").experiment_id
    runs = [r for r in client.search_runs([experiment], "tags.optuna_study = 's1-all'") if "trial_number" in r.data.tags]
    assert len(runs) == 3 and not [name for r in runs for name in r.data.metrics if name.startswith("test/")]
