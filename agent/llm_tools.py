"""The tools the LLM may call, as one table, and the strict reading of its calls.

Each entry of TOOLS names a tool, builds its argument schema, parses a call into a
Decision, handles a valid one and says what it costs: a free tool (`get_history`,
`evaluate_group`) is answered on the next turn, the others decide (a trial, or the end of
the group). The handlers reach the study through a `Desk` that agent/proposer.py provides;
the pick's one tool (`choose_pipelines`) is read here and handled by agent/nodes.py.

The LLM only ever proposes: every call is parsed and validated here, and a bad one —
unknown tool, arguments that are not JSON, a parameter out of range, a configuration
already tried or rejected, plain text instead of a call — becomes a precise message for
its next turn, costing no trial.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from rectune.agent.prompts import render
from rectune.agent.report import json_compact
from rectune.models.errors import InvalidProposal
from rectune.models.pipeline import PIPELINES
from rectune.tools.proposer import Finish, Proposal
from rectune.tools.space import SearchSpace
from rectune.tools.trial import canonical

_ECHO_LIMIT = 300
_NOT_AN_OBJECT = "its arguments are valid JSON but not an object"
_KINDS = {"int": "integer", "float": "number", "categorical": "string"}


@dataclass(frozen=True)
class Scope:
    """What reading one tuning call needs to know."""

    space: SearchSpace
    pipeline: str
    best: dict
    """The current best configuration: `propose_change` edits it."""
    tried: dict[str, str]
    """Canonical configuration → what became of it ("tried as trial 3", "rejected by a person (<comment>)")."""
    groups: list[str]
    may_finish: bool = True


@dataclass
class Decision:
    """What one LLM turn amounts to after checking."""

    kind: str
    """A tool's name (propose_change, train_model, evaluate_group, get_history, finish), or `invalid`."""
    params: dict = field(default_factory=dict)
    changes: dict = field(default_factory=dict)
    rationale: str = ""
    group: str = ""
    message: str = ""
    """For `invalid`: what to tell the LLM; for others: a note such as 'only the first call was used'."""


@dataclass(frozen=True)
class LLMTool:
    """One row of the table: a tool the LLM may call while tuning a group."""

    name: str
    arguments: Callable[[Scope], tuple[dict, list[str]]]
    """Its JSON-schema properties and required names."""
    parse: Callable[[str, dict, Scope, str], Decision]
    """(name, arguments, scope, note) → Decision; the note is prefixed to any refusal."""
    handle: Callable[[Decision, "Desk"], "str | Proposal | Finish"]
    """What a valid call does: the answer for the next turn (free tools), a Proposal or a Finish."""
    free: bool
    """Costs no trial: answered on the next turn, which then offers only tools that decide."""

    def schema(self, scope: Scope) -> dict:
        properties, required = self.arguments(scope)
        return _function(self.name, properties, required)


class Desk(Protocol):
    """What a tool's handler may use; agent/proposer.py provides it for one propose() call."""

    def history_text(self) -> str:
        """The history table."""

    def evaluate(self, group: str) -> dict:
        """Metrics of the current best configuration on another group."""

    def answer(self, prompt: str, **values) -> str:
        """A free tool's answer: the prompt file filled in, with the request to decide next."""

    def proposal(self, decision: Decision) -> "Proposal":
        """The trial a deciding call asks for."""


def _values(scope: Scope) -> dict:
    properties = {p.name: {"type": _KINDS[p.type] if not p.choices or isinstance(p.choices[0], str) else "integer",
                           "description": p.help} for p in scope.space.parameters_for(scope.pipeline)}
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _parse_trial(name: str, args: dict, scope: Scope, note: str) -> Decision:
    """propose_change (edits the best) and train_model (a configuration in full)."""
    key = "changes" if name == "propose_change" else "params"
    values, rationale = args.get(key), args.get("rationale")
    problems = []
    if not isinstance(values, dict) or not values:
        problems.append(f"{key} must be a non-empty object of parameter: value, but got {_echo(values)!r}")
    if not isinstance(rationale, str) or not rationale.strip():
        problems.append("rationale must be a non-empty string saying why this should help")
    if problems:
        return Decision("invalid", message=f"{note}Your {name} was not run (no trial used):\n- " + "\n- ".join(problems))
    try:
        params = scope.space.validate(scope.pipeline, values, base=scope.best if name == "propose_change" else None)
    except InvalidProposal as error:
        return Decision("invalid", message=f"{note}Your {name} was not run (no trial used):\n- " + "\n- ".join(error.problems))
    previous = scope.tried.get(canonical(params))
    if previous is not None:
        others = [p.name for p in scope.space.parameters_for(scope.pipeline) if p.name not in values][:6]
        hint = f"another value, or another parameter such as {', '.join(others)}" if others else "other values"
        return Decision("invalid", message=f"{note}That configuration was already {previous}; "
                                           f"propose one that differs from every row of the history — {hint}.")
    changes = {k: v for k, v in params.items() if scope.best.get(k) != v}
    return Decision(name, params=params, changes=changes, rationale=rationale.strip(), message=note)


def _parse_evaluate_group(name: str, args: dict, scope: Scope, note: str) -> Decision:
    group = args.get("group")
    if group not in scope.groups:
        return Decision("invalid", message=f"{note}evaluate_group needs a group among {scope.groups}, but got {_echo(group)!r}.")
    return Decision(name, group=group, message=note)


def _parse_get_history(name: str, args: dict, scope: Scope, note: str) -> Decision:
    return Decision(name, message=note)


def _parse_finish(name: str, args: dict, scope: Scope, note: str) -> Decision:
    if not scope.may_finish:
        return Decision("invalid", message=f"{note}This session runs its whole budget: finish is not available. "
                                           "Propose a change (changing only k or top_n is cheap).")
    reason = args.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return Decision("invalid", message=f"{note}finish needs a reason (a non-empty string saying why more trials "
                                           f"will not help), but got {_echo(reason)!r}; the group goes on.")
    return Decision(name, rationale=reason.strip(), message=note)


TOOLS: dict[str, LLMTool] = {tool.name: tool for tool in (
    LLMTool("propose_change", lambda s: ({"changes": _values(s), "rationale": {"type": "string"}}, ["changes", "rationale"]),
            _parse_trial, lambda d, desk: desk.proposal(d), free=False),
    LLMTool("train_model", lambda s: ({"params": _values(s), "rationale": {"type": "string"}}, ["params", "rationale"]),
            _parse_trial, lambda d, desk: desk.proposal(d), free=False),
    LLMTool("evaluate_group", lambda s: ({"group": {"type": "string", "enum": s.groups}}, ["group"]), _parse_evaluate_group,
            lambda d, desk: d.message + desk.answer("tune_evaluate_group", group=d.group,
                                                    metrics=json_compact(desk.evaluate(d.group))), free=True),
    LLMTool("get_history", lambda s: ({}, []), _parse_get_history,
            lambda d, desk: d.message + desk.answer("tune_history", history=desk.history_text()), free=True),
    LLMTool("finish", lambda s: ({"reason": {"type": "string"}}, ["reason"]), _parse_finish,
            lambda d, desk: Finish(d.rationale), free=False),
)}
"""The tuning tools, in the order the LLM sees them."""


def offered(scope: Scope, free: bool = True) -> list[str]:
    """The tools offered on a turn; `free=False` leaves out those that cost no trial (after
    one of them the next turn must decide: small models otherwise ask for information
    forever), and a session that must use its whole budget has no `finish`."""
    return [tool.name for tool in TOOLS.values() if (free or not tool.free) and (scope.may_finish or tool.name != "finish")]


def tune_tools(scope: Scope, free: bool = True) -> list[dict]:
    return [TOOLS[name].schema(scope) for name in offered(scope, free)]


def read_tune_call(message, scope: Scope, free: bool = True) -> Decision:
    """Turn the LLM's reply into a Decision; `free` as in `offered` (a free tool called when it
    was not offered is refused, so information-only turns cannot loop)."""
    calls = list(getattr(message, "tool_calls", None) or [])
    broken = _broken_call(message)
    names = offered(scope, free)
    if not calls and broken:
        return Decision("invalid", message=broken)
    if not calls:
        return Decision("invalid", message=f"You answered with text ({_echo(message.content)!r}) instead of a tool call. "
                                           f"Reply with exactly one call of: {', '.join(names)}.")
    note = f"You made {len(calls)} calls; only the first ({calls[0]['name']}) was used. " if len(calls) > 1 else ""
    name, args = calls[0]["name"], calls[0].get("args") or {}
    if name not in TOOLS:
        return Decision("invalid", message=f"{note}There is no tool {name!r}. The tools are: {', '.join(names)}.")
    if TOOLS[name].free and not free:
        return Decision("invalid", message=f"{note}{name} is not offered on this turn: after a tool that costs no trial, "
                                           f"the next call must decide — one of {', '.join(names)}.")
    if not isinstance(args, dict):
        return Decision("invalid", message=f"{note}The arguments of {name} must be a JSON object, but got {_echo(args)!r}.")
    return TOOLS[name].parse(name, args, scope, note)


def select_tool(groups: list[str]) -> dict:
    """The one tool of the pick: a pipeline and a reason per group."""
    return _function("choose_pipelines", {
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "group": {"type": "string", "enum": groups},
            "pipeline": {"type": "string", "enum": list(PIPELINES)},
            "reason": {"type": "string"}}, "required": ["group", "pipeline", "reason"]}},
    }, ["choices"])


def read_select_call(message, groups: list[str]) -> tuple[dict[str, dict], str]:
    """The LLM's pipeline per group, or ({}, what was wrong)."""
    calls = [c for c in (getattr(message, "tool_calls", None) or []) if c["name"] == "choose_pipelines"]
    if not calls:
        broken = _broken_call(message)
        if broken:
            return {}, broken
        return {}, f"Call choose_pipelines with one choice per group; you answered {_echo(message.content or message.tool_calls)!r}."
    choices = calls[0].get("args", {}).get("choices")
    if not isinstance(choices, list):
        return {}, f"choices must be a list of {{group, pipeline, reason}}, but got {_echo(choices)!r}."
    picked, problems = {}, []
    for choice in choices:
        problem = _choice_problem(choice, groups)
        if problem:
            problems.append(problem)
        else:
            picked[choice["group"]] = {"pipeline": choice["pipeline"], "reason": choice.get("reason", "")}
    missing = [g for g in groups if g not in picked]
    if missing:
        problems.append(f"no choice for group(s) {missing}")
    return ({}, "; ".join(problems)) if problems else (picked, "")


def _choice_problem(choice, groups: list[str]) -> str:
    if not isinstance(choice, dict):
        return f"each choice must be an object, but got {_echo(choice)!r}"
    if choice.get("group") not in groups:
        return f"unknown group {_echo(choice.get('group'))!r}; groups are {groups}"
    # A string first: a list or an object is not even hashable, let alone a pipeline.
    if not isinstance(choice.get("pipeline"), str) or choice["pipeline"] not in PIPELINES:
        return f"unknown pipeline {_echo(choice.get('pipeline'))!r} for group {choice['group']!r}; pipelines are {list(PIPELINES)}"
    if not isinstance(choice.get("reason", ""), str):
        return f"the reason for group {choice['group']!r} must be a string, but got {_echo(choice['reason'])!r}"
    return ""


def _function(name: str, properties: dict, required: list[str]) -> dict:
    description = render(f"tool_{name}").strip()
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


def unreadable_reply(error):
    """The reply behind a pydantic ValidationError raised while the client built it, as an AIMessage
    whose calls are all invalid; None when the error is about something else.

    langchain parses tool-call arguments with json.loads and then insists on a dict, so
    arguments such as `[1, 2]`, `5` or `"s"` raise instead of becoming an invalid call, and the
    rest of the reply (the tool names too) is lost with them."""
    from langchain_core.messages import AIMessage

    problems = error.errors(include_url=False)
    if not problems or any(tuple(p["loc"][:1]) != ("tool_calls",) or len(p["loc"]) < 2 for p in problems):
        return None
    broken = []
    for problem in problems:
        args = json.dumps(problem.get("input"), default=str)
        broken.append({"name": None, "id": None, "type": "invalid_tool_call", "args": args,
                       "error": f"{_NOT_AN_OBJECT} ({_echo(args)}, in tool call {problem['loc'][1] + 1})"})
    return AIMessage(content="", invalid_tool_calls=broken)


def _broken_call(message) -> str | None:
    """What to tell the LLM when its client could not read its tool call (None when it could)."""
    broken = list(getattr(message, "invalid_tool_calls", None) or [])
    if not broken:
        return None
    bad = broken[0]
    error = bad.get("error") or ""
    if error.startswith(_NOT_AN_OBJECT):
        return f"Your reply was not used: {error}. Call the tool again with a JSON object as its arguments."
    return (f"Your call to {bad.get('name')!r} was not run: its arguments are not valid JSON "
            f"({_echo(error or bad.get('args'))}). Call the tool again with a JSON object.")


def _echo(text) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + f"… ({len(text)} characters)"
