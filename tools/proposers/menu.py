"""Candidate menus: untried configurations that a chooser — the LLM, or a fixed rule — picks from.

A menu holds untried one-parameter neighbours of the best trial, each on another
parameter chosen at random — refinement —, the best configurations of the groups tuned
before this one (up to TRANSFERS) — cross-group transfer, what worked on similar users —
and, once the search is stuck (STUCK complete trials without a new best), one TPE sample —
exploration. Refinement comes first because
every study starts from a default that is already good, and at a budget of 10 TPE's first
samples are random (n_startup_trials=5): on Baby, with the content heuristic, such samples
scored half the default's NDCG@20 (.021–.042 against .046), and the embedded 1.5B model
chose the TPE sample in 9 of 9 menus that offered one, letter A, B, C or D alike
(2026-12-01): a chooser that favours the candidate with the most changes must not be
offered a random jump while refinement still pays. The menu is shuffled by the seed, so a
position says nothing about a candidate (LLMs favour early options: Zheng et al. 2023,
"Large Language Models Are Not Robust Multiple Choice Selectors"). Every candidate is
untried and distinct by construction: whoever chooses cannot spend a trial on a repeat.
This is LLAMBO's "generate candidates, then select" (OptunaHub's llambo sampler) with
the candidates made by neighbourhood moves and TPE instead of by the LLM.

`MenuProposer` ("menu") always takes the first candidate: the same mechanism without the
LLM — the comparison arm that shows what the LLM's choice adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.adoption import ranked, untried_transfers
from rectune.tools.proposers.local import steps
from rectune.tools.proposers.optuna_sampler import OptunaProposer, history_seed
from rectune.tools.trial import TrialRecord, canonical, tried

SIZE = 4
TRANSFERS = 2
"""Transfers a menu holds at most, so that refinement keeps a place beside them."""
STUCK = 3
"""Complete trials since the best after which the menu also offers a TPE sample."""
_MENU_STREAM = 1
"""Keeps the menu's random numbers apart from the TPE sampler's, which share the history seed."""


@dataclass(frozen=True)
class Candidate:
    params: dict
    source: str
    """`tpe` (a TPE sample), `neighbour` (one parameter of the best moved one grid step) or
    `transfer` (the best configuration of another group)."""
    changes: dict
    """Parameter → [value in the best trial, value here], for every parameter that differs."""
    origin: str = ""
    """The group a transfer is the best of."""

    def describe(self) -> str:
        moves = ", ".join(f"{name} {_short(old)}→{_short(new)}" for name, (old, new) in self.changes.items())
        # Neighbours are not labelled: the prompt says what is not, and each label costs every call tokens.
        label = {"tpe": " (TPE sample)", "transfer": f" (best of group {self.origin})"}.get(self.source, "")
        return f"{moves or 'no change'}{label}"


def menu(history: list[TrialRecord], context: ProposerContext, seed: int = 0) -> list[Candidate]:
    """Up to SIZE untried, distinct candidates, shuffled; deterministic given (history, context,
    seed). Fewer when the space near the best is exhausted; a TPE sample then stands in for an
    empty menu even before the search is stuck, so that a chooser always has something to run."""
    pipeline, space = context.study.pipeline, context.space
    order = ranked(history)
    base = order[0].params if order else space.defaults(pipeline)
    rng = np.random.default_rng([history_seed(context.study.seed, seed, len(history)), _MENU_STREAM])
    done = set(tried(history))
    found = []
    sample = OptunaProposer("tpe", seed).draw(history, context)[0] if stuck(history) else None
    if sample is not None:
        done.add(canonical(sample))
        found.append(Candidate(sample, "tpe", _changes(base, sample)))
    for origin, params in untried_transfers(context, done)[:TRANSFERS]:
        done.add(canonical(params))
        found.append(Candidate(params, "transfer", _changes(base, params), origin))
    for params in _neighbours(base, context, rng, done, SIZE - len(found)):
        done.add(canonical(params))
        found.append(Candidate(params, "neighbour", _changes(base, params)))
    if not found and (sample := OptunaProposer("tpe", seed).draw(history, context)[0]) is not None:
        found.append(Candidate(sample, "tpe", _changes(base, sample)))
    return [found[i] for i in rng.permutation(len(found))]


def stuck(history: list[TrialRecord]) -> bool:
    """Whether STUCK complete trials have run since the best one."""
    order = ranked(history)
    return bool(order) and sum(1 for r in history if r.state == "complete" and r.number > order[0].number) >= STUCK


def _neighbours(base: dict, context: ProposerContext, rng: np.random.Generator, done: set[str], count: int) -> list[dict]:
    """Up to `count` untried one-step moves of `base`, each on a different parameter."""
    from rectune.models.errors import InvalidProposal

    pipeline, space, found = context.study.pipeline, context.space, []
    parameters = space.tunable(pipeline, context.study.objective)
    for index in rng.permutation(len(parameters)):
        parameter = parameters[index]
        options = steps(parameter, base.get(parameter.name, parameter.default))
        for value in (options[i] for i in rng.permutation(len(options))):
            try:
                moved = space.validate(pipeline, {parameter.name: value}, base=base)
            except InvalidProposal:
                continue  # e.g. k moved below top_n
            if canonical(moved) not in done:
                found.append(moved)
                break
        if len(found) == count:
            break
    return found


def _changes(base: dict, params: dict) -> dict:
    return {name: [base.get(name), value] for name, value in params.items() if base.get(name) != value}


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class MenuProposer(Proposer):
    """The first candidate of the menu, always."""

    name = "menu"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def propose(self, history: list[TrialRecord], context: ProposerContext) -> Proposal | Finish:
        options = menu(history, context, self.seed)
        if not options:
            return Finish("the menu is empty: TPE drew only tried configurations and every neighbour of the best is tried")
        first = options[0]
        return Proposal(first.params, self.name, f"first of {len(options)} candidates: {first.describe()}",
                        meta={"candidate": "A", "source": first.source})
