"""The agent when a trial produces no number, and the report of an objective named by TopN:
the real client over HTTP against the scripted server, real runner, ledger and checkpoints."""

import re

from rectune.agent.session import run
from rectune.tools.study import Study
from scripted_llm import ScriptedLLM, call
from test_agent import settings

CHOOSE_ALL = call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}])


def test_a_trial_that_fails_counts_and_the_session_goes_on(tmp_path, baby_format_dir, shared_cache):
    # recall@100 needs 100 candidates: K = 60 is inside the search space, so only the runner can refuse it.
    script = [CHOOSE_ALL, call("propose_change", changes={"k": 60}, rationale="fewer candidates"),
              call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    lines = []
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3),
                  "objective": "recall@100", "cache_dir": shared_cache}
        values = run(config, None, echo=lines.append, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    history = Study.open(config["storage"], "s1-all").history()
    assert [r.state for r in history] == ["complete", "failed", "complete"]
    assert "K=60" in history[1].error
    assert [r["state"] for r in values["history"]["all"]] == ["complete", "failed", "complete"]
    assert any("failed (" in line and "K=60" in line for line in lines), lines
    # The LLM was told, and its next proposal ran: the failed trial cost one slot of the budget, no more.
    assert "K=60" in llm.prompt(3)
    assert values["finished"]["all"] == "budget" and values["phase"] == "done"


def test_the_report_reads_an_objective_named_by_top_n(tmp_path, baby_format_dir, shared_cache):
    script = [CHOOSE_ALL, call("propose_change", changes={"top_n": 30}, rationale="longer lists")]
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=2),
                  "objective": "f1@topn", "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    report = open(values["report"]).read()
    row = next(line for line in report.splitlines() if line.startswith("| all | heuristic | f1@topn |"))
    default, tuned = (float(cell) for cell in row.split("|")[4:6])  # f1@20 for the default, f1@30 for the tuned one
    assert default > 0 and tuned > 0 and not re.search(r"\bnan\b", row)


def test_a_free_tool_not_offered_on_a_turn_is_refused_at_no_cost():
    from langchain_core.messages import AIMessage

    from rectune.agent.llm_tools import Scope, offered, read_tune_call
    from rectune.tools.space import SearchSpace

    space = SearchSpace.load()
    scope = Scope(space, "heuristic", space.defaults("heuristic"), {}, ["cold", "heavy"], may_finish=False)
    again = AIMessage(content="", tool_calls=[{"name": "evaluate_group", "args": {"group": "heavy"}, "id": "c1"}])
    assert read_tune_call(again, scope, free=True).kind == "evaluate_group"
    refused = read_tune_call(again, scope, free=False)
    assert refused.kind == "invalid" and "must decide" in refused.message
    assert "evaluate_group" not in offered(scope, free=False) and "finish" not in offered(scope, free=False)
    prose = read_tune_call(AIMessage(content="k should go up"), scope, free=False)
    assert prose.kind == "invalid" and prose.message.endswith(f"one call of: {', '.join(offered(scope, free=False))}.")
