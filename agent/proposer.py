"""The LLM agent as a proposer (tools/proposer.py): one propose() = LLM turns until a call decides.

Each turn shows the LLM the group's whole history (rejected proposals included) and
offers the tools of agent/llm_tools.py. A refused call is answered on the next turn with
why, sampling more freely after each refusal in a row; a free tool is answered and the
next turn must decide. After `max_calls` turns without a decision the proposal falls
back to an untried neighbour of the best trial (the `local` proposer), never a repeat.
Everything a turn depends on is in the history, so the same history gives the same turns.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rectune.agent.llm import TEXT_REPLY_LIMIT, answered_in_text, bind_decision_tools, invoke, text_replies_stop
from rectune.agent.llm_tools import TOOLS, Scope, read_tune_call, tune_tools, unreadable_reply
from rectune.agent.prompts import render
from rectune.agent.report import best_record, history_table, json_compact
from rectune.models.errors import RectuneError
from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.proposers import register
from rectune.tools.trial import canonical

REFUSAL_STEP = 0.3
"""Temperature added per refused call in a row: greedy decoding repeats a refused call word for word."""


def call_llm(llm, messages, usage: dict | None) -> tuple[object, dict]:
    """The reply, and `usage` with this call's seconds and tokens added. An endpoint's failure
    raises `LLMUnavailable` (agent/llm.py), one scrubbed line saying what to do."""
    import pydantic

    start = time.perf_counter()
    try:
        reply = invoke(llm, messages)
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


def fragment(name: str, **values) -> str:
    """A prompt file filled in, without its final newline: it goes inside other text."""
    return render(name, **values).rstrip("\n")


def tried(history) -> dict[str, str]:
    """Canonical configuration → what became of it, for every configuration in the history."""
    return {canonical(r.params): (f"rejected by a person ({r.comment})" if r.state == "rejected" else f"tried as trial {r.number}")
            for r in history}


class LLMProposer(Proposer):
    """The LLM's next proposal for one group, or its Finish.

    `last` holds what the latest propose() cost (calls, refused calls, seconds, tokens),
    for the graph's budgets and the report; `finished`, why it finished the group."""

    name = "llm"

    def __init__(self, seed: int = 0, *, llm, groups: list[str], may_finish: bool = True, max_calls: int = 30,
                 call_budget: int | None = None, evaluate: Callable[[str, object, str], dict] | None = None, echo=None):
        self.seed, self.llm, self.groups, self.may_finish = seed, llm, list(groups), may_finish
        # LLM calls per propose(), and over the whole study (counted from the history's meta, so
        # a resumed study keeps its count); the graph keeps its own count per group instead.
        self.max_calls, self.call_budget = max_calls, call_budget
        self.evaluate, self.echo = evaluate, echo or (lambda line: None)
        self.last: dict = {}
        self.finished = ""

    def propose(self, history, context: ProposerContext) -> Proposal | Finish:
        if best_record(history) is None:
            # Every change is described against the best trial: without one there is nothing to tune from.
            failed = next((r.error for r in history if r.state == "failed"), "")
            outcome = Finish(f"no trial has produced a number yet{f' (trial 0: {failed})' if failed else ''}")
        else:
            outcome = self._turns(history, context)
        if isinstance(outcome, Finish):
            self.finished = outcome.reason
        return outcome

    def _turns(self, history, context: ProposerContext) -> Proposal | Finish:
        study, best = context.study, best_record(history)
        scope = Scope(context.space, study.pipeline, best.params, tried(history), self.groups, self.may_finish)
        desk = _Desk(self, history, context, best)
        feedback, usage, in_row, refusals, free_used, refused = self._opening(history, context, best), {}, 0, 0, False, ""
        in_text = 0
        self.last, limit = {"calls": 0, "refused": 0}, self.max_calls
        if self.call_budget is not None:
            limit = min(limit, self.call_budget - sum(r.meta.get("calls", 0) for r in history if r.tuner == self.name))
            if limit <= 0:
                return Finish(f"the LLM-call budget of {self.call_budget} is spent")
        for turn in range(1, limit + 1):
            model = bind_decision_tools(self.llm, tune_tools(scope, free=not free_used))
            if in_row:
                model = model.bind(temperature=min(1.0, REFUSAL_STEP * in_row))
            desk.turn = turn
            reply, usage = call_llm(model, self._messages(history, context, best, feedback), usage)
            # An endpoint that keeps answering in text makes no tool calls at all: stop resumably
            # rather than report a session that tuned nothing.
            in_text = in_text + 1 if answered_in_text(reply) else 0
            if in_text >= TEXT_REPLY_LIMIT:
                raise text_replies_stop(in_text)
            decision = read_tune_call(reply, scope, free=not free_used)
            self.last = {"calls": turn, "refused": refusals + (decision.kind == "invalid"), "llm_seconds": usage["seconds"],
                         "input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"]}
            if decision.kind == "invalid":
                in_row, refusals, feedback = in_row + 1, refusals + 1, decision.message
                refused = decision.message
                self.echo(f"[tune] {study.group}: refused call — " + "\n    ".join(decision.message.splitlines()))
                continue
            outcome = TOOLS[decision.kind].handle(decision, desk)
            if not isinstance(outcome, str):
                return outcome
            in_row, free_used, feedback = 0, True, outcome
        return self._fallback(history, context, refused, limit)

    def _opening(self, history, context: ProposerContext, best) -> str:
        """What the first turn is told besides the history: a person's rejection of the last
        proposal, or how its trial went (after the note that only the first of several calls was used)."""
        last = history[-1]
        if last.state == "rejected":
            changes = {k: v for k, v in last.params.items() if best.params.get(k) != v}
            return fragment("tune_rejected", changes=json_compact(changes), comment=last.comment)
        if last.tuner != self.name or last.objective is None:
            return ""
        return last.meta.get("note", "") + fragment("tune_trial_ran", trial=last.number, objective=context.study.objective,
                                                    value=f"{last.objective:.5f}")

    def _messages(self, history, context: ProposerContext, best, feedback: str) -> list:
        from langchain_core.messages import HumanMessage, SystemMessage

        study, space = context.study, context.space
        latency = "" if study.max_latency_ms is None else fragment("tune_latency", max_latency_ms=f"{study.max_latency_ms:g}")
        system = render("tune_system", pipeline=study.pipeline, group=study.group, dataset=study.dataset,
                        objective=study.objective, budget=context.budget, space=space.describe(study.pipeline), latency=latency,
                        finish=render("tune_finish" if self.may_finish else "tune_full_budget", budget=context.budget))
        turn = render("tune_turn", group=study.group, used=sum(1 for r in history if r.state in ("complete", "failed")),
                      budget=context.budget, history=history_table(history, space.defaults(study.pipeline), study.objective),
                      best_trial=best.number, objective=study.objective, best_value=f"{best.objective:.5f}",
                      best_params=json_compact(best.params),
                      feedback="\n" + render("tune_feedback", feedback=feedback) if feedback else "")
        return [SystemMessage(system), HumanMessage(turn)]

    def _fallback(self, history, context: ProposerContext, refused: str, calls: int) -> Proposal | Finish:
        """After `calls` turns without a decision: an untried neighbour of the best, by the
        `local` proposer, so the trial is spent soundly and never on a repeat."""
        from rectune.tools.proposers import make_proposer

        why = f"the LLM made no decision in {calls} calls" + (f" (last refusal: {' '.join(refused.split())[:200]})" if refused else "")
        local = make_proposer("local", seed=self.seed).propose(history, context)
        if isinstance(local, Finish):
            return Finish(f"{why}; and {local.reason}")
        self.echo(f"[tune] {context.study.group}: {why}; falling back to {local.rationale}")
        return Proposal(local.params, self.name, f"fallback: {why}; {local.rationale}", meta={**self.last, "fallback": True})


class _Desk:
    """What the tools' handlers (agent/llm_tools.py) reach during one propose() call."""

    def __init__(self, proposer: LLMProposer, history, context: ProposerContext, best):
        self.proposer, self.history, self.context, self.best, self.turn = proposer, history, context, best, 0

    def history_text(self) -> str:
        study = self.context.study
        return history_table(self.history, self.context.space.defaults(study.pipeline), study.objective)

    def evaluate(self, group: str) -> dict:
        if self.proposer.evaluate is None:
            raise RectuneError("evaluate_group needs an evaluator (LLMProposer(evaluate=...))")
        # The key makes the logged run findable again when the node is re-run after a crash.
        return self.proposer.evaluate(group, self.best, f"{self.context.study.group}-{len(self.history)}-{self.turn}")

    def answer(self, prompt: str, **values) -> str:
        next_move = fragment("tune_next" if self.proposer.may_finish else "tune_next_full_budget")
        return fragment(prompt, **values, next=next_move)

    def proposal(self, decision) -> Proposal:
        return Proposal(decision.params, self.proposer.name, decision.rationale,
                        meta={**self.proposer.last, "note": decision.message})


# "llm" is a tuner like the others from here on (`tools.proposers.make_proposer("llm", llm=…, groups=…)`);
# it needs its endpoint, so `rectune worker` only runs the proposals it queued.
register("llm", LLMProposer, unattended=False)
