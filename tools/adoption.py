"""Which configuration a study hands to its user: its best trial only when that beats the default beyond noise.

The best of n trials on validation is biased upward (it is the maximum of n noisy
estimates), and a per-group validation objective on Baby has a 95% interval of about
±.0035 while tuned gains are ~.0002. Adopting a best whose paired gain over the default
is within noise then costs on test: in the first two seeds of
bench/results/compare/baby-activity-b10-v3.md the LLM's within-noise bests scored below
the default on test NDCG@20 in 7 of 8 group-seeds (−.00024 [−.00030, −.00018]), where TPE
and random had kept the default. So every tuner's study adopts its best only when the
interval of best − default over the group's validation users lies above 0; otherwise the
default stays. The search itself is unchanged: proposers still build on the best.

A group's best trial is also what it hands to the groups tuned after it (cross-group
transfer: `transfers` and `untried_transfers`, read by the menu and by `tpe-warm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rectune.tools.noise import Interval, paired_interval, vector
from rectune.tools.trial import canonical

if TYPE_CHECKING:
    from rectune.tools.proposer import ProposerContext
    from rectune.tools.trial import TrialRecord


def ranked(history: list["TrialRecord"]) -> list["TrialRecord"]:
    """Complete trials, best first: those within the latency budget before slower ones; the
    earlier of two equal ones first."""
    complete = [r for r in history if r.state == "complete" and r.objective is not None]
    return sorted(complete, key=lambda r: (not r.feasible, -r.objective, r.number))


def best_record(history: list["TrialRecord"]) -> "TrialRecord | None":
    """The best complete trial that met the latency budget; a slower one only when none did."""
    return next(iter(ranked(history)), None)


def transfers(histories: list[tuple[str, list["TrialRecord"]]]) -> tuple[tuple[str, dict], ...]:
    """(group, best configuration) of each (group, history) that has a best, in the order given:
    what `ProposerContext.transfers` carries to the next group."""
    return tuple((group, best.params) for group, history in histories if (best := best_record(history)) is not None)


def untried_transfers(context: "ProposerContext", done: set[str]) -> list[tuple[str, dict]]:
    """The context's transfers not in `done` and valid in this study's space, each configuration
    once, the latest group's first (the freshest evidence; the older ones follow as they are tried)."""
    from rectune.models.errors import InvalidProposal

    found, seen = [], set(done)
    for origin, params in reversed(context.transfers):
        try:
            valid = context.space.validate(context.study.pipeline, params)
        except InvalidProposal:
            continue  # found under another space or objective: not a configuration of this study
        if canonical(valid) not in seen:
            seen.add(canonical(valid))
            found.append((origin, valid))
    return found


def default_record(history: list["TrialRecord"], defaults: dict) -> "TrialRecord | None":
    """The complete trial of the default configuration (trial 0 of every study), if any."""
    return next((r for r in history if r.state == "complete" and canonical(r.params) == canonical(defaults)), None)


@dataclass(frozen=True)
class Adoption:
    """The configuration a study recommends, and why."""

    record: "TrialRecord"
    """The adopted trial: the best, or the default."""
    best: "TrialRecord"
    default: "TrialRecord | None"
    gain: Interval | None
    """Best − default on validation, paired over the group's users; None when it cannot be paired."""
    reason: str

    @property
    def kept_default(self) -> bool:
        """A better trial exists on validation, but not by more than noise."""
        return self.record is not self.best

    @property
    def best_is_default(self) -> bool:
        return self.best is self.default


def adopt(history: list["TrialRecord"], defaults: dict, seed: int) -> Adoption | None:
    """The study's adopted configuration; None when no trial produced a number."""
    best, default = best_record(history), default_record(history, defaults)
    if best is None:
        return None
    if default is None:
        return Adoption(best, best, None, None, "the default produced no number")
    if best is default:
        gain = None if best.result.per_user is None else Interval(0.0, 0.0, 0.0)
        return Adoption(best, best, default, gain, "no trial beat the default")
    gain = None
    if best.result.per_user is not None and default.result.per_user is not None \
            and best.result.per_user["n"] == default.result.per_user["n"]:
        gain = paired_interval(vector(best.result.per_user), vector(default.result.per_user), seed=seed)
    if not default.feasible:
        return Adoption(best, best, default, gain, "the default is over the latency budget")
    if gain is None:
        # An objective without per-user values (coverage) or users that cannot be paired: no test, the best stands.
        return Adoption(best, best, default, None, "no per-user values to test the gain")
    if gain.low > 0:
        return Adoption(best, best, default, gain, "its gain over the default is more than noise")
    return Adoption(default, best, default, gain, "the best's gain over the default is within noise")
