"""The proposer contract: how every tuner — the default configuration, Optuna TPE, random
search, local search, the LLM agent — tells the study loop what to try next.

A proposer is stateless between calls: everything it may use is in `history` (the
study's trials, oldest first, rejected proposals included) and `context` (the study's
settings and search space, and other groups' best configurations). The same history and context give the same proposal, so a
session resumed after a crash proposes what the crashed one would have. This is the
contract of Optuna's `BaseSampler` cut down to one method; the loop that runs the
proposals is `tools.study.run_study`.

A new tuner is one module with a `Proposer` subclass plus one line in `PROPOSERS`
(tools/proposers/__init__.py); the LLM agent registers itself from agent/ the same way.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rectune.tools.study import StudyContext, TrialRecord
    from rectune.tools.space import SearchSpace


@dataclass(frozen=True)
class Proposal:
    """One configuration to run as the next trial."""

    params: dict[str, Any]
    """The full configuration, already validated against the search space."""
    tuner: str
    """Registered name of the proposer that made it (recorded with the trial)."""
    rationale: str = ""
    """Why: the LLM's reason, or how a sampler made it ("TPE", "neighbour of trial 3: k 500→1000")."""
    id: str = ""
    """Stable id for exactly-once runs: a trial with this id in the ledger is not run again."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything worth keeping with the trial (LLM seconds and tokens, the candidate menu…)."""


@dataclass(frozen=True)
class Finish:
    """The proposer stops before the budget is spent."""

    reason: str


@dataclass(frozen=True)
class ProposerContext:
    """What a proposer may read besides the history."""

    study: "StudyContext"
    space: "SearchSpace"
    budget: int
    """Trials the study may spend in all (trial 0, the default, included)."""
    transfers: tuple[tuple[str, dict], ...] = ()
    """(group, configuration): the best trial of each group tuned before this one, with the same
    pipeline and tuner, oldest first — cross-group transfer. The menu offers them as candidates;
    `tpe-warm` runs them before sampling. Empty when a study is tuned on its own."""


class Proposer(abc.ABC):
    """Base class of every tuner. Subclasses set `name` and implement `propose`."""

    name: str = ""

    @abc.abstractmethod
    def propose(self, history: list["TrialRecord"], context: ProposerContext) -> Proposal | Finish:
        """The next configuration to try, never one already in `history` (tried or rejected),
        or Finish. Must be deterministic given (history, context)."""
