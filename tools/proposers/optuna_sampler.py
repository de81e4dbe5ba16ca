"""TPE and random search as proposers: Optuna's samplers over an in-memory study that holds
the history, rebuilt for every proposal.

Rebuilt, not kept, so a proposal depends on nothing but (history, context): the sampler's
seed is the study's seed plus the length of the history, and the same history gives the
same proposal in any process — a resumed or parallel one included. Trials still in flight
enter as RUNNING, so TPE's constant liar keeps parallel workers apart.
"""

from __future__ import annotations

from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.adoption import ranked, untried_transfers
from rectune.tools.proposers.local import untried_neighbour
from rectune.tools.trial import TrialRecord, canonical, tried

# Pinned (Optuna 5 changed the defaults to multivariate + constant liar): the baseline must
# not move when Optuna does. Logged with every TPE study.
TPE_ARGUMENTS = {"n_startup_trials": 5, "n_ei_candidates": 24, "multivariate": True, "group": False, "constant_liar": True}
RESAMPLES = 16
"""Samples drawn before a sampler that keeps proposing tried configurations falls back to a neighbour."""


class OptunaProposer(Proposer):
    """`sampler` "tpe" or "random"; `warm`: first run the context's transfers (other groups' best
    configurations), then sample — TPE given the warm start that the menu's transfers give the
    LLM, the control arm of cross-group transfer (tuner "tpe-warm")."""

    def __init__(self, sampler: str, seed: int = 0, warm: bool = False):
        self.sampler, self.seed, self.warm = sampler, seed, warm
        self.name = f"{sampler}-warm" if warm else sampler

    def _sampler(self, seed: int):
        import optuna

        if self.sampler == "tpe":
            # A latency budget reaches TPE as each trial's constraint, not a sampler argument.
            return optuna.samplers.TPESampler(seed=seed, **TPE_ARGUMENTS)
        return optuna.samplers.RandomSampler(seed=seed)

    def propose(self, history: list[TrialRecord], context: ProposerContext) -> Proposal | Finish:
        transfer = next(iter(untried_transfers(context, set(tried(history))) if self.warm else []), None)
        if transfer is not None:
            return Proposal(transfer[1], self.name, f"warm start: the best of group {transfer[0]}")
        sample, last = self.draw(history, context)
        if sample is not None:
            return Proposal(sample, self.name, f"{self.name} sample")
        done = tried(history)
        starts = [("the last sample", last), *((f"trial {r.number}", r.params) for r in ranked(history))]
        found = untried_neighbour(starts, done, context.space, context.study.pipeline, context.study.objective)
        if found is None:
            return Finish(f"{self.name} drew only tried configurations and every neighbour has been tried")
        return Proposal(found[0], self.name, f"{self.name} drew only tried configurations; {found[1]}")

    def draw(self, history: list[TrialRecord], context: ProposerContext) -> tuple[dict | None, dict]:
        """An untried sample (None when RESAMPLES draws in a row were tried configurations), and
        the last sample drawn."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pipeline, objective = context.study.pipeline, context.study.objective
        distributions = context.space.distributions(pipeline, objective)
        study = optuna.create_study(direction="maximize", sampler=self._sampler(history_seed(context.study.seed, self.seed, len(history))))
        for record in history:
            frozen = _frozen(record, distributions, context.study.max_latency_ms)
            if frozen is not None:
                study.add_trial(frozen)
        done, params = tried(history), {}
        for _ in range(RESAMPLES):
            params = context.space.suggest(study.ask(), pipeline, objective)
            if canonical(params) not in done:
                return params, params
        return None, params


def history_seed(study_seed: int, proposer_seed: int, trials: int) -> int:
    """One sampler seed per (study seed, proposer seed, history length). A sum would make seed s
    at n trials replay seed s + 1 at n − 1: the seeds of a comparison would not be independent."""
    import numpy as np

    return int(np.random.SeedSequence([study_seed, proposer_seed, trials]).generate_state(1)[0])


def _frozen(record: TrialRecord, distributions: dict, max_latency_ms: float | None):
    """The record as an Optuna trial, or None when its values lie outside today's space (a
    ledger written under an older space file): it then only counts as tried."""
    from optuna.trial import TrialState, create_trial

    params = {k: v for k, v in record.params.items() if k in distributions}
    state = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL, "rejected": TrialState.FAIL}.get(
        record.state, TrialState.RUNNING)
    constraints = None
    if record.result is not None and max_latency_ms is not None:
        constraints = {"latency_ms_per_user": record.result.latency_ms_per_user - max_latency_ms}
    try:
        return create_trial(state=state, value=record.objective, params=params,
                            distributions={k: distributions[k] for k in params}, constraints=constraints)
    except ValueError:
        return None
