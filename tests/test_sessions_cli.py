"""`rectune sessions` tells where a session stopped; `rectune tune --max-latency-ms` reaches the ledger."""

import optuna
import pytest
from typer.testing import CliRunner

from rectune.agent.cli import app
from rectune.agent.session import list_sessions, load_settings, run
from scripted_llm import ScriptedLLM, call
from test_agent import assert_exactly_the_budget
from test_llm_endpoint import DENSER, session_settings


class Killed(Exception):
    """Stands in for a kill during a trial: the checkpoint stays before the trial's step."""


def listed(checkpoint: str) -> str:
    result = CliRunner().invoke(app, ["sessions", "--checkpoint", checkpoint])
    assert result.exit_code == 0, result.output
    return result.output


def test_sessions_tells_an_approval_wait_from_a_trial_cut_short(tmp_path, baby_format_dir, shared_cache, monkeypatch):
    script = [DENSER, call("propose_change", changes={"neighbors": 30}, rationale="denser still")]
    checkpoint = str(tmp_path / "sessions.db")
    options = {"echo": lambda line: None, "checkpoint": checkpoint, "report_dir": tmp_path / "r"}
    approve = lambda payload: {"action": "approve"}  # noqa: E731
    with ScriptedLLM(script) as llm:
        config = {**session_settings(tmp_path, baby_format_dir, llm.base_url, shared_cache), "approve": "ask", "budget": 3}
        run(config, lambda payload: None, **options)  # nobody answers: the session waits at the approval
        assert [s["status"] for s in list_sessions(checkpoint)] == ["waiting for approval"]
        assert "waiting for approval" in listed(checkpoint)

        with monkeypatch.context() as patch:
            def killed(*args, **kwargs):
                raise Killed

            patch.setattr("rectune.tools.study.Study.take", killed)
            with pytest.raises(Killed):
                run(config, approve, resume=True, **options)
        # Approved and cut short in its trial: a proposal is still pending, but nobody is asked anything.
        output = listed(checkpoint)
        assert "interrupted during a trial (unless still running)" in output and "waiting for approval" not in output

        values = run(config, approve, resume=True, **options)
    assert values["phase"] == "done"
    assert [s["status"] for s in list_sessions(checkpoint)] == ["done"]
    assert_exactly_the_budget(config["storage"], "s1-all", 3)


def test_tune_max_latency_ms_marks_slower_trials_infeasible(tmp_path, baby_format_dir, shared_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the session's report goes to ./reports
    checkpoint, storage = str(tmp_path / "sessions.db"), f"sqlite:///{tmp_path / 'optuna.db'}"
    with ScriptedLLM([DENSER]) as llm:
        result = CliRunner().invoke(app, [
            "tune", "--session", "lat", "--dataset", "baby", "--groups", "all", "--budget", "2", "--approve", "auto",
            "--max-latency-ms", "0.000001", "--llm-base-url", llm.base_url, "--llm-model", "scripted", "--no-trace-llm",
            "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--data-dir", str(baby_format_dir),
            "--cache-dir", shared_cache, "--checkpoint", checkpoint])
    assert result.exit_code == 0, result.output
    assert load_settings("lat", checkpoint)["max_latency_ms"] == pytest.approx(1e-6)  # a resume runs with it too
    trials = assert_exactly_the_budget(storage, "lat-all", 2)
    assert [t.user_attrs["tuner"] for t in trials] == ["default", "llm"]
    for trial in trials:
        assert trial.user_attrs["latency_ms_per_user"] > 1e-6 and trial.user_attrs["feasible"] is False
    assert optuna.load_study(study_name="lat-all", storage=storage).user_attrs["rectune"]["max_latency_ms"] == pytest.approx(1e-6)
    # The LLM is told the budget, and sees which trials broke it.
    assert len(llm.requests) == 1  # the one tuning call (no pick under ndcg@20)
    proposal_prompt = llm.prompt(1)
    assert "Only configurations that recommend within 1e-06 ms per user" in proposal_prompt
    assert "(over the latency budget)" in proposal_prompt


def test_sessions_of_an_empty_store_says_so(tmp_path):
    assert listed(str(tmp_path / "none.db")).strip() == f"no sessions in {tmp_path / 'none.db'}"
