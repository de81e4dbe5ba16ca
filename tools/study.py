"""The one study loop: every command that tunes (baseline, worker, tune, compare, bench) drives it.

A study is one tuning run of one pipeline on one user group, recorded in the ledger
(tools/ledger.py). `run_study` takes the next proposal — a queued one, else the default
configuration as trial 0, else the proposer's — runs it exactly once through the runner,
pairs it with the best trial so far (tools.noise: the difference over the group's users and
its interval), tells the ledger, logs MLflow once, until the budget is spent or the proposer finishes.
The agent drives the same `Study.run` one approved proposal at a time.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from rectune.models.errors import ConfigError, RectuneError
from rectune.tools import ledger
from rectune.tools.adoption import best_record
from rectune.tools.noise import paired_interval, vector
from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.tracking import trial_key
from rectune.tools.trial import FINISHED, TrialRecord, TrialResult, TrialSpec, canonical, spent, tried as tried_keys

__all__ = ["Study", "StudyContext", "TrialRecord", "canonical", "run_study"]

_RECONCILED: set[tuple[str, str, str]] = set()
"""(storage, study, MLflow parent run) already reconciled by this process."""


@dataclass(frozen=True)
class StudyContext:
    dataset: str
    groups: str
    group: str
    pipeline: str
    objective: str = "ndcg@20"
    seed: int = 0
    budget: int = 20
    tuner: str = "tpe"
    """The registered proposer that fills this study (tools.proposers)."""
    max_latency_ms: float | None = None

    def check(self) -> None:
        """Refuse settings no trial could run with before a study is written: a study made with
        them would keep its failed trial 0 and refuse the corrected settings later."""
        from rectune.models.pipeline import PipelineConfig
        from rectune.tools.proposers import PROPOSERS
        from rectune.tools.runner import resolve_objective

        if self.tuner not in PROPOSERS:
            raise ConfigError(f"tuner must be one of {sorted(PROPOSERS)}, but got {self.tuner!r}")
        check_latency_budget(self.max_latency_ms)
        # Trial 0 is the pipeline's default configuration: the objective must work there.
        resolve_objective(self.objective, PipelineConfig.from_dict({"pipeline": self.pipeline}))

    def spec(self, params: dict) -> TrialSpec:
        return TrialSpec(self.dataset, self.groups, self.group, self.pipeline, dict(params), self.seed, self.objective)

    def differences(self, stored: "StudyContext") -> list[str]:
        """Settings in which this context differs from the stored one (the budget may grow)."""
        return [f"{k}={v!r} (study has {getattr(stored, k)!r})" for k, v in asdict(self).items()
                if k != "budget" and getattr(stored, k) != v]

    @classmethod
    def from_ledger(cls, values: dict) -> "StudyContext":
        # Ledgers written before issue 12 name the tuner `sampler`.
        values = dict(values)
        if "sampler" in values:
            values["tuner"] = values.pop("sampler")
        return cls(**values)


def check_latency_budget(max_latency_ms: float | None) -> None:
    if max_latency_ms is not None and not 0 < max_latency_ms < float("inf"):
        raise ConfigError(f"--max-latency-ms must be above 0 (ms per user), but got {max_latency_ms:g}")


class Study:
    """One study in the ledger: its history, budget and best trial, and the one way to run a trial."""

    def __init__(self, optuna_study, context: StudyContext, storage: str):
        self.optuna = optuna_study
        """The Optuna study that stores the trials (for Optuna's own tools; read records via history)."""
        self.context = context
        self.storage = storage
        self.ran = 0
        """Trials this object has run (in this process)."""

    @property
    def name(self) -> str:
        return self.optuna.study_name

    @classmethod
    def open(cls, storage: str, name: str, context: StudyContext | None = None) -> "Study":
        """Open study `name`, created with `context` if missing; a given context must match the
        stored one, except for the budget, which may grow or shrink."""
        if context is not None:
            context.check()
        optuna_study, recorded = ledger.open_study(storage, name, None if context is None else asdict(context))
        stored = StudyContext.from_ledger(recorded)
        if context is not None:
            mismatch = context.differences(stored)
            if mismatch:
                raise ConfigError(f"study {name!r} in {storage} was created for other settings: " + "; ".join(mismatch))
            if context.budget != stored.budget or "sampler" in recorded:
                ledger.save_context(optuna_study, asdict(context))
            stored = context
        return cls(optuna_study, stored, storage)

    def records(self) -> list[TrialRecord]:
        """Every trial of the history and every one queued or running, oldest first."""
        trials = self.optuna.get_trials(deepcopy=False)
        return [r for r in (ledger.decode(t, self.context) for t in trials) if r is not None]

    def history(self, in_flight: bool = False) -> list[TrialRecord]:
        """Complete, failed and rejected trials, oldest first; `in_flight`: also those queued or
        running (what parallel proposers must not propose again)."""
        return [r for r in self.records() if in_flight or r.state not in ("waiting", "running")]

    def spent(self) -> int:
        """Trials that count against the budget: complete ones and those that failed with a
        reason (a trial whose process died is retried instead; a rejected one costs nothing)."""
        return spent(self.records())

    def best(self) -> TrialRecord | None:
        """The best complete trial within the latency budget; a slower one only if none was."""
        return best_record(self.records())

    def find(self, proposal_id: str) -> TrialRecord | None:
        """The trial of a proposal: its finished run if any, else its queued or running one
        (a rejection is returned only when nothing else is)."""
        mine = [r for r in self.records() if r.proposal_id == proposal_id]
        order = ("complete", "failed", "running", "waiting", "rejected")
        return min(mine, key=lambda r: (order.index(r.state), -r.number), default=None)

    def tried(self) -> dict[str, str]:
        return tried_keys(self.history(in_flight=True))

    def queued(self) -> list[TrialRecord]:
        return [r for r in self.records() if r.state == "waiting"]

    def reclaim(self) -> int:
        """Queue again the trials whose process died (see tools.ledger.reclaim_orphans)."""
        return ledger.reclaim_orphans(self.optuna)

    def reject(self, proposal: Proposal, comment: str) -> TrialRecord:
        """Record a proposal a person refused (once per proposal id): it never counts against
        the budget, and the history shows it so that no proposer offers it again."""
        known = self.find(proposal.id) if proposal.id else None
        if known is not None and known.state in ("rejected", *FINISHED):
            return known
        record = _record(proposal, "rejected", comment=comment)
        return replace(record, number=ledger.add_rejected(self.optuna, record))

    def run(self, proposal: Proposal, runner, session=None) -> TrialRecord:
        """Run a proposal exactly once by its id (one derived from the configuration when it has
        none): a finished trial with that id is returned, a queued one is run, otherwise it is
        queued and run. One that another process is running is waited for."""
        self.reconcile(session)
        proposal = proposal if proposal.id else replace(proposal, id=proposal_id(proposal))
        while True:
            known = self.find(proposal.id)
            if known is not None and known.state in FINISHED:
                return known
            if known is None or known.state == "rejected":
                number = ledger.enqueue(self.optuna, _record(proposal, "waiting"))
            elif known.state == "waiting":
                number = known.number
            else:  # running in another process: wait for it (or for its death, then run it here)
                time.sleep(0.5)
                self.reclaim()
                continue
            record = self.take(number, runner, session)
            if record is not None:
                return record

    def take(self, number: int, runner, session=None) -> TrialRecord | None:
        """Run the queued trial `number` here; None when another process took it first."""
        if not ledger.claim(self.optuna, number, runner.space.distributions(self.context.pipeline)):
            return None
        queued = ledger.decode(ledger.trial(self.optuna, number), self.context)
        if queued.proposal_id and any(r.proposal_id == queued.proposal_id and r.number < number and r.state != "rejected"
                                      for r in self.records()):
            # Two processes queued the same proposal at once: the older trial is the one that runs.
            ledger.abandon(self.optuna, number)
            return None
        self.ran += 1
        try:
            result = runner.run(self.context.spec(queued.params))
        except RectuneError as error:
            return self._fail(queued, str(error))
        except BaseException:
            # Not the trial's fault (interrupted, a bug): its proposal goes back to the queue.
            ledger.retry(self.optuna, ledger.trial(self.optuna, number))
            raise
        result = replace(result, vs_best=self.vs_best(result))
        if not math.isfinite(result.objective):
            return self._fail(queued, f"the objective {result.metric or self.context.objective} is {result.objective}: "
                                      "the trial produced no number")
        ledger.tell_complete(self.optuna, number, result, queued.tuner, self.context.max_latency_ms)
        record = replace(queued, state="complete", result=result)
        if session is not None:
            try:
                log(session, self.name, record)
            except BaseException:
                # The ledger has the trial, MLflow not: the next reconcile in this process must look.
                _RECONCILED.discard((self.storage, self.name, session.run_id))
                raise
        return record

    def vs_best(self, result: TrialResult) -> dict | None:
        """`result` minus the current best complete trial (this one is still running), paired over
        the group's validation users: tools.noise.Interval as JSON with the best's `trial` number;
        None when there is no best yet, or either side has no per-user values."""
        best = self.best()
        if best is None or best.result.per_user is None or result.per_user is None \
                or best.result.per_user["n"] != result.per_user["n"]:
            # Different users (a dataset changed under a resumed study): nothing to pair; the trial stands.
            return None
        interval = paired_interval(vector(result.per_user), vector(best.result.per_user), seed=self.context.seed)
        return {**interval.to_json(), "trial": best.number}

    def _fail(self, queued: TrialRecord, error: str) -> TrialRecord:
        ledger.tell_failed(self.optuna, queued.number, queued.params, error)
        return replace(queued, state="failed", error=error)

    def reconcile(self, session) -> int:
        """Log to MLflow the complete trials it lacks — a process that died between telling the
        ledger and logging the run leaves one — once per study, MLflow run and process.
        Returns how many were logged."""
        if session is None or (self.storage, self.name, session.run_id) in _RECONCILED:
            return 0
        from optuna.trial import TrialState

        logged = session.logged_keys(self.name)
        missing = [t for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if trial_key(self.name, t.number) not in logged and not ledger.may_still_log(t)]
        for trial in missing:
            log(session, self.name, ledger.decode(trial, self.context))
        _RECONCILED.add((self.storage, self.name, session.run_id))
        return len(missing)


def proposal_id(proposal: Proposal) -> str:
    """An id from the configuration: two processes proposing the same run it once."""
    return f"{proposal.tuner}-{hashlib.sha1(canonical(proposal.params).encode()).hexdigest()[:12]}"


def log(session, study: str, record: TrialRecord) -> str:
    return session.log_trial(record.result, record.tuner, trial_key(study, record.number), trial_number=record.number,
                             study=study, rationale=record.rationale)


def _record(proposal: Proposal, state: str, comment: str = "") -> TrialRecord:
    return TrialRecord(-1, proposal.tuner, state, dict(proposal.params), proposal.rationale, proposal.id,
                       comment=comment, meta=dict(proposal.meta))


def run_study(study: Study, proposer: Proposer | None, runner, session=None, progress: bool = True,
              echo: Callable[[str], None] | None = None, max_trials: int | None = None,
              transfers: tuple[tuple[str, dict], ...] = ()) -> Study:
    """Run the study until its budget is spent or the proposer finishes: queued proposals first
    (whatever the budget: someone asked for them), trial 0 (the default configuration) on an
    empty study, then `proposer`'s proposals. `proposer` None: only the queue is run.
    `max_trials`: stop after running this many here. `transfers`: other groups' best
    configurations for the proposer (`ProposerContext.transfers`)."""
    from tqdm import tqdm

    context = ProposerContext(study.context, runner.space, study.context.budget, transfers)
    study.reclaim()
    study.reconcile(session)
    with tqdm(total=context.budget, initial=min(study.spent(), context.budget), disable=not progress,
              desc=f"{study.context.tuner} {study.context.group}", unit="trial") as bar:
        while max_trials is None or study.ran < max_trials:
            step = _next(study, proposer, context)
            if isinstance(step, Finish):
                if echo is not None:
                    echo(f"[{study.name}] stopped: {step.reason}")
                break
            record = study.take(step.number, runner, session) if isinstance(step, TrialRecord) else study.run(step, runner, session)
            if record is None:
                continue  # another process took that queued trial first
            bar.update(1)
            best = study.best()
            bar.set_postfix({study.context.objective: f"{best.objective:.4f}" if best else "-"})
            if echo is not None:
                echo(_line(study, record, best))
    return study


def _next(study: Study, proposer: Proposer | None, context: ProposerContext) -> TrialRecord | Proposal | Finish:
    """The queued trial to run next, or the next proposal, or why there is none."""
    from rectune.tools.proposers import make_proposer

    records = study.records()
    queued = [r for r in records if r.state == "waiting"]
    if queued:
        return queued[0]
    if proposer is None:
        return Finish("no queued trial is left")
    in_flight = sum(1 for r in records if r.state == "running")
    # Parallel workers count each other's running trials; two that check at the same moment may
    # both start one, so together they overshoot the budget by at most one trial each.
    if spent(records) + in_flight >= context.budget:
        return Finish(f"the budget of {context.budget} trials is spent")
    proposal = (proposer if records else make_proposer("default")).propose(records, context)
    if isinstance(proposal, Proposal) and canonical(proposal.params) in tried_keys(records):
        # Run anyway, the same proposal would come back forever: the proposer breaks its contract.
        raise RectuneError(f"tuner {proposal.tuner!r} proposed a configuration the study has tried: {proposal.params}")
    return proposal


def _line(study: Study, record: TrialRecord, best: TrialRecord | None) -> str:
    head = f"[{study.name}] trial {record.number} ({record.tuner})"
    if record.state != "complete":
        return f"{head} failed: {record.error}"
    return (f"{head}: {study.context.objective} {record.objective:.5f}"
            + (f" (best {best.objective:.5f}, trial {best.number})" if best else ""))
