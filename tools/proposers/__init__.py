"""Every tuner by name: `make_proposer("tpe")` → a Proposer (the contract is tools/proposer.py).

A new tuner is one module with a `Proposer` subclass and one `register` line below. Tuners
that live in a higher layer register themselves from there (agent/ registers "llm"), so
tools/ never imports agent/.
"""

from __future__ import annotations

from collections.abc import Callable

from rectune.models.errors import ConfigError
from rectune.tools.proposer import Proposer
from rectune.tools.proposers.default import DefaultProposer
from rectune.tools.proposers.local import LocalProposer
from rectune.tools.proposers.menu import MenuProposer
from rectune.tools.proposers.optuna_sampler import OptunaProposer

__all__ = ["PROPOSERS", "make_proposer", "register", "unattended"]

PROPOSERS: dict[str, Callable[..., Proposer]] = {}
"""Name → factory taking `seed` (added to the study's seed; 0 by default) plus keyword options."""
_ATTENDED: set[str] = set()


def register(name: str, factory: Callable[..., Proposer], *, unattended: bool = True) -> None:
    """Make `name` a tuner. `unattended=False`: it needs more than the study to propose (the LLM
    agent needs its endpoint and session), so `rectune worker` only runs its queued proposals."""
    PROPOSERS[name] = factory
    (_ATTENDED.discard if unattended else _ATTENDED.add)(name)


def unattended(name: str) -> bool:
    """Whether `make_proposer(name)` with no options can fill a study on its own."""
    return name in PROPOSERS and name not in _ATTENDED


def make_proposer(name: str, **options) -> Proposer:
    if name not in PROPOSERS:
        raise ConfigError(f"tuner must be one of {sorted(PROPOSERS)}, but got {name!r}")
    return PROPOSERS[name](**options)


register("default", DefaultProposer)
register("tpe", lambda seed=0: OptunaProposer("tpe", seed))
register("tpe-warm", lambda seed=0: OptunaProposer("tpe", seed, warm=True))
register("random", lambda seed=0: OptunaProposer("random", seed))
register("local", LocalProposer)
register("menu", MenuProposer)
