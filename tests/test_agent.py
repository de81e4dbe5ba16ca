"""The agent end to end: the real ChatOpenAI client over HTTP against a scripted server on
127.0.0.1, the real trial runner, Optuna ledger (SQLite), MLflow (SQLite) and SqliteSaver."""

from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from rectune.agent.session import list_sessions, run
from scripted_llm import ScriptedLLM, call, calls, raw, text
from rectune.tools.tracking import Tracker

CHOOSE = call("choose_pipelines", choices=[
    {"group": "cold", "pipeline": "heuristic", "reason": "sparse users favour item similarity"},
    {"group": "heavy", "pipeline": "heuristic", "reason": "cheap and strong"},
])


@pytest.fixture(autouse=True)
def no_real_keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "DEEPSEEK_API_KEY", "RECTUNE_LLM_API_KEY", "RECTUNE_LLM_BASE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def settings(tmp_path, data_dir, base_url, approve="ask", budget=3, groups="activity:2", session="s1"):
    return {"session": session, "dataset": "baby", "groups": groups, "objective": "ndcg@20", "budget": budget, "seed": 0,
            "approve": approve, "max_llm_calls": 12, "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "data_dir": str(data_dir), "cache_dir": str(tmp_path / "cache"),
            "llm_base_url": base_url, "llm_model": "scripted"}


def complete(storage: str, study: str) -> list:
    return [t for t in optuna.load_study(study_name=study, storage=storage).get_trials() if t.state == TrialState.COMPLETE]


def children(client, run_id: str, **tags) -> list:
    """The nested runs of a parent run that carry every tag in `tags`."""
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def assert_paper_check(values: dict, client, tmp_path) -> None:
    """The argmax of the objective and of F1@TopN, recomputed from the selection table, against
    what the session recorded in its state, selection.md, its report and its MLflow parent run."""
    run_id = values["mlflow_run_id"]
    selection_md = Path(client.download_artifacts(run_id, "selection.md", str(tmp_path))).read_text()
    report = Path(values["report"]).read_text()
    tags = client.get_run(run_id).data.tags
    for group, pipelines in values["table"].items():
        f1 = {p: next(v for name, v in metrics.items() if name.startswith("f1@")) for p, metrics in pipelines.items()}
        objective_argmax = max(pipelines, key=lambda p: pipelines[p]["objective"])
        f1_argmax = max(f1, key=f1.get)
        choice = values["selection"][group]
        agrees, f1_agrees = choice["pipeline"] == objective_argmax, choice["pipeline"] == f1_argmax
        assert (choice["argmax"], choice["agrees"], choice["f1_argmax"], choice["f1_agrees"]) == \
            (objective_argmax, agrees, f1_argmax, f1_agrees)
        row = (f"| {group} | {choice['pipeline']} | {'LLM' if choice['llm'] else 'fallback'} | {objective_argmax} | "
               f"{'yes' if agrees else 'no'} | {f1_argmax} | {'yes' if f1_agrees else 'no'} |")
        assert row in selection_md and row in report, row
        assert {name: tags[f"select/{group}/{name}"] for name in ("pipeline", "objective_argmax", "agrees_objective",
                                                                 "f1_argmax", "agrees_f1", "chosen_by")} == {
            "pipeline": choice["pipeline"], "objective_argmax": objective_argmax, "agrees_objective": str(agrees),
            "f1_argmax": f1_argmax, "agrees_f1": str(f1_agrees), "chosen_by": "llm" if choice["llm"] else "fallback"}


def test_session_select_tune_approve_edit_reject_report(tmp_path, baby_format_dir):
    script = [
        CHOOSE,
        call("propose_change", changes={"neighbors": 20}, rationale="denser similarity graph"),
        call("propose_change", changes={"k": 5}, rationale="fewer candidates"),
        call("propose_change", changes={"neighbors": 30}, rationale="a bit denser still"),
        call("propose_change", changes={"k": 100}, rationale="more candidates"),
        call("get_history"),
        call("propose_change", changes={"top_n": 30}, rationale="longer lists"),
    ]
    answers = iter([{"action": "approve"}, {"action": "edit", "changes": {"neighbors": 40}},
                    {"action": "reject", "comment": "keep k small"}, {"action": "approve"}])
    shown = []

    def answer(payload):
        shown.append(payload)
        return next(answers)

    with ScriptedLLM(script) as llm:
        config = settings(tmp_path, baby_format_dir, llm.base_url)
        values = run(config, answer, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"),
                     tracker=Tracker(config["tracking_uri"]), report_dir=tmp_path / "reports")

    assert values["phase"] == "done"
    assert {g: s["pipeline"] for g, s in values["selection"].items()} == {"cold": "heuristic", "heavy": "heuristic"}
    assert all(s["llm"] and isinstance(s["agrees"], bool) for s in values["selection"].values())
    # Approval payloads carry the diff against the current best and the rationale.
    assert shown[0]["diff"] == {"neighbors": [50, 20]} and shown[0]["rationale"] == "denser similarity graph"
    # The invalid call (k=5) was answered with a precise message and cost no trial.
    assert "k=5 is out of range [50, 3000]" in llm.prompt(4)
    assert "A person rejected your proposal k=100: keep k small" in llm.prompt(6)
    assert "The full history" in llm.prompt(7)
    # After a free tool, the next turn offers only tools that decide.
    assert {t["function"]["name"] for t in llm.requests[6]["tools"]} == {"propose_change", "train_model", "finish"}
    assert {t["function"]["name"] for t in llm.requests[5]["tools"]} >= {"get_history", "evaluate_group"}

    cold = complete(config["storage"], "s1-cold")
    assert [t.user_attrs["tuner"] for t in cold] == ["default", "llm", "llm"]
    assert [t.params["neighbors"] for t in cold] == [50, 20, 40]  # the person's edit ran, not the proposal
    assert "edited by a person" in cold[2].user_attrs["rationale"]
    heavy = complete(config["storage"], "s1-heavy")
    assert [t.user_attrs["tuner"] for t in heavy] == ["default", "llm"] and heavy[1].params["top_n"] == 30
    assert values["finished"] == {"cold": "budget", "heavy": "finish: script exhausted"}

    report = (tmp_path / "reports" / "s1.md").read_text()
    assert "Test split: default vs tuned" in report and "| cold | heuristic | ndcg@20 |" in report
    client = MlflowClient(config["tracking_uri"])
    parent = client.get_run(values["mlflow_run_id"])
    nested = children(client, parent.info.run_id)
    trials = [r for r in nested if "phase" not in r.data.tags]  # the ledger's trials; select runs carry a phase
    assert sorted(r.data.tags["tuner"] for r in trials) == ["default", "default", "llm", "llm", "llm"]
    assert len(nested) == len(trials) + 2 * 4  # and every pipeline's default on each group
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "selection.md"} <= artifacts
    assert_paper_check(values, client, tmp_path)
    llm_child = next(r for r in trials if r.data.tags["tuner"] == "llm" and r.data.params.get("neighbors") == "20")
    assert client.download_artifacts(llm_child.info.run_id, "rationale.md", str(tmp_path)) and \
        (tmp_path / "rationale.md").read_text() == "denser similarity graph"
    assert list_sessions(str(tmp_path / "sessions.db"))[0]["phase"] == "done"


def test_a_rejected_proposal_counts_as_tried_and_refusal_state_resets_per_group(tmp_path, baby_format_dir, shared_cache):
    """Issue 15, items 10 and 11: a person's reject is in the ledger and the history, so the same
    configuration proposed again is refused at no cost; the sampling temperature raised by refusals
    starts again in the next group; finish needs its reason; the pick's refused calls count in the
    report's valid share; the terminal shows why a call was refused, every line of it."""
    script = [
        call("choose_pipelines", choices=[{"group": "cold", "pipeline": "nope", "reason": "?"}]),
        CHOOSE,
        call("propose_change", changes={"k": 100}, rationale="more candidates"),  # rejected by the person
        call("propose_change", changes={"k": 100}, rationale="larger K is too slow for serving"),  # the same again
        call("propose_change", changes={"k": 5}, rationale="fewer"),  # out of range
        call("get_history"),  # the last of cold's 4 calls, a free one: the trial falls back to a neighbour
        call("finish"),  # heavy's first turn, without its reason
        call("propose_change", changes={"neighbors": 20}, rationale="denser"),
        call("finish", reason="good enough"),
    ]
    answers = iter([{"action": "reject", "comment": "larger K is too slow for serving"}, {"action": "approve"},
                    {"action": "approve"}])
    shown, lines = [], []

    def answer(payload):
        shown.append(payload)
        return next(answers)

    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, budget=3), "max_llm_calls": 4, "cache_dir": shared_cache}
        values = run(config, answer, echo=lines.append, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    assert values["phase"] == "done" and len(llm.requests) == 9
    # The rejection is in the history the LLM reads, and the same configuration is refused.
    assert "A person rejected your proposal k=100: larger K is too slow for serving" in llm.prompt(4)
    assert "| llm | k=100 | rejected by a person: larger K is too slow for serving |" in llm.prompt(4)
    assert "That configuration was already rejected by a person (larger K is too slow for serving)" in llm.prompt(5)
    # It cost no trial: cold holds its default, the rejected proposal and the fallback trial.
    cold = optuna.load_study(study_name="s1-cold", storage=config["storage"]).get_trials()
    assert [(t.state, t.user_attrs.get("rejected", False)) for t in cold] == [
        (TrialState.COMPLETE, False), (TrialState.FAIL, True), (TrialState.COMPLETE, False)]
    assert cold[1].user_attrs["params"]["k"] == 100 and cold[1].user_attrs["comment"] == "larger K is too slow for serving"
    assert cold[2].user_attrs["rationale"].startswith("fallback: the LLM made no decision in 3 calls (last refusal: Your "
                                                      "propose_change was not run (no trial used): - k=5 is out of range")
    assert cold[2].user_attrs["params"]["k"] != 100 and shown[1]["rationale"] == cold[2].user_attrs["rationale"]
    assert values["finished"]["cold"] == "llm-call budget"
    # Refusals in a row in cold sample ever more freely; heavy's first turn samples greedily again,
    # and offers the free tools although cold's last call was one.
    assert [llm.requests[i]["temperature"] for i in (3, 4, 5)] == [0.0, pytest.approx(0.3), pytest.approx(0.6)]
    assert llm.requests[6]["temperature"] == 0.0 and llm.requests[7]["temperature"] == pytest.approx(0.3)
    assert {"get_history", "evaluate_group"} <= {t["function"]["name"] for t in llm.requests[6]["tools"]}
    assert "finish needs a reason" in llm.prompt(8)
    assert values["finished"]["heavy"] == "finish: good enough"
    # The terminal shows the whole refusal, not only its first line.
    refusal = next(line for line in lines if line.startswith("[tune] cold: refused call — Your propose_change was not run"))
    assert "k=5 is out of range [50, 3000]" in refusal
    # 9 calls, of which refused: the pick's first, cold's two, heavy's finish without a reason.
    assert values["llm_calls"] == {"select": 2, "cold": 4, "heavy": 3}
    assert values["invalid_calls"] == {"select": 1, "cold": 2, "heavy": 1}
    assert "LLM: 9 calls, 4 refused (56% valid)" in Path(values["report"]).read_text()


def test_malformed_replies_are_answered_not_crashed(tmp_path, baby_format_dir):
    long_text = "I think we should consider many things. " * 2500
    script = [
        call("choose_pipelines", choices=[{"group": "all", "pipeline": "nope", "reason": "?"}]),
        call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}]),
        raw("propose_change", '{"changes": {"neighbors": 20}, "rationale": "unterminated'),
        call("tune_everything", strength=11),
        call("propose_change", changes={"neighbors": 5000}, rationale="huge"),
        text("Let me think about the best value for K."),
        text(long_text),
        call("propose_change", changes={"neighbors": 50}, rationale="same as default"),
        call("propose_change", changes="neighbors=20", rationale="string instead of object"),
        call("propose_change", changes={"neighbors": 20}),
        call("evaluate_group", group="martians"),
        raw("propose_change", "[1, 2]"),  # valid JSON, but not an object: the client itself refuses these
        raw("evaluate_group", '"all"'),
        {"calls": [("get_history", "{}"), ("finish", "5")]},
        raw("finish", "true"),
        calls(("propose_change", {"changes": {"neighbors": 25}, "rationale": "ok"}), ("finish", {"reason": "also"})),
        call("finish", reason="done"),
    ]
    with ScriptedLLM(script) as llm:
        config = settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=4)
        config["max_llm_calls"] = 20
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    assert values["phase"] == "done"
    expectations = {  # request index → what the LLM was told about its previous reply
        2: "unknown pipeline 'nope'",
        4: "are not valid JSON",
        5: "There is no tool 'tune_everything'",
        6: "neighbors=5000 is out of range [10, 500]",
        7: "instead of a tool call",
        8: "characters)",  # the long text is echoed truncated
        9: "already tried as trial 0",
        10: "changes must be a non-empty object",
        11: "rationale must be a non-empty string",
        12: "evaluate_group needs a group among ['all']",
        13: "its arguments are valid JSON but not an object ([1, 2], in tool call 1)",
        14: 'its arguments are valid JSON but not an object ("all", in tool call 1)',
        15: "its arguments are valid JSON but not an object (5, in tool call 2)",
        16: "its arguments are valid JSON but not an object (true, in tool call 1)",
        17: "only the first (propose_change) was used",
    }
    for index, message in expectations.items():
        assert message in llm.prompt(index), (index, llm.prompt(index)[-600:])
    assert len(llm.prompt(8)) < 20000  # a 100 kB reply is not fed back whole
    # Greedy decoding would repeat a refused call: each refusal in a row samples more freely.
    assert llm.requests[2]["temperature"] == 0.0 and llm.requests[3]["temperature"] == pytest.approx(0.3)
    assert llm.requests[4]["temperature"] == pytest.approx(0.6)
    trials = complete(config["storage"], "s1-all")
    assert [t.user_attrs["tuner"] for t in trials] == ["default", "llm"] and trials[1].params["neighbors"] == 25
    assert values["invalid_calls"]["all"] == 13
    assert llm.requests[15]["temperature"] == 1.0  # capped


def test_a_full_budget_session_refuses_finish_and_uses_every_trial(tmp_path, baby_format_dir):
    script = [
        call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}]),
        call("finish", reason="the default is good enough"),
        call("propose_change", changes={"neighbors": 20}, rationale="denser"),
        call("propose_change", changes={"k": 1000}, rationale="more candidates"),
    ]
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3), "may_finish": False}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    offered = {tool["function"]["name"] for tool in llm.requests[1]["tools"]}
    assert "finish" not in offered and "propose_change" in offered
    assert "There is no finish tool: this group gets all 3 trials" in llm.prompt(2)
    assert "finish is not available" in llm.prompt(3)
    assert values["finished"]["all"] == "budget"
    assert len(complete(config["storage"], "s1-all")) == 3


def test_select_falls_back_after_three_refusals_then_tools_run_within_the_call_budget(tmp_path, baby_format_dir, shared_cache):
    other = {"group": "heavy", "pipeline": "heuristic", "reason": "fine"}
    bad_picks = [
        raw("choose_pipelines", '[{"group": "cold", "pipeline": "heuristic"}]'),  # JSON, but not an object
        call("choose_pipelines", choices=[{"group": "cold", "pipeline": ["heuristic"], "reason": "a list"}, other]),
        call("choose_pipelines", choices=[{"group": "cold", "pipeline": {"name": "heuristic"}, "reason": "an object"}, other]),
    ]
    tune = [call("evaluate_group", group="heavy"), call("train_model", params={"top_n": 30}, rationale="longer lists"),
            text("Let me think."), text("Still thinking.")]
    with ScriptedLLM(bad_picks + tune) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", budget=2), "max_llm_calls": 2,
                  "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"),
                     tracker=Tracker(config["tracking_uri"]), report_dir=tmp_path / "reports")

    assert "its arguments are valid JSON but not an object" in llm.prompt(2)
    assert "unknown pipeline \"['heuristic']\" for group 'cold'" in llm.prompt(3)
    table, selection = values["table"], values["selection"]
    for group, choice in selection.items():
        assert not choice["llm"] and choice["pipeline"] == max(table[group], key=lambda p: table[group][p]["objective"])
        assert "the LLM failed (unknown pipeline \"{'name': 'heuristic'}\"" in choice["reason"]
    client = MlflowClient(config["tracking_uri"])
    assert_paper_check(values, client, tmp_path)

    # evaluate_group: cold's current best (its default) on heavy, which model selection measured too.
    cold_pipeline = selection["cold"]["pipeline"]
    expected = ", ".join(f"{name}={value}" for name, value in table["heavy"][cold_pipeline].items() if name != "objective")
    assert f"The current best on group heavy: {expected}. Now propose a change or finish." in llm.prompt(5)
    [look] = children(client, values["mlflow_run_id"], phase="evaluate_group")
    assert (look.data.tags["group"], look.data.tags["best_of"], look.data.tags["tuner"]) == ("heavy", "cold", "default")
    assert look.data.metrics["val/heavy/ndcg_at_20"] == pytest.approx(table["heavy"][cold_pipeline]["ndcg@20"], abs=1e-5)
    # train_model: a configuration in full, missing parameters at their defaults.
    cold = complete(config["storage"], "s1-cold")
    assert [t.user_attrs["tuner"] for t in cold] == ["default", "llm"]
    assert cold[1].user_attrs["params"] == {**cold[0].user_attrs["params"], "top_n": 30}
    assert cold[1].user_attrs["rationale"] == "longer lists"
    # heavy's two calls were text: its LLM-call budget spent, the trial falls back to an untried
    # neighbour of the best (one parameter moved), and no third call is made.
    heavy = complete(config["storage"], "s1-heavy")
    assert [t.user_attrs["tuner"] for t in heavy] == ["llm" if i else "default" for i in range(2)]
    assert heavy[1].user_attrs["rationale"].startswith("fallback: the LLM made no decision in 2 calls (last refusal: You answered with text")
    moved = {k for k, v in heavy[1].user_attrs["params"].items() if heavy[0].user_attrs["params"][k] != v}
    assert len(moved) == 1
    assert values["finished"] == {"cold": "budget", "heavy": "budget"}
    assert values["llm_calls"] == {"select": 3, "cold": 2, "heavy": 2} and len(llm.requests) == 7
    assert values["invalid_calls"] == {"select": 3, "cold": 0, "heavy": 2}


def test_select_runs_are_nested_mlflow_runs_logged_once_across_a_crash(tmp_path, baby_format_dir, monkeypatch, shared_cache):
    from rectune.models.pipeline import PIPELINES
    from rectune.tools.runner import TrialRunner
    from rectune.tools.space import SearchSpace

    original, seen = TrialRunner.run, []

    def dies_on_the_third_run(self, spec, *args, **kwargs):
        seen.append(spec.pipeline)
        if len(seen) == 3:
            raise RuntimeError("killed during model selection")
        return original(self, spec, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", dies_on_the_third_run)
    with ScriptedLLM([call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}])]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=1), "cache_dir": shared_cache}
        options = {"echo": lambda line: None, "checkpoint": str(tmp_path / "sessions.db"),
                   "tracker": Tracker(config["tracking_uri"]), "report_dir": tmp_path / "r"}
        with pytest.raises(RuntimeError, match="killed during model selection"):
            run(config, None, **options)
        values = run(config, None, resume=True, **options)

    assert values["phase"] == "done"
    runs = children(MlflowClient(config["tracking_uri"]), values["mlflow_run_id"], phase="select")
    # The two runs logged before the crash were found again, not logged twice.
    assert sorted(r.data.tags["pipeline"] for r in runs) == sorted(PIPELINES)
    space = SearchSpace.load()
    for selected in runs:
        pipeline = selected.data.tags["pipeline"]
        assert (selected.info.run_name, selected.data.tags["tuner"], selected.data.tags["group"]) == (f"select-all-{pipeline}", "default", "all")
        assert {name: selected.data.params[name] for name in space.defaults(pipeline)} == {
            name: str(value) for name, value in space.defaults(pipeline).items()}
        assert selected.data.metrics["objective"] == pytest.approx(values["table"]["all"][pipeline]["objective"], abs=1e-5)


def test_approval_asks_again_after_a_bad_edit_or_an_unknown_answer(tmp_path, baby_format_dir, shared_cache):
    answers = iter([{"action": "edit", "changes": {"neighbors": 5000}}, {"action": "maybe"}, {"action": "edit", "changes": {}},
                    {"action": "edit", "changes": {"neighbors": 30}}])
    shown = []

    def answer(payload):
        shown.append(payload)
        return next(answers)

    script = [call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}]),
              call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="ask", groups="all", budget=2), "cache_dir": shared_cache}
        run(config, answer, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    errors = [payload["error"] for payload in shown]
    assert errors[0] == "" and "the edit was refused" in errors[1] and "neighbors=5000 is out of range [10, 500]" in errors[1]
    assert errors[2] == "answer with approve, edit or reject, not {'action': 'maybe'}"
    assert errors[3] == "an edit needs at least one NAME=VALUE"
    assert all(payload["changes"] == {"neighbors": 20} for payload in shown)  # the same proposal, asked again
    assert len(llm.requests) == 2  # asking the person again costs no LLM call
    assert [t.params["neighbors"] for t in complete(config["storage"], "s1-all")] == [50, 30]


def test_the_terminal_reads_approve_edit_and_reject(monkeypatch, capsys):
    from rectune.agent.cli import ask_terminal

    payload = {"group": "all", "pipeline": "heuristic", "trial": "2/3", "best": {"trial": 0, "objective": 0.1},
               "diff": {"neighbors": [50, 20]}, "rationale": "denser", "error": ""}

    def typed(*lines):
        replies = iter(lines)

        def read(prompt=""):
            try:
                return next(replies)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", read)

    typed("e neighbors=30 k=100")
    assert ask_terminal(payload) == {"action": "edit", "changes": {"neighbors": 30, "k": 100}}
    typed("r  keep k small ")
    assert ask_terminal(payload) == {"action": "reject", "comment": "keep k small"}
    typed("e neighbors", "maybe", "a")
    assert ask_terminal(payload) == {"action": "approve"}
    out = capsys.readouterr().out
    assert "neighbors: 50 → 20" in out and "expected KEY=VALUE, but got 'neighbors'" in out
    assert "answer a, e NAME=VALUE ..., or r COMMENT" in out
    typed()
    assert ask_terminal(payload) is None  # end of input: the session waits at this approval


def cli(tmp_path, data_dir, base_url, *args, postgres: str | None = None):
    """A `rectune` command line; with `postgres`, the ledger and the checkpoints live on that database."""
    import sys

    checkpoint = postgres or str(tmp_path / "sessions.db")
    storage = postgres or f"sqlite:///{tmp_path / 'optuna.db'}"
    return [sys.executable, "-m", "rectune.agent.cli", *args, "--checkpoint", checkpoint] + ([] if args[0] != "tune" else [
        "--dataset", "baby", "--groups", "all", "--budget", "3", "--llm-base-url", base_url, "--llm-model", "scripted",
        "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")])


def two_tower_script():
    return [call("choose_pipelines", choices=[{"group": "all", "pipeline": "two_tower", "reason": "learned"}]),
            call("propose_change", changes={"embedding_dim": 32, "epochs": 4}, rationale="smaller"),
            call("propose_change", changes={"embedding_dim": 48, "epochs": 4}, rationale="in between")]


def start(command, tmp_path, **options):
    import os
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECTUNE_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.Popen(command, cwd=tmp_path, env=env, text=True, start_new_session=True, **options)


def kill(process) -> None:
    import os
    import signal

    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def assert_exactly_the_budget(storage: str, study: str, budget: int) -> list:
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == budget
    ids = [t.user_attrs["proposal_id"] for t in done]
    assert len(set(ids)) == len(ids), f"a proposal ran twice: {ids}"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_sigkill_during_a_trial_then_resume(tmp_path, baby_format_dir, backend, request):
    import subprocess
    import time

    postgres = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    storage = postgres or f"sqlite:///{tmp_path / 'optuna.db'}"
    with ScriptedLLM(two_tower_script()) as llm:
        with open(tmp_path / "tune.log", "w") as log:  # the child keeps its own copy of the descriptor
            process = start(cli(tmp_path, baby_format_dir, llm.base_url, "tune", "--approve", "auto", "--session", "k1", postgres=postgres),
                            tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        # One storage for every poll: each poll is then a query, not a new connection pool (a
        # trial on the fixture lasts about a second; PostgreSQL refuses its 101st connection).
        polled, study, running = optuna.storages.RDBStorage(storage), None, []
        while time.monotonic() < deadline and process.poll() is None:
            try:
                study = study or optuna.load_study(study_name="k1-all", storage=polled)
                running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                           if t.user_attrs.get("tuner") == "llm"]
            except Exception:  # the study is not created yet, or SQLite is busy with the session's write
                running = []
            if running:
                break
            time.sleep(0.02)
        assert running, f"no LLM trial was seen running (the session exited with {process.poll()}): {(tmp_path / 'tune.log').read_text()[-3000:]}"
        kill(process)
        listed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "sessions", postgres=postgres), cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert "k1" in listed.stdout, listed.stdout + listed.stderr
        resumed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "resume", "k1", postgres=postgres), cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "report:" in resumed.stdout
    trials = assert_exactly_the_budget(storage, "k1-all", 3)
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and any(t.user_attrs.get("retry_of") == killed[0].number for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    traces = client.search_traces(locations=[client.get_experiment_by_name("baby").experiment_id])
    # mlflow.langchain.autolog traces each graph run, its LLM calls as CHAT_MODEL spans; the
    # resumed run made the last proposal call.
    assert any(span.span_type == "CHAT_MODEL" for trace in traces for span in trace.data.spans)
    # MLflow holds each finished trial of the ledger once, the killed one not at all.
    experiment = client.get_experiment_by_name("baby").experiment_id
    logged = [int(r.data.tags["trial_number"]) for r in client.search_runs([experiment], "tags.optuna_study = 'k1-all'")
              if "trial_number" in r.data.tags]
    assert sorted(logged) == sorted(t.number for t in trials if t.state == TrialState.COMPLETE)


def test_sigkill_at_an_approval_then_resume(tmp_path, baby_format_dir):
    import subprocess
    import threading
    import time

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    lines: list[str] = []
    with ScriptedLLM(two_tower_script()) as llm:
        process = start(cli(tmp_path, baby_format_dir, llm.base_url, "tune", "--approve", "ask", "--session", "k2"), tmp_path,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(line.startswith("[approve]") for line in lines):
            time.sleep(0.05)
        assert any(line.startswith("[approve]") for line in lines), lines
        kill(process)
        before = len(llm.requests)
        listed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "sessions"), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert "waiting for approval" in listed.stdout
        resumed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "resume", "k2"), cwd=tmp_path, input="a\na\n",
                                 capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("[approve]") == 2  # the waiting approval is asked again, then the next one
    # The waiting proposal is not asked for again; one more proposal fills the budget.
    assert len(llm.requests) == before + 1
    assert_exactly_the_budget(storage, "k2-all", 3)


def test_an_llm_outage_stops_cleanly_and_resumes(tmp_path, baby_format_dir, monkeypatch):
    import rectune.agent.llm
    from rectune.agent.llm import LLMUnavailable
    from scripted_llm import status

    original = rectune.agent.llm.resolve_llm
    monkeypatch.setattr("rectune.agent.session.resolve_llm", lambda *a, **k: original(*a, **k, max_retries=1, timeout_s=10))
    script = [call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}]),
              status(503), status(503),  # the first try and its one retry
              call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    with ScriptedLLM(script) as llm:
        config = settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=2)
        checkpoint = str(tmp_path / "sessions.db")
        with pytest.raises(LLMUnavailable, match="InternalServerError|APIStatusError|503"):
            run(config, None, echo=lambda line: None, checkpoint=checkpoint, report_dir=tmp_path / "r")
        values = run(config, None, echo=lambda line: None, checkpoint=checkpoint, resume=True, report_dir=tmp_path / "r")
    assert values["phase"] == "done"
    assert_exactly_the_budget(config["storage"], "s1-all", 2)


def comparison(tmp_path, data_dir, base_url, seeds, tuners, groups="activity:2", may_finish=False):
    from rectune.agent.compare import Comparison
    from rectune.agent.context import Settings

    base = Settings("cmp", "baby", groups, budget=3, approve="auto", may_finish=may_finish, storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"),
                    llm_base_url=base_url, llm_model="scripted")
    return Comparison(base, seeds, tuners, checkpoint=str(tmp_path / "sessions.db"))


def test_compare_any_list_of_tuners_fairly_from_the_ledger(tmp_path, baby_format_dir):
    from rectune.agent.compare import compare

    tune = [call("propose_change", changes={"neighbors": 20}, rationale="denser"),
            call("propose_change", changes={"popularity_weight": 1.0}, rationale="more popular items")]
    # In seed 1 the agent gives up on cold after one change: its curve must still be reported.
    early = [tune[0], call("finish", reason="good enough")]
    with ScriptedLLM([CHOOSE, *tune, *tune, CHOOSE, *early, *tune]) as llm:
        spec = comparison(tmp_path, baby_format_dir, llm.base_url, (0, 1), ("llm", "tpe", "random", "local"), may_finish=True)
        path = compare(spec, echo=lambda line: None, report_dir=tmp_path / "reports", tracker=Tracker(spec.settings.tracking_uri))
        lines = []
        again = compare(spec, echo=lines.append, report_dir=tmp_path / "reports")
        assert len(llm.requests) == 10  # the second call found every study done: no new LLM call
        assert not [line for line in lines if line.startswith("LLM:")]  # nor an LLM client (the embedded one starts a server)
    text = path.read_text()
    assert again == path
    for tuner in ("llm", "tpe", "random", "local"):
        assert f"| cold | {tuner} |" in text and f"| heavy | {tuner} |" in text
    assert "| tpe | cold |" in text and "| local | all groups |" in text
    assert "the agent could stop a group before its budget" in text
    assert " | 3, 2 | " in next(line for line in text.splitlines() if line.startswith("| cold | llm |"))
    assert "permutation test of the between-group variance" in text
    distinguishable = [line for line in text.splitlines() if line.startswith(("- activity:2: ", "- prefix (user-id letters): "))]
    assert len(distinguishable) == 2 and all(" p = " in line for line in distinguishable)
    assert (tmp_path / "reports" / "cmp-cold.png").stat().st_size > 1000
    for group in ("cold", "heavy"):
        for seed in (0, 1):
            first = None
            for tuner in ("llm", "tpe", "random", "local"):
                trials = complete(spec.settings.storage, f"cmp-{tuner}-{group}-seed{seed}")
                assert len(trials) == (2 if (tuner, group, seed) == ("llm", "cold", 1) else 3)
                assert trials[0].user_attrs["tuner"] == "default" and {t.user_attrs["tuner"] for t in trials[1:]} == {tuner}
                # Every tuner starts from the same first trial, on the pipeline the agent picked for the seed.
                first = first or trials[0].value
                assert trials[0].value == first
    local = complete(spec.settings.storage, "cmp-local-cold-seed0")
    assert all(t.user_attrs["rationale"].startswith("neighbour of trial") for t in local[1:])


class Killed(Exception):
    """Stands in for a kill in the middle of a trial."""


def test_an_interrupted_comparison_continues_where_it_stopped(tmp_path, baby_format_dir, monkeypatch):
    from rectune.agent.compare import compare
    from rectune.tools.runner import TrialRunner

    original, runs = TrialRunner.run, []

    def dies_in_the_second_tpe_trial(self, spec, *args, **kwargs):
        runs.append(spec)
        # Model selection runs every pipeline's default (4 runs), then tpe's trials 0 and 1.
        if len(runs) == 6:
            raise Killed
        return original(self, spec, *args, **kwargs)

    with ScriptedLLM([call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}])]) as llm:
        spec = comparison(tmp_path, baby_format_dir, llm.base_url, (0,), ("tpe", "local"), groups="all")
        with monkeypatch.context() as patch:
            patch.setattr(TrialRunner, "run", dies_in_the_second_tpe_trial)
            with pytest.raises(Killed):
                compare(spec, echo=lambda line: None, report_dir=tmp_path / "reports")
        assert len(complete(spec.settings.storage, "cmp-tpe-all-seed0")) == 1
        path = compare(spec, echo=lambda line: None, report_dir=tmp_path / "reports")
    assert len(llm.requests) == 1  # the pick was checkpointed: not asked again
    for tuner in ("tpe", "local"):
        trials = assert_exactly_the_budget(spec.settings.storage, f"cmp-{tuner}-all-seed0", 3)
        params = [str(sorted(t.user_attrs["params"].items())) for t in trials if t.state == TrialState.COMPLETE]
        assert len(set(params)) == 3
    killed = [t for t in optuna.load_study(study_name="cmp-tpe-all-seed0", storage=spec.settings.storage).get_trials()
              if t.state == TrialState.FAIL]
    assert len(killed) == 1  # the interrupted trial, queued again and run by the continued comparison
    assert "| all | tpe |" in path.read_text() and "| all | local |" in path.read_text()


def test_trials_to_reach_and_the_curve_read_from_the_ledger():
    from rectune.agent.compare import curve_of, trials_to_reach
    from rectune.tools.trial import TrialRecord, TrialResult, TrialSpec

    assert trials_to_reach([0.1, 0.1, 0.104, 0.106], 0.05) == 3
    assert trials_to_reach([0.1, 0.104], 0.05) is None
    assert trials_to_reach([0.1, 0.2], 0.0) == 0  # the default itself meets a zero margin

    def record(number, state, objective=None):
        result = None if objective is None else TrialResult(TrialSpec("baby", "all", "all", "heuristic"), objective, {}, 1.0, 0.0, 0.0, "none")
        return TrialRecord(number, "tpe", state, {"k": number}, result=result)

    history = [record(0, "complete", 0.1), record(1, "rejected"), record(2, "failed"), record(3, "complete", 0.09),
               record(4, "complete", 0.12)]
    # A rejected proposal is not a trial; a failed one is, and keeps the best where it was.
    assert curve_of(history) == [0.1, 0.1, 0.1, 0.12]


def test_group_difference_test_sees_real_and_random_partitions():
    import numpy as np

    from rectune.agent.compare import group_difference_test

    rng = np.random.default_rng(0)
    values = rng.normal(size=2000)
    random_codes = rng.integers(0, 4, size=2000)
    assert group_difference_test(values, random_codes)[1] > 0.05
    shifted = values + (random_codes == 0) * 0.5
    assert group_difference_test(shifted, random_codes)[1] < 0.01


def test_paired_statistics_respect_seeds_and_small_samples():
    import numpy as np

    from rectune.agent.compare import bootstrap_interval, sign_flip_p

    # Five seeds all in favour: the smallest p an exact sign-flip test on 5 pairs can give.
    assert sign_flip_p(np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == pytest.approx(2 / 32)
    assert sign_flip_p(np.array([0.1, -0.1, 0.2, -0.2])) == pytest.approx(1.0)
    # 4 groups × 5 seeds where each seed moves all its groups together: 5 clusters, not 20 pairs.
    seeds = np.repeat(np.arange(5), 4)
    differences = np.repeat([0.3, 0.2, 0.1, 0.2, -0.05], 4) + np.tile([0.0, 0.001, -0.001, 0.0], 5)
    assert sign_flip_p(differences, seeds) == pytest.approx(sign_flip_p(np.array([0.3, 0.2, 0.1, 0.2, -0.05])))
    assert sign_flip_p(differences, seeds) > 0.06
    assert sign_flip_p(differences) < 0.01  # treating the 20 pairs as independent overstates the evidence
    clustered, naive = bootstrap_interval(differences, clusters=seeds), bootstrap_interval(differences)
    assert clustered[1] - clustered[0] > 1.5 * (naive[1] - naive[0])
    assert clustered[0] < differences.mean() < clustered[1]


def test_prompts_readme_lists_every_prompt_file():
    folder = Path(__file__).resolve().parents[1] / "prompts"
    readme = (folder / "README.md").read_text()
    unlisted = [path.name for path in folder.glob("*.md") if path.name != "README.md" and f"`{path.name}`" not in readme]
    assert not unlisted


def test_wall_time_budget_stops_tuning(tmp_path, baby_format_dir):
    with ScriptedLLM([CHOOSE]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto"), "max_minutes": 1e-6}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    assert values["finished"] == {"cold": "wall-time budget", "heavy": "wall-time budget"}
    assert len(llm.requests) == 1  # only the pick: no tuning turn after the budget ran out
    assert values["phase"] == "done" and all(len(h) == 1 for h in values["history"].values())
    from rectune.models.errors import ConfigError

    with pytest.raises(ConfigError, match="session 's1' already exists"):
        run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"))


@pytest.mark.parametrize("bad, message", [({"objective": "ndcg@0"}, "at least 1"),
                                          ({"max_latency_ms": 0.0}, "--max-latency-ms must be above 0")])
def test_bad_settings_are_refused_before_the_llm_is_called_or_a_checkpoint_written(tmp_path, baby_format_dir, bad, message):
    from rectune.models.errors import ConfigError

    lines = []
    checkpoint = str(tmp_path / "sessions.db")
    with ScriptedLLM([CHOOSE]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto"), **bad}
        with pytest.raises(ConfigError, match=message):
            run(config, None, echo=lines.append, checkpoint=checkpoint, report_dir=tmp_path / "r")
    assert llm.requests == [] and not any(line.startswith("LLM:") for line in lines)
    # Checkpointed, they would stop every `rectune resume` of the session the same way.
    assert list_sessions(checkpoint) == []


def test_the_best_trial_is_the_best_that_met_the_latency_budget():
    from rectune.agent.report import best_record
    from rectune.tools.trial import TrialRecord, TrialResult, TrialSpec

    def record(number: int, objective: float, feasible: bool, state: str = "complete") -> TrialRecord:
        result = TrialResult(TrialSpec("baby", "all", "all", "heuristic"), objective, {}, 1.0, 0.0, 0.0, "none", feasible)
        return TrialRecord(number, "llm", state, {"k": number}, result=None if state != "complete" else result)

    fast, slow, faster = record(0, 0.03, True), record(1, 0.05, False), record(2, 0.04, True)
    rejected = record(3, 0.0, True, state="rejected")
    assert best_record([fast, slow]) is fast
    assert best_record([fast, slow, faster, rejected]) is faster
    assert best_record([slow, rejected]) is slow  # none met it: still the best there is
    assert best_record([rejected]) is None


def test_checkpoints_from_before_the_study_loop_are_refused_by_name_unless_finished():
    from rectune.agent.state import checked
    from rectune.models.errors import ConfigError

    old_row = {"trial": 0, "tuner": "default", "params": {"k": 500}, "objective": 0.1, "recall@20": 0.2, "latency_ms": 1.0}
    new_row = {"number": 0, "tuner": "default", "state": "complete", "params": {"k": 500}}
    with pytest.raises(ConfigError, match="session 'old' was saved by a rectune from before the study loop.*'old-<group>'"):
        checked({"phase": "tune", "history": {"all": [old_row]}}, "old")
    finished = {"phase": "done", "history": {"all": [old_row]}}
    assert checked(finished, "old") is finished  # listed by `rectune sessions`, never run again
    for values in ({}, {"phase": "select"}, {"phase": "tune", "history": {"all": [new_row]}}):
        assert checked(values, "new") is values


def test_compare_refuses_a_tuner_that_is_not_registered(tmp_path):
    from typer.testing import CliRunner

    from rectune.agent.cli import app

    result = CliRunner().invoke(app, ["compare", "--tuners", "llm,tpe,annealing", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--checkpoint", str(tmp_path / "s.db")])
    assert result.exit_code == 2
    assert "--tuners must name registered tuners ['default', 'llm', 'local', 'random', 'tpe'], but got ['llm', 'tpe', 'annealing']" \
        in result.output
    assert not (tmp_path / "o.db").exists()  # refused before anything was written
