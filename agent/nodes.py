"""The agent graph's nodes: module-level functions of (state, runtime), one step each.

A node reaches the trial runner, the LLM and MLflow through LangGraph's runtime context
(agent/context.py: Resources), opened from the session's settings on first use when the
caller gave none (LangGraph Studio). Side effects are idempotent, because a node that is
interrupted or killed runs again from its start: trials are found again in the ledger by
their proposal id (tools.study.Study.run), MLflow runs by their key.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from rectune.agent.context import Resources, Settings
from rectune.agent.prompts import render
from rectune.agent.llm import answered_in_text, bind_decision_tools, text_replies_stop
from rectune.agent.proposer import LLMProposer, call_llm
from rectune.agent.report import json_compact, metrics_row, outcome, selection_table, session_report
from rectune.agent.selection import decided, group_table, pick_tool, read_pick, tied
from rectune.agent.state import State
from rectune.models.errors import RectuneError
from rectune.models.pipeline import PIPELINES
from rectune.tools.adoption import adopt, best_record, transfers
from rectune.tools.trial import changed, spent
from rectune.tools.proposer import Finish, Proposal, ProposerContext
from rectune.tools.proposers import make_proposer

SELECT_ATTEMPTS = 3
_OPENED: dict[str, Resources] = {}
"""Resources this process opened for callers that gave none, by the settings they were opened
from (a Studio thread that reuses a session name with other settings gets its own)."""


def resources(runtime: Runtime[Resources] | None, settings: Settings) -> Resources:
    """The runtime context the caller gave (`rectune tune` gives a runner, an LLM, MLflow), or
    else this process's own for the session, its runner opened once from the settings."""
    given = runtime.context if runtime is not None and isinstance(runtime.context, Resources) else None
    if given is not None and given.runner is not None:
        given.echo = given.echo or print
        return given
    found = _OPENED.setdefault(json.dumps(settings.to_json(), sort_keys=True, default=str), Resources(echo=print))
    if found.runner is None:
        from rectune.tools.runner import TrialRunner

        found.runner = TrialRunner.open(settings.dataset, settings.groups, data_dir=settings.data_dir,
                                        cache_dir=settings.cache_dir, max_latency_ms=settings.max_latency_ms)
    return found


def chat(found: Resources, settings: Settings):
    """The LLM client, resolved when a node first needs it: the graph itself is built without one."""
    if found.llm is None:
        from rectune.agent.session import open_llm

        found.llm = open_llm(settings, found.echo)
    return found.llm


def study(found: Resources, settings: Settings, group: str, pipeline: str):
    """The session's study of `group`, opened once per process."""
    from rectune.tools.study import Study

    name = settings.study_name(group)
    key = f"{settings.storage}|{name}"
    if key not in found.opened:
        found.opened[key] = Study.open(settings.storage, name, settings.study_context(group, pipeline))
    return found.opened[key]


def log_once(found: Resources, settings: Settings, result, tuner: str, name: str, **tags) -> None:
    """A run the ledger does not hold (a default run of model selection) as a nested MLflow run named
    `name`, once: a node re-run after a crash finds the run it logged by its key."""
    if found.session is not None:
        found.session.log_trial(result, tuner, f"{settings.session}/{name}", extra_tags=tags, run_name=name)


def proposer_context(state: State, settings: Settings, found: Resources, group: str) -> ProposerContext:
    """The context of `group`'s proposals, with the best configurations of the groups tuned before
    it on the same pipeline (the menu offers them: cross-group transfer)."""
    pipeline = state["selection"][group]["pipeline"]
    earlier = [(other, records(state, other)) for other in state["history"]
               if other != group and state["selection"][other]["pipeline"] == pipeline]
    return ProposerContext(settings.study_context(group, pipeline), found.runner.space, settings.budget, transfers(earlier))


def records(state: State, group: str) -> list:
    from rectune.tools.trial import TrialRecord

    return [TrialRecord.from_json(row) for row in state["history"][group]]


def state_row(record) -> dict:
    """A trial as the checkpointed state keeps it: without its per-user values (thousands of
    numbers a trial, rewritten at every checkpoint), which the ledger holds for the report."""
    row = record.to_json()
    if row.get("result"):
        row["result"] = {**row["result"], "per_user": None}
    return row


def select(state: State, runtime: Runtime[Resources]) -> dict:
    """Model selection: every pipeline's default configuration on every group (validation),
    with each pipeline's paired difference to the group's best (agent/selection.py)."""
    from rectune.tools.noise import paired_interval, vector

    began_at = time.time()
    settings = Settings.from_json(state["settings"])
    found = resources(runtime, settings)
    runner, space, labels = found.runner, found.runner.space, list(found.runner.groups.labels)
    table, users, warmed = {}, {}, None
    # Ranker-less pipelines first, and no warm-up before they are all scored: the leader after
    # one pipeline is a guess, and a warm-up for the wrong one took ~40 s of the 2 cores the
    # next fits need (Baby, 2026-12-02: the heuristic led, then the two-tower).
    order = sorted(PIPELINES, key=lambda name: PIPELINES[name][1] != "none")
    for done, pipeline in enumerate(order, start=1):
        for group in labels:
            result = runner.run(settings.study_context(group, pipeline, "default").spec(space.defaults(pipeline)))
            log_once(found, settings, result, "default", f"select-{group}-{pipeline}", phase="select")
            table.setdefault(group, {})[pipeline] = metrics_row(result.metrics[group], result.spec.objective,
                                                                space.defaults(pipeline)["top_n"]) | {
                "objective": round(result.objective, 5), "fit_seconds": None if result.fit_seconds is None else round(result.fit_seconds, 1),
                "ms_per_user": round(result.latency_ms_per_user, 3)}
            users[group, pipeline] = result.per_user
        found.echo(f"[select] {pipeline}: default configuration evaluated on {len(labels)} groups")
        leader = _leader(table)
        if found.warm_prompt_cache and leader != warmed and (done == len(order) or PIPELINES[order[done]][1] != "none"):
            warmed = leader
            _warm_in_background(found, settings, leader)
    for group, rows in table.items():
        best = max(rows, key=lambda p: rows[p]["objective"])
        for pipeline, row in rows.items():
            if users[group, pipeline] is not None and users[group, best] is not None:
                # An objective of the whole list (coverage, novelty) has no per-user values: no band, the best wins.
                row["vs_best"] = paired_interval(vector(users[group, pipeline]), vector(users[group, best]),
                                                 seed=settings.seed).to_json()
    return {"table": table, "phase": "select", "began_at": began_at, "started_at": time.time()}


def _leader(table: dict) -> str:
    """The pipeline best in most groups so far (ties: the first evaluated): the likeliest to be tuned."""
    wins = [max(rows, key=lambda p: rows[p]["objective"]) for rows in table.values()]
    return max(dict.fromkeys(wins), key=wins.count)


def _warm_in_background(found: Resources, settings: Settings, pipeline: str) -> None:
    """The tuning prompt's prefix for `pipeline`, read by the endpoint while the next pipelines
    train, which leave CPU idle: the first tuning call then reads only its own rows. A later
    leader's warm-up replaces it; a failure costs nothing but the cache."""
    import threading

    proposer = LLMProposer(0, llm=chat(found, settings), may_finish=settings.may_finish)
    context = ProposerContext(settings.study_context("all", pipeline), found.runner.space, settings.budget)

    def warm() -> None:
        from rectune.agent.endpoint import unattended

        try:
            with unattended():
                seconds = proposer.warm(context)
        except Exception as error:  # the first real call meets (and reports) any endpoint problem
            found.echo(f"[llm] warming the prompt cache for {pipeline} failed ({type(error).__name__}); the first call reads it")
            return
        found.echo(f"[llm] {pipeline}'s tuning prompt prefix cached during model selection ({seconds:.0f} s, overlapped)")

    threading.Thread(target=warm, name=f"warm-{pipeline}", daemon=True).start()


def pick(state: State, runtime: Runtime[Resources]) -> dict:
    """A pipeline per group: the best, or — where other pipelines are within noise of it — the
    LLM's choice among those (three attempts, each told why the last was refused; a group it
    failed gets the best). Beside each pick, the paper's check: what the objective, and
    F1@TopN, would have picked."""
    from langchain_core.messages import HumanMessage

    settings = Settings.from_json(state["settings"])
    found = resources(runtime, settings)
    labels, table = list(found.runner.groups.labels), state["table"]
    bands = {group: tied(table[group]) for group in labels}
    ties = {group: band for group, band in bands.items() if len(band) > 1}
    feedback, picked, calls, refused, in_text, usage = "", {}, 0, 0, 0, state.get("usage")
    open_ties = dict(ties)
    while open_ties and calls < SELECT_ATTEMPTS:
        # Only the groups still open are asked about again: a valid pick is kept.
        calls += 1
        tables = "\n\n".join(group_table(group, table[group], settings.objective, band_only=True) for group in open_ties)
        prompt = render("select", dataset=settings.dataset, objective=settings.objective, table=tables,
                        groups=", ".join(open_ties))
        told = "\n" + render("select_refused", problems=feedback) if feedback else ""
        reply, usage = call_llm(bind_decision_tools(chat(found, settings), [pick_tool(open_ties)]),
                                [HumanMessage(prompt + told)], usage)
        in_text += answered_in_text(reply)
        valid, feedback = read_pick(reply, open_ties)
        picked.update(valid)
        refused += bool(feedback)
        open_ties = {group: band for group, band in open_ties.items() if group not in picked}
    if in_text == SELECT_ATTEMPTS:
        # Not a pick the LLM got wrong: an endpoint that makes no tool calls would fail every later turn too.
        raise text_replies_stop(in_text)
    selection = {group: decided(table[group], bands[group], picked.get(group), feedback, found.runner.space)
                 for group in labels}
    found.echo("[pick] " + "; ".join(f"{g}: {s['pipeline']} ({s['chosen_by']}{'' if s['agrees'] else ', argmax ' + s['argmax']})"
                                     for g, s in selection.items()))
    if found.session is not None:
        found.session.log_session_artifact("\n\n".join(group_table(g, table[g], settings.objective) for g in labels)
                                           + "\n\n" + selection_table(selection, settings.objective), "selection.md")
        # Tags, not params: a pick re-run after a crash may choose otherwise, and params cannot change.
        found.session.log_session_tags({f"select/{g}/{name}": value for g, s in selection.items() for name, value in (
            ("pipeline", s["pipeline"]), ("chosen_by", s["chosen_by"]), ("objective_argmax", s["argmax"]),
            ("within_noise", ",".join(s["band"])), ("agrees_objective", s["agrees"]), ("f1_argmax", s["f1_argmax"]),
            ("agrees_f1", s["f1_agrees"]), ("because", s.get("because", "")))})
    return {"selection": selection, "queue": labels, "phase": "tune", "history": {}, "finished": {}, "usage": usage,
            "llm_calls": {"select": calls}, "invalid_calls": {"select": refused}}


def start_group(state: State, runtime: Runtime[Resources]) -> dict:
    """The next group's study, and its trial 0: the pipeline's default configuration."""
    settings = Settings.from_json(state["settings"])
    found = resources(runtime, settings)
    group, queue = state["queue"][0], state["queue"][1:]
    pipeline = state["selection"][group]["pipeline"]
    default = make_proposer("default").propose([], proposer_context(state, settings, found, group))
    record = study(found, settings, group, pipeline).run(default, found.runner, found.session)
    found.echo(f"[tune] group {group} ({pipeline}): default {settings.objective} = {outcome(record)}")
    return {"group": group, "queue": queue, "history": {**state["history"], group: [state_row(record)]}, "pending": None}


def _stop_reason(state: State, settings: Settings, history: list) -> str | None:
    """Why the group stops before asking the LLM again, or None."""
    if spent(history) >= settings.budget:
        return "budget"
    if state["llm_calls"].get(state["group"], 0) >= settings.max_llm_calls:
        return "llm-call budget"
    if settings.max_minutes is not None and time.time() - state["started_at"] > 60 * settings.max_minutes:
        return "wall-time budget"
    return None


def decide(state: State, runtime: Runtime[Resources]) -> Command[Literal["approve", "next_group"]]:
    """The LLM's next move for the group (agent/proposer.py): a proposal to approve, or the
    end of the group (its finish, or a budget: trials, LLM calls, wall time)."""
    settings, group = Settings.from_json(state["settings"]), state["group"]
    found = resources(runtime, settings)
    history = records(state, group)
    stop = _stop_reason(state, settings, history)
    if stop:
        return Command(goto="next_group", update={"finished": {**state["finished"], group: stop}})
    calls = state["llm_calls"].get(group, 0)
    # Proposer seed 0, as in `rectune compare`: the study seed already varies the menus per seed.
    proposer = LLMProposer(0, llm=chat(found, settings), may_finish=settings.may_finish, echo=found.echo)
    outcome = proposer.propose(history, proposer_context(state, settings, found, group))
    cost = proposer.last
    update = {"llm_calls": {**state["llm_calls"], group: calls + cost["calls"]},
              "invalid_calls": {**state["invalid_calls"], group: state["invalid_calls"].get(group, 0) + cost["refused"]},
              "usage": _added(state.get("usage") or {}, cost)}
    if isinstance(outcome, Finish):
        found.echo(f"[tune] {group}: the LLM finished — {outcome.reason}")
        return Command(goto="next_group", update={**update, "finished": {**state["finished"], group: f"finish: {outcome.reason}"}})
    best = best_record(history)
    # Numbered by the history, not by calls: the second of a pair costs no call.
    pending = {"id": f"{group}-{len(history)}", "asked_at": time.time(), "params": outcome.params, "rationale": outcome.rationale,
               "changes": changed(outcome.params, best.params), "meta": outcome.meta}
    return Command(goto="approve", update={**update, "pending": pending, "approval_error": ""})


def _added(usage: dict, cost: dict) -> dict:
    return {"calls": usage.get("calls", 0) + cost["calls"], "seconds": usage.get("seconds", 0.0) + cost.get("llm_seconds", 0.0),
            **{name: usage.get(name, 0) + cost.get(name, 0) for name in ("input_tokens", "cached_tokens", "output_tokens")}}


def approve(state: State, runtime: Runtime[Resources]) -> Command[Literal["run_trial", "decide", "approve"]]:
    """A person approves, edits or rejects the proposal (`approve=ask`); a reject is recorded
    in the ledger, so the proposal counts as tried and the LLM sees it in the history."""
    settings, group, proposal = Settings.from_json(state["settings"]), state["group"], state["pending"]
    if settings.approve == "auto":
        return Command(goto="run_trial")
    history = records(state, group)
    best = best_record(history)
    answer = interrupt({
        "group": group, "pipeline": state["selection"][group]["pipeline"],
        "trial": f"{sum(1 for r in history if r.state in ('complete', 'failed')) + 1}/{settings.budget}",
        "changes": proposal["changes"], "diff": {k: [best.params.get(k), v] for k, v in proposal["changes"].items()},
        "rationale": proposal["rationale"], "best": {"trial": best.number, "objective": best.objective},
        "error": state.get("approval_error", ""),
    })
    action = answer.get("action") if isinstance(answer, dict) else None
    # From the proposal (or the last answer) to this one, the session waited for a person.
    waited = {"waited": state.get("waited", 0.0) + time.time() - proposal.get("asked_at", time.time()),
              "pending": {**proposal, "asked_at": time.time()}}
    if action == "approve":
        return Command(goto="run_trial", update={"approval_error": "", **waited})
    if action == "reject":
        return _rejected(state, runtime, str(answer.get("comment") or "no reason given"), waited)
    if action == "edit":
        return _edited(state, runtime, answer.get("changes"), history, waited)
    return Command(goto="approve", update={"approval_error": f"answer with approve, edit or reject, not {answer!r}", **waited})


def _rejected(state: State, runtime: Runtime[Resources], comment: str, waited: dict) -> Command[Literal["decide"]]:
    settings, group, proposal = Settings.from_json(state["settings"]), state["group"], state["pending"]
    found = resources(runtime, settings)
    found.echo(f"[approve] {group}: rejected — {comment}")
    pipeline = state["selection"][group]["pipeline"]
    record = study(found, settings, group, pipeline).reject(_proposal(proposal), comment)
    return Command(goto="decide", update={"pending": None, "approval_error": "", "waited": waited["waited"],
                                          "history": {**state["history"], group: [*state["history"][group], state_row(record)]}})


def _edited(state: State, runtime: Runtime[Resources], changes, history: list, waited: dict) -> Command[Literal["run_trial", "approve"]]:
    from rectune.tools.trial import canonical, tried

    settings, group, proposal = Settings.from_json(state["settings"]), state["group"], state["pending"]
    if not isinstance(changes, dict) or not changes:
        # Else an empty edit would run the proposal as if a person had changed it.
        return Command(goto="approve", update={"approval_error": "an edit needs at least one NAME=VALUE", **waited})
    space = resources(runtime, settings).runner.space
    try:
        params = space.validate(state["selection"][group]["pipeline"], changes, base=proposal["params"])
    except RectuneError as error:
        return Command(goto="approve", update={"approval_error": f"the edit was refused: {error}", **waited})
    seen = tried(history).get(canonical(params))
    if seen:
        return Command(goto="approve", update={"approval_error": f"the edited configuration was already {seen}", **waited})
    best = best_record(history)
    # What the LLM chose no longer ran, nor will the second of its pair (it is asked again); what its call
    # cost, and why a reply was not used, still hold.
    meta = {k: v for k, v in (proposal.get("meta") or {}).items() if k not in ("candidate", "source", "note", "then")}
    edited = {**proposal, "params": params, "changes": changed(params, best.params),
              "rationale": proposal["rationale"] + f" [edited by a person: {json_compact(changes)}]",
              "meta": {**meta, "source": "person"}}
    return Command(goto="run_trial", update={"pending": edited, "approval_error": "", "waited": waited["waited"]})


def _proposal(pending: dict) -> Proposal:
    return Proposal(pending["params"], "llm", pending["rationale"], pending["id"], pending.get("meta") or {})


def run_trial(state: State, runtime: Runtime[Resources]) -> Command[Literal["decide"]]:
    """The approved proposal's trial, exactly once (found again by its id after a crash)."""
    settings, group, proposal = Settings.from_json(state["settings"]), state["group"], state["pending"]
    found = resources(runtime, settings)
    pipeline = state["selection"][group]["pipeline"]
    record = study(found, settings, group, pipeline).run(_proposal(proposal), found.runner, found.session)
    history = [*records(state, group), record]
    best = best_record(history)
    used = spent(history)
    found.echo(f"[tune] {group}: trial {used}/{settings.budget} {json_compact(proposal['changes'])} → "
               f"{settings.objective} {outcome(record)} (best {outcome(best)})")
    return Command(goto="decide", update={"history": {**state["history"], group: [state_row(r) for r in history]},
                                          "pending": None})


def _test_metrics(found: Resources, settings: Settings, group: str, pipeline: str, params: dict) -> dict:
    """The configuration's test metrics on the group, its objective also under the name the
    settings give it (`f1@topn` is computed as `f1@<its top_n>`)."""
    result = found.runner.run(settings.study_context(group, pipeline).spec(params), report_test=True)
    metrics = dict(result.test_metrics[group])
    return {**metrics, settings.objective: metrics.get(result.metric, float("nan"))}


def next_group(state: State) -> Command[Literal["start_group", "report"]]:
    """The next group, or the report when every group is tuned."""
    return Command(goto="start_group" if state["queue"] else "report")


def report(state: State, runtime: Runtime[Resources]) -> dict:
    """Default vs adopted configuration per group on the test split, written as markdown (and to MLflow)."""
    from pathlib import Path

    settings = Settings.from_json(state["settings"])
    found = resources(runtime, settings)
    # From the ledger, the source of truth: the state's copies have no per-user values to pair.
    histories = {group: study(found, settings, group, state["selection"][group]["pipeline"]).history()
                 for group in state["history"]}
    tests, defaults, adoptions = {}, {}, {}
    for group, history in histories.items():
        pipeline = state["selection"][group]["pipeline"]
        defaults[group] = found.runner.space.defaults(pipeline)
        adoption = adoptions[group] = adopt(history, defaults[group], settings.seed)
        if adoption is not None:  # else no configuration of the group produced a number: nothing to report on test
            # The best is evaluated too when it is not adopted: the report shows what keeping the default avoided, or cost.
            default = _test_metrics(found, settings, group, pipeline, defaults[group])
            best = default if adoption.best_is_default else _test_metrics(found, settings, group, pipeline, adoption.best.params)
            tests[group] = {"default": default, "best": best, "adopted": default if adoption.kept_default else best}
    text = session_report(settings, state, histories, adoptions, tests, defaults,
                          "\n\n".join(group_table(g, rows, settings.objective) for g, rows in state["table"].items()))
    folder = Path(found.report_dir or "reports")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{settings.session}.md"
    path.write_text(text + "\n")
    if found.session is not None:
        found.session.log_session_artifact(text, "report.md")
    found.echo(f"[report] {path}")
    return {"report": str(path), "phase": "done"}
