"""The tools the LLM may call, and the strict reading of its calls.

The LLM only ever proposes: every call is parsed and validated here, and a bad one —
unknown tool, arguments that are not JSON, a parameter out of range, a configuration
already tried, plain text instead of a call — becomes a precise message for its next
turn, costing no trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from agent.prompts import render
from models.errors import InvalidProposal
from models.pipeline import PIPELINES
from tools.space import SearchSpace

_ECHO_LIMIT = 300
FREE_TOOLS = ("evaluate_group", "get_history")
_NOT_AN_OBJECT = "its arguments are valid JSON but not an object"


def select_tool(groups: list[str]) -> dict:
    return _function("choose_pipelines", {
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "group": {"type": "string", "enum": groups},
            "pipeline": {"type": "string", "enum": list(PIPELINES)},
            "reason": {"type": "string"}}, "required": ["group", "pipeline", "reason"]}},
    }, ["choices"])


def tune_tools(space: SearchSpace, pipeline: str, groups: list[str], free: bool = True, may_finish: bool = True) -> list[dict]:
    """The tuning tools; `free=False` leaves out the two that cost no trial (after one of
    them the next turn must decide: small models otherwise ask for information forever)."""
    kinds = {"int": "integer", "float": "number", "categorical": "string"}
    properties = {p.name: {"type": kinds[p.type] if not p.choices or isinstance(p.choices[0], str) else "integer",
                           "description": p.help} for p in space.parameters_for(pipeline)}
    values = {"type": "object", "properties": properties, "additionalProperties": False}
    tools = [
        _function("propose_change", {"changes": values, "rationale": {"type": "string"}}, ["changes", "rationale"]),
        _function("train_model", {"params": values, "rationale": {"type": "string"}}, ["params", "rationale"]),
        _function("evaluate_group", {"group": {"type": "string", "enum": groups}}, ["group"]),
        _function("get_history", {}, []),
        _function("finish", {"reason": {"type": "string"}}, ["reason"]),
    ]
    left_out = (set() if free else set(FREE_TOOLS)) | (set() if may_finish else {"finish"})
    return [t for t in tools if t["function"]["name"] not in left_out]


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


@dataclass
class Decision:
    """What one LLM turn amounts to after checking."""

    kind: str
    """proposal | evaluate_group | get_history | finish | invalid"""
    params: dict = field(default_factory=dict)
    changes: dict = field(default_factory=dict)
    rationale: str = ""
    group: str = ""
    message: str = ""
    """For `invalid`: what to tell the LLM; for others: a note such as 'only the first call was used'."""


def _echo(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + f"… ({len(text)} characters)"


def read_tune_call(message, space: SearchSpace, pipeline: str, best: dict, tried: dict[str, int], groups: list[str],
                   may_finish: bool = True) -> Decision:
    """Turn the LLM's reply into a Decision. `tried` maps canonical configurations to trial numbers."""
    names = ["propose_change", "train_model", "evaluate_group", "get_history", "finish"]
    calls = list(getattr(message, "tool_calls", None) or [])
    broken = _broken_call(message)
    if not calls and broken:
        return Decision("invalid", message=broken)
    if not calls:
        return Decision("invalid", message=f"You answered with text ({_echo(message.content)!r}) instead of a tool call. "
                                           f"Reply with exactly one call of: {', '.join(names)}.")
    note = f"You made {len(calls)} calls; only the first ({calls[0]['name']}) was used. " if len(calls) > 1 else ""
    call = calls[0]
    name, args = call["name"], call.get("args") or {}
    if name not in names:
        return Decision("invalid", message=f"{note}There is no tool {name!r}. The tools are: {', '.join(names)}.")
    if not isinstance(args, dict):
        return Decision("invalid", message=f"{note}The arguments of {name} must be a JSON object, but got {_echo(args)!r}.")
    if name == "get_history":
        return Decision("get_history", message=note)
    if name == "finish":
        if not may_finish:
            return Decision("invalid", message=f"{note}This session runs its whole budget: finish is not available. "
                                               "Propose a change (changing only k or top_n is cheap).")
        return Decision("finish", rationale=str(args.get("reason", "")), message=note)
    if name == "evaluate_group":
        group = args.get("group")
        if group not in groups:
            return Decision("invalid", message=f"{note}evaluate_group needs a group among {groups}, but got {group!r}.")
        return Decision("evaluate_group", group=group, message=note)

    key = "changes" if name == "propose_change" else "params"
    values = args.get(key)
    rationale = args.get("rationale")
    problems = []
    if not isinstance(values, dict) or not values:
        problems.append(f"{key} must be a non-empty object of parameter: value, but got {_echo(values)!r}")
    if not isinstance(rationale, str) or not rationale.strip():
        problems.append("rationale must be a non-empty string saying why this should help")
    if problems:
        return Decision("invalid", message=f"{note}Your {name} was not run (no trial used):\n- " + "\n- ".join(problems))
    try:
        params = space.validate(pipeline, values, base=best if name == "propose_change" else None)
    except InvalidProposal as error:
        return Decision("invalid", message=f"{note}Your {name} was not run (no trial used):\n- " + "\n- ".join(error.problems))
    previous = tried.get(canonical(params))
    if previous is not None:
        others = [p.name for p in space.parameters_for(pipeline) if p.name not in values][:6]
        hint = f"another value, or another parameter such as {', '.join(others)}" if others else "other values"
        return Decision("invalid", message=f"{note}That configuration was already tried as trial {previous}; "
                                           f"propose one that differs from every row of the history — {hint}.")
    changes = {k: v for k, v in params.items() if best.get(k) != v}
    return Decision("proposal", params=params, changes=changes, rationale=rationale.strip(), message=note)


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
        if not isinstance(choice, dict):
            problems.append(f"each choice must be an object, but got {_echo(choice)!r}")
        elif choice.get("group") not in groups:
            problems.append(f"unknown group {_echo(choice.get('group'))!r}; groups are {groups}")
        # A string first: a list or an object is not even hashable, let alone a pipeline.
        elif not isinstance(choice.get("pipeline"), str) or choice["pipeline"] not in PIPELINES:
            problems.append(f"unknown pipeline {_echo(choice.get('pipeline'))!r} for group {choice['group']!r}; "
                            f"pipelines are {list(PIPELINES)}")
        elif not isinstance(choice.get("reason", ""), str):
            problems.append(f"the reason for group {choice['group']!r} must be a string, but got {_echo(choice['reason'])!r}")
        else:
            picked[choice["group"]] = {"pipeline": choice["pipeline"], "reason": choice.get("reason", "")}
    missing = [g for g in groups if g not in picked]
    if missing:
        problems.append(f"no choice for group(s) {missing}")
    return ({}, "; ".join(problems)) if problems else (picked, "")


def canonical(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)
