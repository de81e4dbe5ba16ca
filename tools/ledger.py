"""The trial ledger: every trial of every tuner, recorded in one Optuna study.

The study lives in an RDB (SQLite by default, any SQLAlchemy URL such as PostgreSQL for
many machines). Its user attribute `rectune` holds the study's context (dataset, groups,
group, pipeline, objective, seed, budget, sampler), so any process — `rectune baseline`,
`rectune worker`, the agent — can open it by name and run its trials the same way.
Proposals from outside the sampler (the default configuration, the LLM's) enter as
enqueued trials with fixed parameters; `study.ask()` hands each waiting trial to exactly
one process (Optuna pops it in a database transaction).
"""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from models.errors import ConfigError, RectuneError
from tools.space import SearchSpace
from tools.trial import TUNERS, TrialResult, TrialSpec

STORAGE_ENV = "RECTUNE_STORAGE"
SAMPLERS = ("tpe", "random", "llm")
"""`llm`: every trial is a proposal enqueued by the agent; the study never samples."""
# TPE arguments pinned here (Optuna 5 changed the defaults to multivariate + constant
# liar): the baseline must not move when Optuna does. Logged with every baseline run.
TPE_ARGUMENTS = {"n_startup_trials": 5, "n_ei_candidates": 24, "multivariate": True, "group": False, "constant_liar": True}


def storage_url(explicit: str | None = None) -> str:
    """Flag → RECTUNE_STORAGE → a SQLite file in the working directory."""
    return explicit or os.environ.get(STORAGE_ENV) or f"sqlite:///{Path.cwd() / 'rectune-optuna.db'}"


@dataclass(frozen=True)
class StudyContext:
    dataset: str
    groups: str
    group: str
    pipeline: str
    objective: str = "ndcg@20"
    seed: int = 0
    budget: int = 20
    sampler: str = "tpe"
    max_latency_ms: float | None = None

    def check(self) -> None:
        """Refuse settings no trial could run with before a study is written: a study made with
        them would keep its failed trial 0 and refuse the corrected settings later."""
        from models.pipeline import PipelineConfig
        from tools.runner import resolve_objective

        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, but got {self.sampler!r}")
        check_latency_budget(self.max_latency_ms)
        # Trial 0 is the pipeline's default configuration: the objective must work there.
        resolve_objective(self.objective, PipelineConfig.from_dict({"pipeline": self.pipeline}))

    def spec(self, params: dict) -> TrialSpec:
        return TrialSpec(self.dataset, self.groups, self.group, self.pipeline, dict(params), self.seed, self.objective)

    def matches(self, other: "StudyContext") -> list[str]:
        return [f"{k}={v!r} (study has {getattr(other, k)!r})" for k, v in asdict(self).items()
                if k != "budget" and getattr(other, k) != v]


def check_latency_budget(max_latency_ms: float | None) -> None:
    if max_latency_ms is not None and not 0 < max_latency_ms < float("inf"):
        raise ConfigError(f"--max-latency-ms must be above 0 (ms per user), but got {max_latency_ms:g}")


def make_sampler(context: StudyContext, offset: int = 0):
    """The study's sampler with pinned arguments; `offset` moves its seed (for workers and
    continued studies)."""
    import optuna

    if context.sampler == "tpe":
        # A latency budget reaches TPE as each trial's constraint (see run_next), not a sampler argument.
        return optuna.samplers.TPESampler(seed=context.seed + offset, **TPE_ARGUMENTS)
    if context.sampler in ("random", "llm"):
        return optuna.samplers.RandomSampler(seed=context.seed + offset)
    raise ConfigError(f"sampler must be one of {SAMPLERS}, but got {context.sampler!r}")


def open_study(storage: str, name: str, context: StudyContext | None = None, offset: int = 0):
    """Create or load study `name`; a given context must match the stored one (budget may grow)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, storage = storage, _reach(storage, _rdb)
    # One study looked up by name: listing every study's summary reads every trial of the ledger.
    study_id = _reach(url, lambda _: _study_id(storage, name))
    if study_id is None:
        if context is None:
            studies = sorted(s.study_name for s in storage.get_all_studies())
            raise ConfigError(f"no study {name!r} in {url}; studies there: {studies or 'none'}")
        context.check()
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=make_sampler(context, offset))
        study.set_user_attr("rectune", asdict(context))
        return study
    recorded = storage.get_study_user_attrs(study_id)["rectune"]
    stored = StudyContext(**recorded)
    if context is not None:
        mismatch = context.matches(stored)
        if mismatch:
            raise ConfigError(f"study {name!r} in {url} was created for other settings: " + "; ".join(mismatch))
        if context.budget != stored.budget:
            stored = StudyContext(**{**asdict(stored), "budget": context.budget})
    # A continued study must not replay the samples of its first process: the seed moves
    # on by the number of trials already there (still reproducible from the same history).
    n_trials = storage.get_n_trials(study_id)
    study = optuna.load_study(storage=storage, study_name=name, sampler=make_sampler(stored, offset + n_trials))
    if stored.budget != recorded["budget"]:
        study.set_user_attr("rectune", asdict(stored))
    return study


def _study_id(storage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


@functools.lru_cache(maxsize=None)
def _rdb(url: str):
    """One Optuna storage (one SQLAlchemy engine and its connection pool) per URL and process:
    a storage made for every open_study would leave a pool of connections each, which a
    PostgreSQL server counts against its max_connections until they are garbage-collected."""
    import optuna

    # The connections live as long as the process: one a server dropped while a session waited
    # for a person must be replaced, not fail the next query.
    options = {} if url.startswith("sqlite") else {"engine_kwargs": {"pool_pre_ping": True}}
    return optuna.storages.RDBStorage(url, **options)


def _reach(storage: str, read):
    """`read(storage)`, with an unreachable or malformed storage named in one line (not a
    driver traceback): a wrong URL, a server that is down, a missing driver."""
    import sqlalchemy.exc

    try:
        return read(storage)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        from tools.tracking import one_line, scrub

        raise ConfigError(scrub(f"cannot open the trial ledger {storage}: {one_line(error)}")) from error


def context_of(study) -> StudyContext:
    return StudyContext(**study.user_attrs["rectune"])


def enqueue(study, params: dict, tuner: str, rationale: str | None = None, proposal_id: str | None = None) -> None:
    """Queue a proposal with fixed parameters (validated by the caller against the space).
    `proposal_id` lets the proposer find the trial again after a crash (exactly-once runs)."""
    if tuner not in TUNERS:
        raise ConfigError(f"tuner must be one of {TUNERS}, but got {tuner!r}")
    attrs = {"tuner": tuner, **({"rationale": rationale} if rationale else {}), **({"proposal_id": proposal_id} if proposal_id else {})}
    study.enqueue_trial(params, user_attrs=attrs)


def spent(study) -> int:
    """Trials that count against the budget: finished ones and those that failed on their own
    (a trial whose process died is retried instead, see `reclaim_orphans`)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs))


def in_flight(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


CLAIM_GRACE_SECONDS = 20.0
"""How long a trial may be RUNNING without an owner: `study.ask()` pops it and the next
statement claims it, so one still unclaimed after this long lost its process in between."""


def reclaim_orphans(study, grace_seconds: float = CLAIM_GRACE_SECONDS) -> int:
    """Fail the RUNNING trials whose process is gone, and queue their parameters again, so a
    crash costs the interrupted trial, not a slot of the budget.

    A claimed trial is an orphan when its owner process on this host is dead. An unclaimed
    one is either being claimed right now (a live process sets the owner within
    milliseconds) or lost its process between pop and claim: it is watched until it gets
    an owner or has been running for `grace_seconds`.
    """
    from datetime import datetime

    from optuna.trial import TrialState

    host = socket.gethostname()
    reclaimed = 0
    while True:
        # Recomputed every pass: a watched trial may be claimed, finished or reclaimed by
        # another process meanwhile, and then it is no longer ours to wait for.
        waiting = False
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get("owner")
            if owner:
                if owner["host"] != host or _alive(owner["pid"]):
                    continue
            elif (datetime.now() - trial.datetime_start).total_seconds() < grace_seconds:
                waiting = True
                continue
            reclaimed += _retry(study, trial)
        if not waiting:
            return reclaimed
        time.sleep(min(0.5, grace_seconds / 4))


def _retry(study, trial) -> bool:
    """Fail the trial and queue its parameters again; False when another process did first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except (ValueError, UpdateFinishedTrialError):  # ValueError: Optuna saw it finished already
        return False
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("tuner", "rationale", "proposal_id")}
    # A trial that died before its suggest calls has no params yet: its proposal lives in
    # the fixed parameters it was enqueued with.
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study.enqueue_trial(params, user_attrs={**attrs, "retry_of": trial.number})
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def best(study):
    """The best finished trial that met its constraints, or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get("feasible", True)]
    return max(done, key=lambda t: t.value, default=None)


def run_next(study, runner, space: SearchSpace, session=None, report_test: bool = False,
             only_queued: bool = False) -> TrialResult | None:
    """Take the next trial (a queued proposal first, else a sampled one), run it through the
    runner, record it in the study and, given a tracking session, in MLflow.

    only_queued: if another process took the last queued trial first, Optuna has created a
    sampled trial instead; it is closed as FAIL marked `abandoned` (it never counts against
    the budget) and None is returned.
    """
    from optuna.trial import TrialState

    context = context_of(study)
    trial = study.ask()
    queued = "tuner" in trial.user_attrs  # enqueue() always sets it; the sampler never does
    if only_queued and not queued:
        trial.set_user_attr("abandoned", "the queue was empty")
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": os.getpid()})
    tuner = trial.user_attrs.get("tuner", context.sampler)
    try:
        params = space.suggest(trial, context.pipeline)
        result = runner.run(context.spec(params), report_test=report_test)
    except RectuneError as error:
        trial.set_user_attr("error", str(error))
        study.tell(trial, state=TrialState.FAIL)
        raise
    for name, value in {"tuner": tuner, "params": params, "latency_ms_per_user": result.latency_ms_per_user,
                        "train_seconds": result.train_seconds, "eval_seconds": result.eval_seconds, "cache": result.cache,
                        "feasible": result.feasible, "metrics": result.metrics, "test_metrics": result.test_metrics,
                        "metric": result.metric, "told_at": time.time()}.items():
        trial.set_user_attr(name, value)
    if context.max_latency_ms is not None:
        # ≤ 0 is feasible: TPE then prefers configurations that meet the latency budget.
        trial.set_constraint("latency_ms_per_user", result.latency_ms_per_user - context.max_latency_ms)
    study.tell(trial, result.objective)
    if session is not None:
        session.log_trial(result, trial.number, tuner, study.study_name, rationale=trial.user_attrs.get("rationale"))
    return result


def result_of(trial, context: StudyContext) -> TrialResult:
    """A finished trial's result as `run_next` recorded it in the ledger."""
    attrs = trial.user_attrs
    return TrialResult(context.spec(attrs["params"]), trial.value, attrs["metrics"], attrs["latency_ms_per_user"],
                       attrs["train_seconds"], attrs["eval_seconds"], attrs["cache"], attrs["feasible"],
                       attrs.get("test_metrics"), attrs.get("metric", ""))


LOG_GRACE_SECONDS = 60.0
"""How long after finishing a trial another host's process may still be logging it to MLflow."""


def _may_still_log(trial) -> bool:
    """Whether the process that ran `trial` may be logging it right now: it is alive on this
    host, or it ran elsewhere and finished moments ago (its liveness cannot be checked)."""
    owner = trial.user_attrs.get("owner") or {}
    if owner.get("host") == socket.gethostname():
        return owner.get("pid") != os.getpid() and _alive(owner["pid"])
    # Epoch seconds, not Optuna's datetime_complete: that is the writing host's local time.
    return time.time() - trial.user_attrs.get("told_at", 0.0) < LOG_GRACE_SECONDS


def log_unlogged(study, session) -> int:
    """Record in MLflow the finished trials it lacks — a process that died between telling the
    ledger and logging the run leaves one — so MLflow shows every trial of the ledger once.
    Returns how many were logged."""
    from optuna.trial import TrialState

    if session is None:
        return 0
    context = context_of(study)
    logged = session.logged_trials(study.study_name)
    missing = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.number not in logged and not _may_still_log(t)]
    for trial in missing:
        session.log_trial(result_of(trial, context), trial.number, trial.user_attrs["tuner"], study.study_name,
                          rationale=trial.user_attrs.get("rationale"))
    return len(missing)
