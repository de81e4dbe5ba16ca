"""The agent when a trial produces no number, and the report of an objective named by TopN:
the real client over HTTP against the scripted server, real runner, ledger and checkpoints."""

import re

from rectune.agent.session import run
from rectune.tools.study import Study
from scripted_llm import ScriptedLLM, call, is_pick
from test_agent import settings


def test_a_trial_that_fails_counts_and_the_session_goes_on(tmp_path, baby_format_dir, shared_cache):
    # recall@100 needs 100 candidates: K = 60 is inside the search space, so only the runner can refuse it.
    # Under recall@100 every pipeline recalls all of the fixture's 80 items: all tie, and the pick
    # takes the heuristic with DeepFM, whose K can move the objective (without a ranker it cannot).
    script = [call("propose_change", changes={"k": 60}, rationale="fewer candidates"),
              call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    ranked = call("choose_pipelines", all={"because": "best objective", "pipeline": "heuristic+deepfm"})
    lines = []
    with ScriptedLLM(script, picks=[ranked]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3),
                  "objective": "recall@100", "cache_dir": shared_cache}
        values = run(config, None, echo=lines.append, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    history = Study.open(config["storage"], "s1-all").history()
    assert values["selection"]["all"]["chosen_by"] == "llm"
    assert values["selection"]["all"]["pipeline"] == "heuristic+deepfm"
    assert [r.state for r in history] == ["complete", "failed", "complete"]
    assert [r.params["k"] for r in history[1:]] == [60, history[0].params["k"]]  # each proposal ran as the LLM sent it
    assert "K=60" in history[1].error
    assert [r["state"] for r in values["history"]["all"]] == ["complete", "failed", "complete"]
    assert any("failed (" in line and "K=60" in line for line in lines), lines
    # The LLM was told, and its next proposal ran: the failed trial cost one slot of the budget, no more.
    second = [i for i, body in enumerate(llm.requests, 1) if not is_pick(body)][1]
    assert "K=60" in llm.prompt(second)
    assert values["finished"]["all"] == "budget" and values["phase"] == "done"


def test_the_report_reads_an_objective_named_by_top_n(tmp_path, baby_format_dir, shared_cache):
    script = [call("propose_change", changes={"top_n": 30}, rationale="longer lists")]
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=2),
                  "objective": "f1@topn", "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    report = open(values["report"]).read()
    row = next(line for line in report.splitlines() if line.startswith("| all | heuristic | f1@topn |"))
    default, best = (float(cell) for cell in row.split("|")[4:6])  # f1@20 for the default, f1@30 for the best
    assert default > 0 and best > 0 and not re.search(r"\bnan\b", row)


def test_a_tool_not_offered_on_a_turn_is_refused_whatever_its_name():
    """Only choose (with a menu), propose_change and finish (when the session may finish) exist;
    a call of anything else — finish in a full-budget session, the tools of the old design — is
    a reply that cannot be used (agent/proposer.py then runs candidate A, at no extra call)."""
    from langchain_core.messages import AIMessage

    from rectune.agent.llm_tools import LETTERS, Scope, offered, read_tune_call, tune_tools
    from rectune.tools.proposers.menu import Candidate
    from rectune.tools.space import SearchSpace

    def reply(name: str, **args) -> AIMessage:
        return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": "c1"}])

    space = SearchSpace.load()
    best = space.defaults("heuristic")
    denser = Candidate(space.validate("heuristic", {"neighbors": 20}, base=best), "neighbour", {"neighbors": [best["neighbors"], 20]})
    full_budget = Scope(space, "heuristic", "ndcg@20", best, {}, [denser], may_finish=False)
    assert offered(full_budget) == ["choose", "propose_change"]
    assert [tool["function"]["name"] for tool in tune_tools(full_budget)] == ["choose", "propose_change"]
    for name, args in (("finish", {"reason": "converged"}), ("evaluate_group", {"group": "heavy"}),
                       ("get_history", {}), ("train_model", {"params": {"k": 80}})):
        refused = read_tune_call(reply(name, **args), full_budget)
        assert refused.kind == "invalid"
        assert refused.message == f"there is no tool {name!r} on this turn; the tools are choose, propose_change"
    prose = read_tune_call(AIMessage(content="k should go up"), full_budget)
    assert prose.kind == "invalid" and prose.message == "the reply was text ('k should go up'), not a call of choose, propose_change"
    # The choose tool always lists every letter (a stable prompt prefix); a letter past the menu is refused.
    [choose] = [t for t in tune_tools(full_budget) if t["function"]["name"] == "choose"]
    assert choose["function"]["parameters"]["properties"]["candidate"]["enum"] == list(LETTERS)
    assert read_tune_call(reply("choose", candidate="B", rationale="r"), full_budget).kind == "invalid"
    chosen = read_tune_call(reply("choose", candidate="A", rationale="denser"), full_budget)
    assert (chosen.kind, chosen.params, chosen.candidate) == ("choose", denser.params, 0)

    # An endpoint that ignores the schema may change what cannot move the objective: that is no new trial.
    inert = read_tune_call(reply("propose_change", changes={"top_n": 50, "neighbors": 30}, rationale="longer"), full_budget)
    assert inert.kind == "invalid" and inert.message.startswith("propose_change was not used: top_n cannot move ndcg@20 here (tunable: ")
    own = read_tune_call(reply("propose_change", changes={"neighbors": 30}, rationale="denser"), full_budget)
    assert (own.kind, own.params["neighbors"]) == ("propose_change", 30)

    # A session that may finish offers finish; without a menu there is nothing to choose.
    empty_menu = Scope(space, "heuristic", "ndcg@20", best, {}, [], may_finish=True)
    assert offered(empty_menu) == ["propose_change", "finish"]
    assert read_tune_call(reply("finish", reason="converged"), empty_menu).kind == "finish"
    assert read_tune_call(reply("choose", candidate="A", rationale="r"), empty_menu).kind == "invalid"
