"""The LLM agent as a proposer (tools/proposer.py): one LLM call per trial, or per two.

Each call shows the LLM the group's history (rejected proposals included, each trial with
its noise band) and a menu of untried candidates (tools/proposers/menu.py). The LLM picks
a candidate — and optionally a second one to run after it, without another call: the second
is kept in the first trial's meta, so the history alone says what runs next — proposes its
own change of the best, or finishes. A reply that cannot be used
— text, a broken call, a repeat, a value out of range — runs the menu's first candidate
instead, at no extra call, and the next prompt says why: no trial is ever spent on a
repeated configuration, and no call on asking again. Everything a call depends on is in the history, so the
same history gives the same call — measured latencies, which differ from run to run, are shown
only under a latency budget, so a seed repeats its calls; the system message and the tools depend on the pipeline
alone and the history only grows at its end, so an endpoint that caches prompt prefixes
(the embedded llama.cpp server, vLLM, DeepSeek) re-reads only the new rows.
"""

from __future__ import annotations

import time

from rectune.agent.llm import TEXT_REPLY_LIMIT, answered_in_text, bind_decision_tools, invoke, text_replies_stop
from rectune.agent.llm_tools import LETTERS, Scope, read_tune_call, tune_tools, unreadable_reply
from rectune.agent.prompts import render
from rectune.agent.report import history_table, json_compact
from rectune.models.pipeline import PIPELINES
from rectune.tools.adoption import best_record
from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.proposers import register
from rectune.tools.proposers.menu import STUCK, Candidate, menu
from rectune.tools.trial import FINISHED, canonical, changed, spent, tried


def call_llm(llm, messages, usage: dict | None) -> tuple[object, dict]:
    """The reply, and `usage` with this call's seconds and tokens added. An endpoint's failure
    raises `LLMUnavailable` (agent/llm.py), one scrubbed line saying what to do."""
    import pydantic

    start = time.perf_counter()
    try:
        reply = invoke(llm, messages)
    except pydantic.ValidationError as error:
        # A malformed reply is the LLM's mistake: read as an invalid call like any other.
        reply = unreadable_reply(error)
        if reply is None:
            raise
    tokens = getattr(reply, "usage_metadata", None) or {}
    cached = (tokens.get("input_token_details") or {}).get("cache_read", 0)
    usage = dict(usage or {})
    for name, value in (("calls", 1), ("seconds", time.perf_counter() - start), ("input_tokens", tokens.get("input_tokens", 0)),
                        ("cached_tokens", cached), ("output_tokens", tokens.get("output_tokens", 0))):
        usage[name] = usage.get(name, 0) + value
    return reply, usage


def fragment(name: str, **values) -> str:
    """A prompt file filled in, without its final newline: it goes inside other text."""
    return render(name, **values).rstrip("\n")


class LLMProposer(Proposer):
    """The LLM's next proposal for one group, or its Finish.

    `last` holds what the latest propose() cost (calls, unusable replies, seconds, tokens),
    for the graph's budgets and the report; `finished`, why it finished the group."""

    name = "llm"

    def __init__(self, seed: int = 0, *, llm, may_finish: bool = True, echo=None):
        self.seed, self.llm, self.may_finish = seed, llm, may_finish
        self.echo = echo or (lambda line: None)
        self.last: dict = {}
        self.finished = ""

    def propose(self, history, context: ProposerContext) -> Proposal | Finish:
        self.last = {"calls": 0, "refused": 0}
        if best_record(history) is None:
            # Every change is described against the best trial: without one there is nothing to tune from.
            failed = next((r.error for r in history if r.state == "failed"), "")
            outcome = Finish(f"no trial has produced a number yet{f' (trial 0: {failed})' if failed else ''}")
        else:
            outcome = self._second_of_pair(history) or self._call(history, context)
        if isinstance(outcome, Finish):
            self.finished = outcome.reason
        return outcome

    def _call(self, history, context: ProposerContext) -> Proposal | Finish:
        study, best = context.study, best_record(history)
        options = menu(history, context, self.seed)[:len(LETTERS)]
        scope = Scope(context.space, study.pipeline, study.objective, best.params, tried(history), options, self.may_finish)
        reply, usage = call_llm(bind_decision_tools(self.llm, tune_tools(scope)), self._messages(history, context, best, options), None)
        decision = read_tune_call(reply, scope)
        in_text = answered_in_text(reply)
        self.last = {"calls": 1, "refused": int(decision.kind == "invalid"), "llm_seconds": usage["seconds"],
                     "input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                     "cached_tokens": usage.get("cached_tokens", 0), "in_text": in_text}
        if in_text and _text_replies(history, self.name) + 1 >= TEXT_REPLY_LIMIT:
            # An endpoint that keeps answering in text makes no tool calls at all: stop resumably
            # rather than report a session that tuned nothing.
            raise text_replies_stop(TEXT_REPLY_LIMIT)
        if decision.kind == "finish":
            return Finish(decision.rationale)
        if decision.kind == "choose":
            chosen = options[decision.candidate]
            then = {} if decision.then is None else {"then": {
                "params": options[decision.then].params, "candidate": LETTERS[decision.then], "source": options[decision.then].source}}
            return Proposal(decision.params, self.name, decision.rationale, meta={
                **self.last, "candidate": LETTERS[decision.candidate], "source": chosen.source, "note": decision.message, **then})
        if decision.kind == "propose_change":
            return Proposal(decision.params, self.name, decision.rationale, meta={**self.last, "source": "own", "note": decision.message})
        return self._fallback(history, context, options, decision.message)

    def _second_of_pair(self, history) -> Proposal | None:
        """The candidate the LLM chose to run after the latest trial, when that trial ran as it chose
        (a person's rejection or edit, told to the LLM, asks it again) and nothing has tried it since."""
        last = history[-1]
        then = last.meta.get("then") if last.tuner == self.name and last.state in FINISHED else None
        if not then or canonical(then["params"]) in tried(history):
            return None
        return Proposal(then["params"], self.name, f"second of the pair chosen with trial {last.number}: {last.rationale}",
                        meta={"calls": 0, "refused": 0, "candidate": then["candidate"], "source": then["source"],
                              "paired_with": last.number})

    def warm(self, context: ProposerContext) -> float:
        """Have the endpoint read the prefix every call of this pipeline shares — the system message
        and the tools, ~900 tokens, a cold ~30 s on 2 cores — so the first call finds it cached.
        Decides nothing; returns its seconds."""
        from langchain_core.messages import HumanMessage, SystemMessage

        defaults = context.space.defaults(context.study.pipeline)
        # A one-candidate menu: the tools a call with a menu sees (the schema names no candidate).
        scope = Scope(context.space, context.study.pipeline, context.study.objective, defaults, {},
                      [Candidate(defaults, "neighbour", {})], self.may_finish)
        start = time.perf_counter()
        invoke(bind_decision_tools(self.llm, tune_tools(scope)).bind(max_tokens=1),
               [SystemMessage(self._system(context)), HumanMessage("")])
        return time.perf_counter() - start

    def _system(self, context: ProposerContext) -> str:
        study, space = context.study, context.space
        latency = "" if study.max_latency_ms is None else fragment("tune_latency", max_latency_ms=f"{study.max_latency_ms:g}")
        ranker = "\n" + fragment("tune_ranker") if PIPELINES[study.pipeline][1] != "none" else ""
        return render("tune_system", pipeline=study.pipeline, dataset=study.dataset, objective=study.objective, stuck=STUCK,
                      space=space.describe(study.pipeline, study.objective), latency=latency, ranker=ranker,
                      finish=fragment("tune_finish" if self.may_finish else "tune_full_budget"))

    def _messages(self, history, context: ProposerContext, best, options) -> list:
        from langchain_core.messages import HumanMessage, SystemMessage

        study, space = context.study, context.space
        system = self._system(context)
        lines = [f"{letter}. {candidate.describe()}" for letter, candidate in zip(LETTERS, options)]
        feedback = _feedback(history, best, self.name)
        turn = render("tune_turn", group=study.group, used=spent(history),
                      budget=context.budget, history=history_table(history, space.defaults(study.pipeline), study.objective,
                                                            latency=study.max_latency_ms is not None),
                      best_trial=best.number, objective=study.objective, best_value=f"{best.objective:.5f}",
                      menu="\n".join(lines) or "(empty: every candidate near the best is tried; propose your own change)",
                      feedback=fragment("tune_feedback", feedback=feedback) + "\n" if feedback else "")
        return [SystemMessage(system), HumanMessage(turn)]

    def _fallback(self, history, context: ProposerContext, options, why: str) -> Proposal | Finish:
        """The menu's first candidate, for a reply that cannot be used. The menu is empty only when
        TPE, too, found nothing untried: then nothing is left to run."""
        why = " ".join(why.split())
        if not options:
            return Finish(f"the LLM's reply was not used ({why}) and the menu is empty: every candidate TPE and the "
                          "neighbourhood of the best could offer is tried")
        self.echo(f"[tune] {context.study.group}: the LLM's reply was not used ({why}); candidate A runs instead")
        return Proposal(options[0].params, self.name, f"fallback to candidate A ({options[0].describe()}): {why}",
                        meta={**self.last, "fallback": why, "candidate": "A", "source": options[0].source})


def _text_replies(history, tuner: str) -> int:
    """How many of the tuner's latest proposals in a row came from text replies."""
    count = 0
    for record in reversed([r for r in history if r.tuner == tuner]):
        if not record.meta.get("in_text"):
            break
        count += 1
    return count


def _feedback(history, best, tuner: str) -> str:
    """What the call is told about the latest proposal: a person's rejection, or why the
    previous reply was not used."""
    last = history[-1]
    if last.state == "rejected":
        changes = changed(last.params, best.params)
        return fragment("tune_rejected", changes=json_compact(changes), comment=last.comment)
    if last.tuner == tuner and last.meta.get("fallback"):
        ran = "a person's edit" if last.meta.get("source") == "person" else f"candidate {last.meta.get('candidate', 'A')}"
        return f"your previous reply was not used ({last.meta['fallback']}); {ran} ran instead."
    return ""


# "llm" is a tuner like the others from here on (`tools.proposers.make_proposer("llm", llm=…)`);
# it needs its endpoint, so `rectune worker` only runs the proposals it queued.
register("llm", LLMProposer, unattended=False)
