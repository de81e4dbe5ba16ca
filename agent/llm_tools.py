"""The tools the LLM may call while tuning a group, as one table, and the strict reading of its calls.

One call decides each trial, or two: `choose` runs a candidate of the menu (tools/proposers/menu.py:
untried neighbours of the best, and a TPE sample once the study is stuck) and, with `then`, a
second one after it without another call; `propose_change` runs the LLM's own edit
of the best configuration, `finish` ends the group when the session allows it. No tool
only asks for information: the history and the menu are in every prompt, so no turn is
spent deciding nothing.

The LLM only ever proposes: every call is parsed and validated here, and a bad one —
unknown tool, arguments that are not JSON, a candidate not on the menu, a parameter out of
range, a configuration already tried or rejected, plain text instead of a call — becomes
a Decision of kind `invalid` whose message says why; agent/proposer.py then runs the first
candidate instead, without another call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from rectune.agent.prompts import render
from rectune.models.errors import InvalidProposal
from rectune.tools.proposers.menu import Candidate
from rectune.tools.space import SearchSpace
from rectune.tools.trial import canonical

_ECHO_LIMIT = 300
_NOT_AN_OBJECT = "its arguments are valid JSON but not an object"
_KINDS = {"int": "integer", "float": "number", "categorical": "string"}
LETTERS = "ABCD"
"""Menu positions. The choose tool always offers all of them, so its schema — and with it the
prompt prefix the endpoint keeps cached — does not change from turn to turn."""
RATIONALE_CHARACTERS = 60
"""Short rationales: every generated token costs ~0.1 s on 2 cores (the embedded model's
100-character ones were filler such as "is a neighbour of the best trial")."""


@dataclass(frozen=True)
class Scope:
    """What reading one tuning call needs to know."""

    space: SearchSpace
    pipeline: str
    objective: str
    best: dict
    """The current best configuration: `propose_change` edits it."""
    tried: dict[str, str]
    """Canonical configuration → what became of it ("tried as trial 3", "rejected by a person (<comment>)")."""
    menu: list[Candidate]
    may_finish: bool = True


@dataclass
class Decision:
    """What one LLM turn amounts to after checking."""

    kind: str
    """A tool's name (choose, propose_change, finish), or `invalid`."""
    params: dict = field(default_factory=dict)
    rationale: str = ""
    candidate: int | None = None
    """The menu position chosen (choose only)."""
    then: int | None = None
    """The menu position to run after it, without another call (choose only; optional)."""
    message: str = ""
    """For `invalid`: what was wrong; for the others: a note such as 'only the first call was read'."""


@dataclass(frozen=True)
class LLMTool:
    """One row of the table: a tool the LLM may call while tuning a group."""

    name: str
    arguments: Callable[[Scope], tuple[dict, list[str]]]
    """Its JSON-schema properties and required names."""
    parse: Callable[[dict, Scope, str], Decision]
    """(arguments, scope, note) → Decision; the note is prefixed to any refusal."""

    def schema(self, scope: Scope) -> dict:
        properties, required = self.arguments(scope)
        return function_schema(self.name, properties, required)


def _rationale() -> dict:
    return {"type": "string", "maxLength": RATIONALE_CHARACTERS}


def _values(scope: Scope) -> dict:
    # No descriptions: the system message describes every parameter once, and each repeat costs prefill.
    properties = {p.name: {"type": _KINDS[p.type] if not p.choices or isinstance(p.choices[0], str) else "integer"}
                  for p in scope.space.tunable(scope.pipeline, scope.objective)}
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _rationale_problem(args: dict) -> str:
    rationale = args.get("rationale")
    if isinstance(rationale, str) and rationale.strip():
        return ""
    return f"rationale must be a non-empty string saying why this should help, but got {shown(rationale)!r}"


def _parse_choose(args: dict, scope: Scope, note: str) -> Decision:
    letter, offered_letters = args.get("candidate"), LETTERS[:len(scope.menu)]
    if not isinstance(letter, str) or letter not in offered_letters:
        return Decision("invalid", message=f"{note}candidate must be one of {list(offered_letters)}, but got {shown(letter)!r}")
    problem = _rationale_problem(args)
    if problem:
        return Decision("invalid", message=f"{note}{problem}")
    index, then = offered_letters.index(letter), args.get("then")
    if then is not None and (then not in offered_letters or then == letter):
        # The first choice stands on its own: a bad second one only costs the call it would have saved.
        note += f"then must be another of {list(offered_letters)}, but got {shown(then)!r}: only {letter} runs. "
        then = None
    return Decision("choose", params=scope.menu[index].params, rationale=args["rationale"].strip(), candidate=index,
                    then=None if then is None else offered_letters.index(then), message=note)


def _parse_change(args: dict, scope: Scope, note: str) -> Decision:
    values = args.get("changes")
    problems = [p for p in (_rationale_problem(args),) if p]
    if not isinstance(values, dict) or not values:
        problems.append(f"changes must be a non-empty object of parameter: value, but got {shown(values)!r}")
    if not problems:
        # The schema offers only the tunable parameters, but an endpoint without constrained decoding
        # may send others: a trial that moves only those would repeat a tried trial's objective.
        tunable = [p.name for p in scope.space.tunable(scope.pipeline, scope.objective)]
        inert = [f"{name} cannot move {scope.objective} here (tunable: {', '.join(tunable)})"
                 for name in values if name not in tunable and name in scope.best]
        try:
            params = scope.space.validate(scope.pipeline, values, base=scope.best)
        except InvalidProposal as error:
            problems = [*error.problems, *inert]
        else:
            previous = scope.tried.get(canonical(params))
            if not inert and previous is None:
                return Decision("propose_change", params=params, rationale=args["rationale"].strip(), message=note)
            problems = inert or [f"that configuration was already {previous}"]
    return Decision("invalid", message=f"{note}propose_change was not used: " + "; ".join(problems))


def _parse_finish(args: dict, scope: Scope, note: str) -> Decision:
    reason = args.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return Decision("invalid", message=f"{note}finish needs a reason (a non-empty string saying why more trials "
                                           f"will not help), but got {shown(reason)!r}")
    return Decision("finish", rationale=reason.strip(), message=note)


TOOLS: dict[str, LLMTool] = {tool.name: tool for tool in (
    LLMTool("choose", lambda s: ({"candidate": {"type": "string", "enum": list(LETTERS)}, "rationale": _rationale(),
                                  "then": {"type": "string", "enum": list(LETTERS)}},
                                 ["candidate", "rationale"]), _parse_choose),
    LLMTool("propose_change", lambda s: ({"changes": _values(s), "rationale": _rationale()}, ["changes", "rationale"]),
            _parse_change),
    LLMTool("finish", lambda s: ({"reason": _rationale()}, ["reason"]), _parse_finish),
)}
"""The tuning tools, in the order the LLM sees them."""


def offered(scope: Scope) -> list[str]:
    """The tools of a turn: `choose` only with a menu, `finish` only when the session allows it."""
    return [name for name in TOOLS if (name != "choose" or scope.menu) and (name != "finish" or scope.may_finish)]


def tune_tools(scope: Scope) -> list[dict]:
    return [TOOLS[name].schema(scope) for name in offered(scope)]


def read_tune_call(message, scope: Scope) -> Decision:
    """Turn the LLM's reply into a Decision."""
    calls = list(getattr(message, "tool_calls", None) or [])
    broken = broken_call(message)
    names = offered(scope)
    if not calls and broken:
        return Decision("invalid", message=broken)
    if not calls:
        return Decision("invalid", message=f"the reply was text ({shown(message.content)!r}), not a call of {', '.join(names)}")
    note = f"{len(calls)} calls were made; only the first ({calls[0]['name']}) was read. " if len(calls) > 1 else ""
    name, args = calls[0]["name"], calls[0].get("args") or {}
    if name not in names:
        return Decision("invalid", message=f"{note}there is no tool {shown(name)!r} on this turn; the tools are {', '.join(names)}")
    if not isinstance(args, dict):
        return Decision("invalid", message=f"{note}the arguments of {name} must be a JSON object, but got {shown(args)!r}")
    return TOOLS[name].parse(args, scope, note)


def function_schema(name: str, properties: dict, required: list[str]) -> dict:
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
                       "error": f"{_NOT_AN_OBJECT} ({shown(args)}, in tool call {problem['loc'][1] + 1})"})
    return AIMessage(content="", invalid_tool_calls=broken)


def broken_call(message) -> str | None:
    """What to tell the LLM when its client could not read its tool call (None when it could)."""
    broken = list(getattr(message, "invalid_tool_calls", None) or [])
    if not broken:
        return None
    bad = broken[0]
    error = bad.get("error") or ""
    if error.startswith(_NOT_AN_OBJECT):
        return f"Your reply was not used: {error}. Call the tool again with a JSON object as its arguments."
    return (f"Your call to {bad.get('name')!r} was not run: its arguments are not valid JSON "
            f"({shown(error or bad.get('args'))}). Call the tool again with a JSON object.")


def shown(text) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + f"… ({len(text)} characters)"
