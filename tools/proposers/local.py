"""Local search: untried one-parameter neighbours of the best trial on the search space's grid.

Each numeric parameter has a grid of GRID_POINTS values from its low to its high bound
(geometric on a log scale), each categorical one its list of choices; a neighbour moves one
parameter to the next grid value up or down. Deterministic: no random numbers at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rectune.models.errors import InvalidProposal
from rectune.tools.adoption import ranked
from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.trial import TrialRecord, canonical, tried

if TYPE_CHECKING:
    from rectune.tools.space import Parameter, SearchSpace

GRID_POINTS = 9


def grid(parameter: Parameter) -> list:
    """The values local search moves between, ascending (categoricals: in the space's order)."""
    if parameter.type == "categorical":
        return list(parameter.choices)
    low, high = parameter.low, parameter.high
    if parameter.log:
        points = [low * (high / low) ** (i / (GRID_POINTS - 1)) for i in range(GRID_POINTS)]
    else:
        points = [low + (high - low) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    # Readable values, the bounds exact: the space refuses anything outside them.
    if parameter.type == "int":
        values = [round(p) for p in points]
    else:
        values = [float(f"{p:.3g}") for p in points]
    return sorted({low, high, *(min(max(v, low), high) for v in values)})


def steps(parameter: Parameter, value) -> list:
    """The grid values next to `value`: one below and one above (fewer at an end of the grid)."""
    points = grid(parameter)
    if parameter.type == "categorical":
        if value not in points:
            return []
        i = points.index(value)
        return [points[j] for j in (i - 1, i + 1) if 0 <= j < len(points)]
    below = [p for p in points if p < value and not math.isclose(p, value, rel_tol=1e-9)]
    above = [p for p in points if p > value and not math.isclose(p, value, rel_tol=1e-9)]
    return below[-1:] + above[:1]


def neighbours(params: dict, space: SearchSpace, pipeline: str, objective: str) -> Iterator[tuple[dict, str]]:
    """Valid one-parameter neighbours of `params` and what changed, in the space's parameter
    order, moving only parameters that can change `objective`."""
    for parameter in space.tunable(pipeline, objective):
        for value in steps(parameter, params.get(parameter.name, parameter.default)):
            try:
                moved = space.validate(pipeline, {parameter.name: value}, base=params)
            except InvalidProposal:
                continue  # e.g. k moved below top_n
            yield moved, f"{parameter.name} {params.get(parameter.name, parameter.default)}→{value}"


def untried_neighbour(starts: list[tuple[str, dict]], done: set[str], space: SearchSpace,
                      pipeline: str, objective: str) -> tuple[dict, str] | None:
    """The first untried neighbour of the first start that has one: (params, rationale)."""
    for label, params in starts:
        for moved, change in neighbours(params, space, pipeline, objective):
            if canonical(moved) not in done:
                return moved, f"neighbour of {label}: {change}"
    return None


class LocalProposer(Proposer):
    name = "local"

    def __init__(self, seed: int = 0):
        del seed  # deterministic by construction

    def propose(self, history: list[TrialRecord], context: ProposerContext) -> Proposal | Finish:
        pipeline = context.study.pipeline
        starts = [(f"trial {r.number}", r.params) for r in ranked(history)]
        found = untried_neighbour(starts or [("the default", context.space.defaults(pipeline))], tried(history),
                                  context.space, pipeline, context.study.objective)
        if found is None:
            return Finish("every one-parameter neighbour of every complete trial has been tried")
        return Proposal(found[0], self.name, found[1])
