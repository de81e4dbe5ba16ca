"""The one study loop over a real runner (planted data, heuristic pipeline), a real Optuna
RDB ledger (SQLite) and a real MLflow store."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from rectune.models.groups import make_groups
from rectune.tools import ledger
from rectune.tools.cache import ModelCache
from rectune.tools.proposer import Proposal
from rectune.tools.proposers import make_proposer
from rectune.tools.runner import TrialRunner
from rectune.tools.study import Study, StudyContext, TrialRecord, canonical, run_study
from rectune.tools.tracking import Tracker


@pytest.fixture
def runner(planted):
    return TrialRunner(planted, make_groups(planted, "activity:2"), cache=ModelCache())


def context(**changes) -> StudyContext:
    values = {"dataset": "planted", "groups": "activity:2", "group": "cold", "pipeline": "heuristic", "budget": 4, "tuner": "tpe"}
    return StudyContext(**{**values, **changes})


def open_study(tmp_path, **changes) -> Study:
    return Study.open(f"sqlite:///{tmp_path / 'optuna.db'}", "s", context(**changes))


def children(tracker: Tracker) -> list:
    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("planted").experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_the_loop_runs_the_default_first_then_the_proposer_to_the_budget(runner, tmp_path):
    study = open_study(tmp_path, tuner="local")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    lines = []
    with tracker.session("planted", "s", "local") as session:
        run_study(study, make_proposer("local"), runner, session, progress=False, echo=lines.append)
        # A person's edit outside the loop, with another TopN than the others.
        longer = study.run(Proposal(runner.space.validate("heuristic", {"top_n": 30}), "llm", id="edit"), runner, session)
    everything = study.history()
    history = everything[:4]
    assert [r.state for r in everything] == ["complete"] * 5 and study.spent() == 5
    assert history[0].tuner == "default" and history[0].params == runner.space.defaults("heuristic")
    assert [r.tuner for r in history[1:]] == ["local"] * 3
    assert len({canonical(r.params) for r in history}) == 4
    assert study.best() == max(everything, key=lambda r: r.objective)
    assert len(lines) == 5 and lines[0].startswith("[s] trial 0 (default): ndcg@20 ")
    assert lines[-1] == "[s] stopped: the budget of 4 trials is spent"
    # A continued loop finds the budget spent (the edit counts too) and runs nothing.
    assert run_study(Study.open(study.storage, "s"), make_proposer("local"), runner, progress=False).ran == 0

    runs = children(tracker)
    assert sorted(r.data.tags["run_key"] for r in runs) == [f"s/trial-{n}" for n in range(5)]
    # Whatever each trial's TopN, every trial has the same MLflow columns; TopN is a param.
    # Trial 0 has no best before it to be compared with.
    assert {r.data.params["top_n"] for r in runs} == {"20", "30"}
    paired = {"vs_best_diff", "vs_best_low", "vs_best_high"}
    assert len({frozenset(r.data.metrics) - paired for r in runs}) == 1
    assert [paired <= set(r.data.metrics) for r in sorted(runs, key=lambda r: int(r.data.tags["trial_number"]))] == [False] + [True] * 4
    metrics = next(r for r in runs if r.data.tags["run_key"] == f"s/trial-{longer.number}").data.metrics
    assert {"val/cold/ndcg_at_20", "val/cold/f1_at_topn", "val/overall/precision_at_topn", "objective"} <= set(metrics)
    assert metrics["val/cold/f1_at_topn"] == pytest.approx(longer.result.metrics["cold"]["f1@30"])


def test_metric_columns_do_not_depend_on_top_n():
    from rectune.tools.tracking import metric_columns

    values = {"ndcg@20": 0.1, "ndcg@30": 0.2, "ndcg@50": 0.3, "candidate_recall@500": 0.4, "users": 7.0}
    assert metric_columns(values, top_n=30, k=500, fixed=(50,)) == {
        "ndcg@20": 0.1, "ndcg@topn": 0.2, "ndcg@50": 0.3, "candidate_recall@k": 0.4, "users": 7.0}
    assert metric_columns({"ndcg@20": 0.1}, top_n=20, k=500) == {"ndcg@20": 0.1, "ndcg@topn": 0.1}


def test_a_proposal_runs_exactly_once_by_its_id(runner, tmp_path):
    study = open_study(tmp_path)
    params = runner.space.validate("heuristic", {"top_n": 12, "k": 100})
    proposal = Proposal(params, "llm", "try a shorter list", id="cold-1", meta={"llm_seconds": 1.5})
    # A crash after queueing and before running leaves the proposal waiting: it is run, not queued twice.
    ledger.enqueue(study.optuna, TrialRecord(-1, "llm", "waiting", params, proposal_id="cold-1"))
    first = study.run(proposal, runner)
    again = study.run(proposal, runner)
    assert first.state == "complete" and again == first and study.ran == 1
    assert len(study.optuna.get_trials()) == 1
    assert study.find("cold-1") == first and first.rationale == "" and first.tuner == "llm"
    fresh = study.run(Proposal(runner.space.validate("heuristic", {"top_n": 14, "k": 100}), "llm", "why",
                               id="cold-2", meta={"calls": 1}), runner)
    assert fresh.meta == {"calls": 1} and fresh.rationale == "why"
    assert Study.open(study.storage, "s").find("cold-2") == fresh


def test_proposals_without_an_id_run_once_per_configuration(runner, tmp_path):
    study = open_study(tmp_path)
    proposal = Proposal(runner.space.validate("heuristic", {"top_n": 12}), "tpe")
    assert study.run(proposal, runner) == study.run(proposal, runner) and study.ran == 1


def test_a_rejected_proposal_costs_nothing_and_is_not_proposed_again(runner, tmp_path):
    study = open_study(tmp_path, tuner="local", budget=3)
    default = study.run(make_proposer("default").propose([], _context(study, runner)), runner)
    offered = make_proposer("local").propose(study.history(), _context(study, runner))
    rejected = study.reject(replace(offered, id="cold-1"), "too slow to serve")
    assert study.reject(replace(offered, id="cold-1"), "again") == rejected
    assert rejected.state == "rejected" and rejected.comment == "too slow to serve"
    assert study.spent() == 1 and canonical(offered.params) in study.tried()
    assert [r.state for r in study.history()] == ["complete", "rejected"]
    run_study(study, make_proposer("local"), runner, progress=False)
    complete = [r for r in study.history() if r.state == "complete"]
    assert len(complete) == 3 and complete[0] == default
    assert canonical(offered.params) not in {canonical(r.params) for r in complete}


def _context(study, runner):
    from rectune.tools.proposer import ProposerContext

    return ProposerContext(study.context, runner.space, study.context.budget)


class NaNRunner(TrialRunner):
    """A runner whose trials produce no number. Datasets that gave NaN in the field (a split
    without validation rows, issue 15) are refused up front; this guards the loop itself."""

    def run(self, spec, report_test=False):
        return replace(super().run(spec, report_test), objective=float("nan"))


def test_a_trial_without_a_number_counts_against_the_budget(planted, tmp_path):
    runner = NaNRunner(planted, make_groups(planted, "activity:2"), cache=ModelCache())
    study = open_study(tmp_path, budget=3)
    # max_trials: a loop that does not count the failures stops here instead of running forever.
    run_study(study, make_proposer("tpe"), runner, progress=False, max_trials=10)
    history = study.history()
    assert study.ran == 3 and study.spent() == 3 and [r.state for r in history] == ["failed"] * 3
    assert all("the objective ndcg@20 is nan" in r.error for r in history)
    assert study.best() is None and all(r.objective is None for r in history)
    states = {t.state for t in study.optuna.get_trials()}
    assert states == {optuna.trial.TrialState.FAIL}


def test_a_trial_the_runner_refuses_fails_with_its_reason(runner, tmp_path):
    study = open_study(tmp_path)
    record = study.run(Proposal({"top_n": 30, "k": 20}, "llm", id="bad"), runner)
    assert record.state == "failed" and "k=20 must be ≥ top_n=30" in record.error
    assert study.spent() == 1 and study.run(Proposal({"top_n": 30, "k": 20}, "llm", id="bad"), runner) == record


def test_a_record_survives_json(runner, tmp_path):
    study = open_study(tmp_path)
    record = study.run(Proposal(runner.space.defaults("heuristic"), "default", "start", id="d", meta={"x": 1}), runner)
    assert TrialRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.feasible and math.isfinite(record.objective)


def test_a_ledger_written_before_tuners_were_proposers_opens(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    old = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    old.set_user_attr("rectune", {"dataset": "planted", "groups": "activity:2", "group": "cold", "pipeline": "heuristic",
                                  "objective": "ndcg@20", "seed": 0, "budget": 4, "sampler": "random", "max_latency_ms": None})
    assert Study.open(storage, "s").context == context(tuner="random")
    Study.open(storage, "s", context(tuner="random", budget=6))
    assert optuna.load_study(study_name="s", storage=storage).user_attrs["rectune"]["tuner"] == "random"
    with pytest.raises(Exception, match="tuner='tpe' \\(study has 'random'\\)"):
        Study.open(storage, "s", context(tuner="tpe"))


def test_a_proposal_queued_twice_at_once_runs_once(runner, tmp_path):
    # Two processes that find no trial with the id queue it both; the older trial runs.
    study = open_study(tmp_path)
    params = runner.space.validate("heuristic", {"top_n": 12})
    older, younger = (ledger.enqueue(study.optuna, TrialRecord(-1, "llm", "waiting", params, proposal_id="p")) for _ in range(2))
    assert study.take(younger, runner) is None
    record = study.run(Proposal(params, "llm", id="p"), runner)
    assert record.number == older and study.ran == 1
    assert [r.number for r in study.history()] == [older] and study.queued() == []


def test_each_trial_is_paired_with_the_best_before_it_and_the_ledger_keeps_both(runner, tmp_path):
    from rectune.tools.noise import Interval, paired_interval, vector

    study = open_study(tmp_path, tuner="local", budget=3, seed=5)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracker.session("planted", "s", "local") as session:
        run_study(study, make_proposer("local"), runner, session, progress=False)
    stored = Study.open(study.storage, "s").history()
    first, second, third = stored
    users = int(first.result.metrics["cold"]["users"])
    assert first.result.vs_best is None and first.result.per_user["n"] == users == second.result.per_user["n"]
    assert first.result.fit_seconds > 0  # the fit's cost is kept with the trial
    # The per-user values are the runner's, in the order of the group's evaluated users.
    assert np.allclose(vector(first.result.per_user), runner.per_user(first.result.spec)[1], atol=5e-7)
    assert vector(first.result.per_user).mean() == pytest.approx(first.objective, abs=1e-6)
    # Trial 1 against trial 0 (the only one before it); trial 2 against the better of the two.
    expected = paired_interval(vector(second.result.per_user), vector(first.result.per_user), seed=5)
    assert second.result.vs_best == {**expected.to_json(), "trial": 0}
    best = max((first, second), key=lambda r: r.objective)
    assert third.result.vs_best["trial"] == best.number
    assert Interval.from_json(third.result.vs_best).diff == pytest.approx(third.objective - best.objective, abs=1e-6)

    run = next(r for r in children(tracker) if r.data.tags["trial_number"] == "1")
    assert {k: run.data.metrics[f"vs_best_{k}"] for k in ("diff", "low", "high")} == expected.to_json()
    assert run.data.tags["within_noise"] == str(expected.within_noise) and run.data.tags["vs_best_trial"] == "0"
    # The per-user values stay in the ledger.
    assert not any(name.startswith("per_user") for name in (*run.data.metrics, *run.data.params, *run.data.tags))
    assert not any("nonzero" in value for value in (*run.data.params.values(), *run.data.tags.values()))


def test_a_trial_stored_before_per_user_values_reads_back_without_them(tmp_path):
    from optuna.trial import TrialState, create_trial

    study = open_study(tmp_path)
    params = {"top_n": 20}
    old = {"tuner": "tpe", "params": params, "latency_ms_per_user": 0.1, "train_seconds": 1.0, "eval_seconds": 1.0,
           "cache": "none", "metrics": {"cold": {"ndcg@20": 0.1}}, "test_metrics": None}
    study.optuna.add_trial(create_trial(state=TrialState.COMPLETE, value=0.1, params={}, distributions={}, user_attrs=old))
    (record,) = study.history()
    assert record.result.per_user is None and record.result.vs_best is None and record.result.metric == ""
    assert record.result.fit_seconds is None
    assert TrialRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_a_trial_whose_users_cannot_be_paired_with_the_best_still_stands(monkeypatch):
    """Different users (a dataset changed under a resumed study) give no interval; the finished
    trial is not turned into a failed one."""
    import numpy as np

    from rectune.tools.noise import per_user_vector
    from rectune.tools.study import Study, StudyContext
    from rectune.tools.trial import TrialRecord, TrialResult

    context = StudyContext("planted", "activity:2", "cold", "heuristic")
    def result(users: int) -> TrialResult:
        return TrialResult(context.spec({}), 0.1, {}, 1.0, 0.0, 0.0, "none", per_user=per_user_vector(np.full(users, 0.1)))

    study = Study(None, context, "sqlite://")
    monkeypatch.setattr(Study, "best", lambda self: TrialRecord(0, "default", "complete", {}, result=result(40)))
    assert study.vs_best(result(39)) is None
    paired = study.vs_best(result(40))
    assert paired["trial"] == 0 and paired["diff"] == 0.0
