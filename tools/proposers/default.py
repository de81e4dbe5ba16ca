"""Trial 0 of every study: the pipeline's default configuration, so every tuner starts from the same point."""

from __future__ import annotations

from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.trial import TrialRecord, canonical, tried


class DefaultProposer(Proposer):
    name = "default"

    def __init__(self, seed: int = 0):
        del seed  # one configuration: nothing to seed

    def propose(self, history: list[TrialRecord], context: ProposerContext) -> Proposal | Finish:
        params = context.space.defaults(context.study.pipeline)
        if canonical(params) in tried(history):
            return Finish("the default configuration has been tried")
        return Proposal(params, self.name, "the pipeline's default configuration (every tuner's trial 0)", id="default")
