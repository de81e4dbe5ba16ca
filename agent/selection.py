"""Model selection with a noise band: the LLM may only pick among pipelines tied with the best.

Every pipeline's default configuration is scored on every group (validation). Per group,
each pipeline's paired difference to the best is bootstrapped over the group's users
(tools/noise.py: same users, so the pairing removes most of the noise). The pipelines
whose 95% interval contains 0 are tied with the best; the LLM chooses among them (by
accuracy, cost or simplicity: a criterion below) and anything else is refused. A group
with one pipeline in its band is decided by the rule alone — no LLM call is spent on it.
LLMs are unreliable judges of a table of numbers (the 1.5B model picked the same pipeline
for every group, whatever the numbers); the band leaves them only the choices that the
numbers do not settle. (AGENT_RESEARCH.md, M1.)

The LLM names a criterion (CRITERIA) and the pipeline it thinks best by it; the reason the
report gives is composed from the table for that criterion, never the LLM's own text: asked
for a free reason citing a number, the embedded 1.5B model wrote "highest F1@20 score of
0.948" where the table's F1@20 were .010-.012 (2026-12-03). A named pipeline that is not the
best of the band by its own criterion is replaced by the one that is — the criterion is the
LLM's decision, the table settles which pipeline meets it, and no call is spent on a retry.
"""

from __future__ import annotations

from rectune.agent.llm_tools import broken_call, shown, function_schema
from rectune.agent.report import cell
from rectune.models.pipeline import PIPELINES
from rectune.tools.noise import Interval

CRITERIA = {
    # name → (what it means in a reason, the row's value by it: higher is better; None when unmeasured)
    "best objective": ("the best objective", lambda p, row, f1: row["objective"]),
    "cheapest fit": ("the cheapest to fit", lambda p, row, f1: _negated(row.get("fit_seconds"))),
    "fastest serving": ("the fastest to serve", lambda p, row, f1: _negated(row.get("ms_per_user"))),
    "best F1": ("the best F1", lambda p, row, f1: f1),
    "fewest stages": ("the simplest (fewest stages)", lambda p, row, f1: -float(PIPELINES[p][1] != "none")),
}
"""The ways a pipeline tied with the best may be preferred: by accuracy, cost, or simplicity."""

FORMATS = {"objective": ".5f", "f1": ".5f", "fit_seconds": ".1f", "ms_per_user": ".3f"}
"""How the table prints each number, and the reasons that cite it."""


def tied(rows: dict[str, dict]) -> list[str]:
    """The pipelines of one group within noise of the best (the best first), by objective."""
    order = sorted(rows, key=lambda p: -rows[p]["objective"])
    return [p for p in order if p == order[0] or (rows[p].get("vs_best") and Interval.from_json(rows[p]["vs_best"]).within_noise)]


def group_table(group: str, rows: dict[str, dict], objective: str, band_only: bool = False) -> str:
    """One group's pipelines, best first: all of them for the report; for the pick's prompt
    (`band_only`) those within noise of the best, the only ones it may choose — every row
    and column the LLM reads costs prompt tokens (~0.03 s each with the embedded model)."""
    band = tied(rows)
    order = band if band_only else sorted(rows, key=lambda p: -rows[p]["objective"])
    # Each pipeline's F1 is at its own default TopN: every TopN present gets a column.
    extra = list(dict.fromkeys(name for p in order for name in rows[p] if name.startswith("f1@")))
    noise = "" if band_only else "within noise | "
    lines = [f"Group {group}:", f"| pipeline | {objective} | difference to the best [95% interval] | {noise}"
             + "".join(f"{name} | " for name in extra) + "fit s | ms/user |",
             "|---|---|---|" + "---|" * (len(extra) + (not band_only)) + "---|---|"]
    for pipeline in order:
        row, interval = rows[pipeline], rows[pipeline].get("vs_best")
        difference = "best" if pipeline == order[0] else "-" if interval is None else Interval.from_json(interval).text()
        within = "" if band_only else f"{'yes' if pipeline in band else 'no'} | "
        lines.append(f"| {pipeline} | {_number(row['objective'], FORMATS['objective'])} | {difference} | {within}"
                     + "".join(f"{_number(row.get(name), FORMATS['f1'])} | " for name in extra)
                     + f"{_number(row.get('fit_seconds'), FORMATS['fit_seconds'])} | "
                     + f"{_number(row.get('ms_per_user'), FORMATS['ms_per_user'])} |")
    return "\n".join(lines)


def _number(value, form: str) -> str:
    """A table cell; "-" for a value a session checkpointed before it was measured lacks."""
    return "-" if value is None else format(value, form)


def _negated(value: float | None) -> float | None:
    return None if value is None else -value


def pick_tool(ties: dict[str, list[str]]) -> dict:
    """The pick's one tool: for each group with several tied pipelines, a criterion and one of them.
    The enums carry the band, so a grammar-constrained endpoint cannot leave it; the criterion
    comes first, so a model that writes left to right names the pipeline knowing why."""
    properties = {group: {"type": "object", "properties": {
        "because": {"type": "string", "enum": list(CRITERIA)},
        "pipeline": {"type": "string", "enum": pipelines}}, "required": ["because", "pipeline"]}
        for group, pipelines in ties.items()}
    return function_schema("choose_pipelines", properties, list(ties))


def read_pick(message, ties: dict[str, list[str]]) -> tuple[dict[str, dict], str]:
    """The LLM's valid picks among the open groups, and what was wrong with the others ("" when nothing was)."""
    calls = [c for c in (getattr(message, "tool_calls", None) or []) if c["name"] == "choose_pipelines"]
    if not calls:
        broken = broken_call(message)
        if broken:
            return {}, broken
        return {}, f"Call choose_pipelines with a choice for every group; you answered {shown(message.content or message.tool_calls)!r}."
    args, picked, problems = calls[0].get("args") or {}, {}, []
    for group, band in ties.items():
        choice = args.get(group)
        if not isinstance(choice, dict):
            problems.append(f"no choice for group {group!r} (an object with because and pipeline)")
        elif choice.get("pipeline") not in band:
            problems.append(f"group {group!r}: {shown(choice.get('pipeline'))!r} is not within noise of the best; "
                            f"choose one of {band}")
        elif choice.get("because") not in CRITERIA:
            problems.append(f"group {group!r}: because must be one of {list(CRITERIA)}, not {shown(choice.get('because'))!r}")
        else:
            picked[group] = {"pipeline": choice["pipeline"], "because": choice["because"]}
    return picked, "; ".join(problems)


def decided(rows: dict[str, dict], band: list[str], choice: dict | None, failure: str, space) -> dict:
    """The pick of one group — the LLM's criterion's (one pipeline in the band), the rule's (one
    pipeline in the band) or the fallback's (the LLM failed: the best) — beside the argmax of the
    objective and of F1@TopN."""
    argmax = band[0]
    f1 = {p: row.get(f"f1@{space.defaults(p)['top_n']}") for p, row in rows.items()}
    if choice is not None:
        choice, by = _by_criterion(rows, band, choice["because"], choice["pipeline"], f1), "llm"
    elif len(band) == 1:
        runner_up = next(iter(sorted((p for p in rows if p != argmax), key=lambda p: -rows[p]["objective"])), None)
        interval = rows[runner_up].get("vs_best") if runner_up else None
        gap = f" (next: {runner_up}, {Interval.from_json(interval).text()})" if interval else ""
        choice, by = {"pipeline": argmax, "reason": f"the only pipeline within noise of the best{gap}"}, "rule"
    else:
        choice, by = {"pipeline": argmax, "reason": f"fallback to the best objective: the LLM failed ({cell(failure)})"}, "fallback"
    f1_argmax = max(f1, key=lambda p: f1[p] or 0.0)
    return {**choice, "chosen_by": by, "llm": by == "llm", "band": band, "argmax": argmax,
            "agrees": choice["pipeline"] == argmax, "in_band": choice["pipeline"] in band,
            "f1_argmax": f1_argmax, "f1_agrees": choice["pipeline"] == f1_argmax}


def _by_criterion(rows: dict[str, dict], band: list[str], criterion: str, named: str, f1: dict[str, float | None]) -> dict:
    """The band's pipeline that `criterion` prefers — `named` when it is one of the best by it (ties
    by the criterion go to the better objective) — and a reason made of the table's numbers."""
    meaning, value = CRITERIA[criterion]
    scores = {p: value(p, rows[p], f1[p]) for p in band}
    measured = [p for p in band if scores[p] is not None]
    if not measured:
        # A session checkpointed before this was measured: nothing to hold the named pipeline to.
        return {"pipeline": named, "because": criterion, "reason": f"{criterion} (not measured in this session's table)"}
    top = max(scores[p] for p in measured)
    best = [p for p in measured if scores[p] == top]
    pipeline = named if named in best else best[0]
    others = [p for p in band if p != pipeline]
    reason = f"{meaning} of the {len(band)} within noise: " + _cells(criterion, pipeline, rows, f1) + " against " + \
        ", ".join(f"{p} {_cells(criterion, p, rows, f1)}" for p in others)
    if pipeline != band[0] and rows[pipeline].get("vs_best"):
        reason += f"; objective {Interval.from_json(rows[pipeline]['vs_best']).text()} to {band[0]}"
    if pipeline != named:
        why = "whose value the table lacks" if scores[named] is None else f"which is not {meaning} by the table"
        reason += f" (the LLM named {named}, {why})"
    return {"pipeline": pipeline, "because": criterion, "reason": reason, **({"named": named} if pipeline != named else {})}


def _cells(criterion: str, pipeline: str, rows: dict[str, dict], f1: dict[str, float | None]) -> str:
    """The numbers a reason by `criterion` cites for one pipeline, as the table prints them."""
    row = rows[pipeline]
    if criterion == "cheapest fit":
        return f"{_number(row.get('fit_seconds'), FORMATS['fit_seconds'])} s fit"
    if criterion == "fastest serving":
        return f"{_number(row.get('ms_per_user'), FORMATS['ms_per_user'])} ms/user"
    if criterion == "best F1":
        return f"F1 {_number(f1[pipeline], FORMATS['f1'])}"
    if criterion == "fewest stages":
        return "no ranker" if PIPELINES[pipeline][1] == "none" else f"ranker {PIPELINES[pipeline][1]}"
    return _number(row["objective"], FORMATS["objective"])
