"""The tuning agent as a LangGraph state machine.

    select → pick → start_group → decide ⇄ approve → run_trial → decide … → next_group
                                   (one group at a time)                    → report → END

The graph owns the control flow and every budget; the LLM makes one small decision per
turn (pick the pipelines; then, per group, one tool call) and sees the whole history each
time. Side effects are idempotent, because a node that is interrupted or killed runs
again from its start: trials are found again in the ledger by their proposal id, so each
proposal runs exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from agent.prompts import render
from agent.state import State
from agent.tools import canonical, read_select_call, read_tune_call, select_tool, tune_tools, unreadable_reply
from models.errors import RectuneError
from models.pipeline import PIPELINES
from tools.ledger import StudyContext, enqueue, log_unlogged, open_study, reclaim_orphans, run_next
from tools.runner import TrialRunner
from tools.space import SearchSpace
from tools.tracking import filter_value, metric_name
from tools.trial import TrialSpec

SELECT_ATTEMPTS = 3


class LLMUnavailable(RectuneError):
    """The LLM endpoint failed after its retries; the session can be resumed."""


@dataclass
class Deps:
    """What every process rebuilds from the settings: nothing here is checkpointed."""

    runner: TrialRunner
    space: SearchSpace
    llm: object
    """A LangChain chat model (ChatOpenAI)."""
    session: object | None = None
    """The MLflow parent run (tools.tracking.TrackingSession), if tracking."""
    echo: Callable[[str], None] = print
    report_dir: Path = Path("reports")


def _metrics_row(metrics: dict, objective: str, top_n: int) -> dict:
    names = [objective, "recall@20", "ndcg@20", f"precision@{top_n}", f"recall@{top_n}", f"f1@{top_n}"]
    return {name: round(float(metrics[name]), 5) for name in dict.fromkeys(names) if name in metrics}


def _record(trial, group: str, objective: str) -> dict:
    metrics = trial.user_attrs["metrics"][group]
    return {"trial": trial.number, "tuner": trial.user_attrs["tuner"], "params": trial.user_attrs["params"],
            "objective": trial.value, "recall@20": metrics.get("recall@20"), "ndcg@20": metrics.get("ndcg@20"),
            "latency_ms": trial.user_attrs["latency_ms_per_user"], "rationale": trial.user_attrs.get("rationale", ""),
            "seconds": trial.user_attrs["train_seconds"] + trial.user_attrs["eval_seconds"],
            "feasible": trial.user_attrs.get("feasible", True)}


def best_record(history: list[dict]) -> dict:
    """The best trial that met the latency budget; a slower one only when none did."""
    return max(history, key=lambda r: (r.get("feasible", True), r["objective"]))


def _call_llm(llm, messages, usage: dict | None) -> tuple[object, dict]:
    """The reply, and `usage` with this call's seconds and tokens added."""
    import openai
    import pydantic

    start = time.perf_counter()
    try:
        reply = llm.invoke(messages)
    except openai.OpenAIError as error:
        raise LLMUnavailable(f"the LLM endpoint failed after its retries ({type(error).__name__}: {error}); "
                             "nothing is lost — resume the session when it is back") from error
    except pydantic.ValidationError as error:
        # A malformed reply is the LLM's mistake, answered on its next turn like any other.
        reply = unreadable_reply(error)
        if reply is None:
            raise
    tokens = getattr(reply, "usage_metadata", None) or {}
    usage = dict(usage or {})
    for name, value in (("calls", 1), ("seconds", time.perf_counter() - start),
                        ("input_tokens", tokens.get("input_tokens", 0)), ("output_tokens", tokens.get("output_tokens", 0))):
        usage[name] = usage.get(name, 0) + value
    return reply, usage


def _usage_line(state: State) -> str:
    usage = state.get("usage") or {}
    trial_seconds = sum(r.get("seconds", 0.0) for rows in state["history"].values() for r in rows)
    calls = sum(state["llm_calls"].values())
    refused = sum(state["invalid_calls"].values())
    return (f"LLM: {calls} calls, {refused} refused ({(calls - refused) / max(calls, 1):.0%} valid), "
            f"{usage.get('seconds', 0.0):.1f} s, {usage.get('input_tokens', 0)} prompt + {usage.get('output_tokens', 0)} "
            f"completion tokens. Trials: {trial_seconds:.1f} s of training and evaluation.")


def history_table(history: list[dict], defaults: dict, objective: str) -> str:
    lines = [f"| trial | tuner | changes from default | {objective} | recall@20 | latency ms/user |", "|---|---|---|---|---|---|"]
    for row in history:
        changes = {k: v for k, v in row["params"].items() if defaults.get(k) != v}
        over = "" if row.get("feasible", True) else " (over the latency budget)"
        lines.append(f"| {row['trial']} | {row['tuner']} | {json_compact(changes) or '(default)'} | {row['objective']:.5f} | "
                     f"{(row['recall@20'] or 0):.5f} | {row['latency_ms']:.3f}{over} |")
    return "\n".join(lines)


def json_compact(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _fragment(name: str, **values) -> str:
    """A prompt file filled in, without its final newline: it goes inside other text."""
    return render(name, **values).rstrip("\n")


def f1_agrees(choice: dict) -> bool:
    # Sessions picked before the field existed hold only f1_argmax.
    return choice.get("f1_agrees", choice["pipeline"] == choice["f1_argmax"])


def selection_table(selection: dict, objective: str) -> str:
    """The paper's check per group: the pick beside what the objective, and F1@TopN, would pick."""
    lines = [f"| group | pipeline | chosen by | {objective} argmax | agrees | F1@TopN argmax | agrees | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for group, choice in selection.items():
        reason = " ".join(choice["reason"].split()).replace("|", "\\|")
        lines.append(f"| {group} | {choice['pipeline']} | {'LLM' if choice['llm'] else 'fallback'} | {choice['argmax']} | "
                     f"{'yes' if choice['agrees'] else 'no'} | {choice['f1_argmax']} | {'yes' if f1_agrees(choice) else 'no'} | "
                     f"{reason} |")
    return "\n".join(lines)


def build_graph(deps: Deps, checkpointer=None):
    runner, space = deps.runner, deps.space
    labels = list(runner.groups.labels)
    backfilled: set[str] = set()  # studies this process has already reconciled with MLflow

    def study_for(settings, group: str, pipeline: str):
        context = StudyContext(settings["dataset"], settings["groups"], group, pipeline, settings["objective"],
                               settings["seed"], settings["budget"], "llm", settings.get("max_latency_ms"))
        return open_study(settings["storage"], f"{settings['session']}-{group}", context)

    def execute(settings, group: str, pipeline: str, proposal_id: str, params: dict, tuner: str, rationale: str) -> dict:
        """Run a proposal exactly once: a finished trial with its id is reused, a queued one is run."""
        from optuna.trial import TrialState

        study = study_for(settings, group, pipeline)
        reclaim_orphans(study)
        # Gaps come only from an earlier process's crash: reconcile once per study and process.
        if study.study_name not in backfilled:
            log_unlogged(study, deps.session)
            backfilled.add(study.study_name)
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("proposal_id") == proposal_id]
        done = [t for t in mine if t.state == TrialState.COMPLETE]
        if not done:
            if not any(t.state == TrialState.WAITING for t in mine):
                enqueue(study, params, tuner, rationale or None, proposal_id)
            run_next(study, runner, space, deps.session)
            done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get("proposal_id") == proposal_id]
        return _record(done[0], group, settings["objective"])

    def log_once(result, tuner: str, key: str, **tags) -> None:
        """A run the ledger does not hold (select, evaluate_group) as a nested MLflow run, once:
        a node re-run after a crash finds the run it logged by its key."""
        session = deps.session
        if session is None or session.client.search_runs(
                [session.experiment_id], f"tags.mlflow.parentRunId = '{session.run_id}' AND tags.run_key = {filter_value(key)}", max_results=1):
            return
        session.log_trial(result, None, tuner, None, extra_tags={"run_key": key, **tags}, run_name=key)

    def select(state: State) -> dict:
        settings = state["settings"]
        table: dict = {}
        for pipeline in PIPELINES:
            for group in labels:
                spec = TrialSpec(settings["dataset"], settings["groups"], group, pipeline, space.defaults(pipeline),
                                 settings["seed"], settings["objective"])
                result = runner.run(spec)
                log_once(result, "default", f"select-{group}-{pipeline}", phase="select")
                top_n = space.defaults(pipeline)["top_n"]
                table.setdefault(group, {})[pipeline] = _metrics_row(result.metrics[group], result.spec.objective, top_n) | {
                    "objective": round(result.objective, 5)}
            deps.echo(f"[select] {pipeline}: default configuration evaluated on {len(labels)} groups")
        return {"table": table, "phase": "select", "started_at": time.time()}

    def pick(state: State) -> dict:
        settings, table = state["settings"], state["table"]
        rows = ["| group | pipeline | " + " | ".join(next(iter(next(iter(table.values())).values()))) + " |"]
        rows.append("|" + "---|" * (len(rows[0].split("|")) - 2))
        for group, pipelines in table.items():
            for pipeline, metrics in pipelines.items():
                rows.append(f"| {group} | {pipeline} | " + " | ".join(f"{v:.5f}" for v in metrics.values()) + " |")
        prompt = render("select", dataset=settings["dataset"], objective=settings["objective"], table="\n".join(rows),
                        groups=", ".join(labels), pipelines=", ".join(PIPELINES))
        llm = deps.llm.bind_tools([select_tool(labels)])
        feedback, picked, calls, usage = "", {}, 0, state.get("usage")
        from langchain_core.messages import HumanMessage

        for _ in range(SELECT_ATTEMPTS):
            calls += 1
            refused = "\n" + render("select_refused", problems=feedback) if feedback else ""
            reply, usage = _call_llm(llm, [HumanMessage(prompt + refused)], usage)
            picked, feedback = read_select_call(reply, labels)
            if picked:
                break
        selection = {}
        for group in labels:
            argmax = max(table[group], key=lambda p: table[group][p]["objective"])
            f1 = {p: m.get(f"f1@{space.defaults(p)['top_n']}") for p, m in table[group].items()}
            f1_argmax = max(f1, key=lambda p: f1[p] or 0.0)
            choice = picked.get(group) or {"pipeline": argmax, "reason": f"fallback to the best objective: the LLM failed ({feedback})"}
            selection[group] = {**choice, "argmax": argmax, "agrees": choice["pipeline"] == argmax, "llm": bool(picked),
                                "f1_argmax": f1_argmax, "f1_agrees": choice["pipeline"] == f1_argmax}
        deps.echo("[pick] " + "; ".join(f"{g}: {s['pipeline']}{'' if s['agrees'] else ' (argmax ' + s['argmax'] + ')'}"
                                         for g, s in selection.items()))
        if deps.session is not None:
            deps.session.log_session_artifact("\n".join(rows) + "\n\n" + selection_table(selection, settings["objective"]),
                                              "selection.md")
            # Tags, not params: a pick re-run after a crash may choose otherwise, and params cannot change.
            deps.session.log_session_tags({f"select/{metric_name(g)}/{name}": value for g, s in selection.items() for name, value in (
                ("pipeline", s["pipeline"]), ("chosen_by", "llm" if s["llm"] else "fallback"), ("objective_argmax", s["argmax"]),
                ("agrees_objective", s["agrees"]), ("f1_argmax", s["f1_argmax"]), ("agrees_f1", s["f1_agrees"]))})
        return {"selection": selection, "queue": list(labels), "phase": "tune", "history": {}, "finished": {},
                "llm_calls": {"select": calls}, "invalid_calls": {}, "usage": usage}

    def start_group(state: State) -> dict:
        settings = state["settings"]
        group, queue = state["queue"][0], state["queue"][1:]
        pipeline = state["selection"][group]["pipeline"]
        default = execute(settings, group, pipeline, f"{group}-default", space.defaults(pipeline), "default", "")
        deps.echo(f"[tune] group {group} ({pipeline}): default {settings['objective']} = {default['objective']:.5f}")
        return {"group": group, "queue": queue, "history": {**state["history"], group: [default]}, "feedback": "",
                "pending": None}

    def decide(state: State) -> Command[Literal["approve", "decide", "next_group"]]:
        settings, group = state["settings"], state["group"]
        pipeline = state["selection"][group]["pipeline"]
        history = state["history"][group]
        calls = state["llm_calls"].get(group, 0)
        if len(history) >= settings["budget"]:
            return Command(goto="next_group", update={"finished": {**state["finished"], group: "budget"}})
        if calls >= settings["max_llm_calls"]:
            return Command(goto="next_group", update={"finished": {**state["finished"], group: "llm-call budget"}})
        if settings.get("max_minutes") is not None and time.time() - state["started_at"] > 60 * settings["max_minutes"]:
            return Command(goto="next_group", update={"finished": {**state["finished"], group: "wall-time budget"}})
        best = best_record(history)
        defaults = space.defaults(pipeline)
        from langchain_core.messages import HumanMessage, SystemMessage

        # Sessions checkpointed before the setting existed could always finish.
        may_finish = settings.get("may_finish", True)
        messages = [
            SystemMessage(render("tune_system", pipeline=pipeline, group=group, dataset=settings["dataset"],
                                 objective=settings["objective"], budget=settings["budget"], space=space.describe(pipeline),
                                 latency=_fragment("tune_latency", max_latency_ms=f"{settings['max_latency_ms']:g}")
                                 if settings.get("max_latency_ms") is not None else "",
                                 finish=render("tune_finish" if may_finish else "tune_full_budget", budget=settings["budget"]))),
            HumanMessage(render("tune_turn", group=group, used=len(history), budget=settings["budget"],
                                history=history_table(history, defaults, settings["objective"]), best_trial=best["trial"],
                                objective=settings["objective"], best_value=f"{best['objective']:.5f}",
                                best_params=json_compact(best["params"]),
                                feedback="\n" + render("tune_feedback", feedback=state["feedback"]) if state.get("feedback") else "")),
        ]
        tools = tune_tools(space, pipeline, labels, free=not state.get("free_call"), may_finish=may_finish)
        model = deps.llm.bind_tools(tools)
        streak = state.get("refused_in_row", 0)
        if streak:
            # Greedy decoding repeats a refused call word for word: sample more freely after each refusal.
            model = model.bind(temperature=min(1.0, 0.3 * streak))
        reply, usage = _call_llm(model, messages, state.get("usage"))
        tried = {canonical(r["params"]): r["trial"] for r in history}
        decision = read_tune_call(reply, space, pipeline, best["params"], tried, labels, may_finish)
        update = {"llm_calls": {**state["llm_calls"], group: calls + 1}, "feedback": "", "usage": usage,
                  "free_call": decision.kind in ("get_history", "evaluate_group"),
                  "refused_in_row": streak + 1 if decision.kind == "invalid" else 0}
        if decision.kind == "invalid":
            deps.echo(f"[tune] {group}: refused call — {decision.message.splitlines()[0]}")
            invalid = state["invalid_calls"]
            return Command(goto="decide", update={**update, "feedback": decision.message,
                                                   "invalid_calls": {**invalid, group: invalid.get(group, 0) + 1}})
        if decision.kind == "finish":
            deps.echo(f"[tune] {group}: the LLM finished — {decision.rationale}")
            return Command(goto="next_group", update={**update, "finished": {**state["finished"], group: f"finish: {decision.rationale}"}})
        next_move = _fragment("tune_next" if may_finish else "tune_next_full_budget")
        if decision.kind == "get_history":
            deps.echo(f"[tune] {group}: the LLM read the history")
            return Command(goto="decide", update={**update, "feedback": decision.message + _fragment(
                "tune_history", history=history_table(history, defaults, settings["objective"]), next=next_move)})
        if decision.kind == "evaluate_group":
            spec = TrialSpec(settings["dataset"], settings["groups"], decision.group, pipeline, best["params"], settings["seed"], settings["objective"])
            result = runner.run(spec)
            # The configuration is the current best, so whoever chose that (default or llm) is its tuner.
            log_once(result, best["tuner"], f"evaluate-{group}-{calls + 1}", phase="evaluate_group", best_of=group)
            row = _metrics_row(result.metrics[decision.group], settings["objective"], best["params"]["top_n"])
            deps.echo(f"[tune] {group}: the LLM looked at group {decision.group}")
            return Command(goto="decide", update={**update, "feedback": decision.message + _fragment(
                "tune_evaluate_group", group=decision.group, metrics=json_compact(row), next=next_move)})
        proposal = {"id": f"{group}-{calls + 1}", "tool": "propose_change", "params": decision.params,
                    "changes": decision.changes, "rationale": decision.rationale}
        return Command(goto="approve", update={**update, "pending": proposal, "approval_error": "",
                                                "feedback": decision.message})

    def approve(state: State) -> Command[Literal["run_trial", "decide", "approve"]]:
        settings, group, proposal = state["settings"], state["group"], state["pending"]
        if settings["approve"] == "auto":
            return Command(goto="run_trial")
        history = state["history"][group]
        best = best_record(history)
        answer = interrupt({
            "group": group, "pipeline": state["selection"][group]["pipeline"], "trial": f"{len(history) + 1}/{settings['budget']}",
            "changes": proposal["changes"], "diff": {k: [best["params"].get(k), v] for k, v in proposal["changes"].items()},
            "rationale": proposal["rationale"], "best": {"trial": best["trial"], "objective": best["objective"]},
            "error": state.get("approval_error", ""),
        })
        action = (answer or {}).get("action") if isinstance(answer, dict) else None
        if action == "approve":
            return Command(goto="run_trial", update={"approval_error": ""})
        if action == "reject":
            comment = str(answer.get("comment") or "no reason given")
            deps.echo(f"[approve] {group}: rejected — {comment}")
            return Command(goto="decide", update={"pending": None, "approval_error": "", "feedback": _fragment(
                "tune_rejected", changes=json_compact(proposal["changes"]), comment=comment)})
        if action == "edit":
            pipeline = state["selection"][group]["pipeline"]
            tried = {canonical(r["params"]): r["trial"] for r in history}
            if not isinstance(answer.get("changes"), dict) or not answer["changes"]:
                # Else an empty edit would run the proposal as if a person had changed it.
                return Command(goto="approve", update={"approval_error": "an edit needs at least one NAME=VALUE"})
            try:
                params = space.validate(pipeline, answer["changes"], base=proposal["params"])
            except RectuneError as error:
                return Command(goto="approve", update={"approval_error": f"the edit was refused: {error}"})
            if canonical(params) in tried:
                return Command(goto="approve", update={"approval_error": f"the edited configuration is trial {tried[canonical(params)]}"})
            edited = {**proposal, "params": params, "changes": {k: v for k, v in params.items() if best["params"].get(k) != v},
                      "rationale": proposal["rationale"] + f" [edited by a person: {json_compact(answer.get('changes') or {})}]"}
            return Command(goto="run_trial", update={"pending": edited, "approval_error": ""})
        return Command(goto="approve", update={"approval_error": f"answer with approve, edit or reject, not {answer!r}"})

    def run_trial(state: State) -> Command[Literal["decide"]]:
        settings, group, proposal = state["settings"], state["group"], state["pending"]
        pipeline = state["selection"][group]["pipeline"]
        record = execute(settings, group, pipeline, proposal["id"], proposal["params"], "llm", proposal["rationale"])
        history = [*state["history"][group], record]
        best = best_record(history)
        deps.echo(f"[tune] {group}: trial {len(history)}/{settings['budget']} {json_compact(proposal['changes'])} → "
                  f"{settings['objective']} {record['objective']:.5f} (best {best['objective']:.5f})")
        return Command(goto="decide", update={"history": {**state["history"], group: history}, "pending": None,
                                               "feedback": (state.get("feedback") or "") + _fragment(
                                                   "tune_trial_ran", trial=record["trial"], objective=settings["objective"],
                                                   value=f"{record['objective']:.5f}")})

    def next_group(state: State) -> Command[Literal["start_group", "report"]]:
        return Command(goto="start_group" if state["queue"] else "report")

    def report(state: State) -> dict:
        settings = state["settings"]
        rows, lines = [], []
        for group in labels:
            pipeline = state["selection"][group]["pipeline"]
            history = state["history"][group]
            best = best_record(history)
            results = {}
            for label, params in (("default", space.defaults(pipeline)), ("tuned", best["params"])):
                spec = TrialSpec(settings["dataset"], settings["groups"], group, pipeline, params, settings["seed"], settings["objective"])
                results[label] = runner.run(spec, report_test=True).test_metrics[group]
            # @20 is computed for every configuration, whatever its TopN: compare there.
            names = list(dict.fromkeys([settings["objective"], "recall@20", "ndcg@20", "precision@20", "hitrate@20"]))
            for name in names:
                before, after = results["default"].get(name, float("nan")), results["tuned"].get(name, float("nan"))
                rows.append(f"| {group} | {pipeline} | {name} | {before:.5f} | {after:.5f} | {after - before:+.5f} |")
            lines.append(f"- **{group}**: {pipeline} ({state['selection'][group]['reason']}); best trial {best['trial']} of "
                         f"{len(history)} ({json_compact({k: v for k, v in best['params'].items() if space.defaults(pipeline).get(k) != v}) or 'the default'}); "
                         f"stopped by {state['finished'].get(group, '?')}")
        text = "\n".join([
            f"# rectune session {settings['session']}", "",
            f"Dataset {settings['dataset']}, groups {settings['groups']}, objective {settings['objective']} (tuned on validation), "
            f"budget {settings['budget']} trials per group, seed {settings['seed']}, approval {settings['approve']}.", "",
            "## Model selection (validation, default configurations)", "",
            selection_table(state["selection"], settings["objective"]), "",
            "## Pipelines and tuning", "", *lines, "",
            "## Test split: default vs tuned configuration", "",
            "| group | pipeline | metric | default | tuned | change |", "|---|---|---|---|---|---|", *rows, "",
            _usage_line(state),
        ])
        deps.report_dir.mkdir(parents=True, exist_ok=True)
        path = deps.report_dir / f"{settings['session']}.md"
        path.write_text(text + "\n")
        if deps.session is not None:
            deps.session.log_session_artifact(text, "report.md")
        deps.echo(f"[report] {path}")
        return {"report": str(path), "phase": "done"}

    builder = StateGraph(State)
    for node in (select, pick, start_group, decide, approve, run_trial, next_group, report):
        builder.add_node(node.__name__, node)
    builder.add_edge(START, "select")      # evaluate every pipeline's default on every group
    builder.add_edge("select", "pick")     # the LLM picks a pipeline per group
    builder.add_edge("pick", "start_group")
    builder.add_edge("start_group", "decide")  # then decide ⇄ approve → run_trial, routed by Command
    builder.add_edge("report", END)
    return builder.compile(checkpointer=checkpointer)
