"""The trial ledger: storage of every trial of every tuner, in one Optuna study.

The study lives in an RDB (SQLite by default, any SQLAlchemy URL such as PostgreSQL for
many machines). Its user attribute `rectune` holds the study's context, read once when the
study is opened, so any process — `rectune baseline`, `rectune worker`, the agent — can
open it by name and run its trials the same way. Every trial enters as a queued (WAITING)
trial with fixed parameters; a process claims one in a database transaction, so each goes
to exactly one process. This module only stores: what to run next and how is
tools/study.py. A trial's record is encoded into, and decoded from, the Optuna trial's
user attributes here and nowhere else (`encode_result`, `decode`).
"""

from __future__ import annotations

import functools
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rectune.models.errors import ConfigError
from rectune.tools.trial import TrialRecord, TrialResult

if TYPE_CHECKING:
    import optuna

    from rectune.tools.study import StudyContext

STORAGE_ENV = "RECTUNE_STORAGE"
CONTEXT_ATTR = "rectune"
SQLITE_BUSY_SECONDS = 60.0
_PROPOSAL_ATTRS = ("tuner", "rationale", "proposal_id", "meta")
_RESULT_ATTRS = ("latency_ms_per_user", "train_seconds", "eval_seconds", "cache", "feasible", "metrics", "test_metrics", "metric",
                 "per_user", "vs_best", "fit_seconds")


def storage_url(explicit: str | None = None) -> str:
    """Flag → RECTUNE_STORAGE → a SQLite file in the working directory."""
    return explicit or os.environ.get(STORAGE_ENV) or f"sqlite:///{Path.cwd() / 'rectune-optuna.db'}"


def open_study(url: str, name: str, create: dict | None = None) -> tuple["optuna.Study", dict]:
    """Study `name` and its stored context; created with context `create` when missing (or
    refused, naming the studies there, when `create` is None)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _reach(url, _rdb)
    # One study looked up by name: listing every study's summary reads every trial of the ledger.
    study_id = _reach(url, lambda _: _study_id(storage, name))
    # The ledger never samples (proposers do, from the history): the cheapest sampler keeps
    # Optuna's per-trial hooks free.
    sampler = optuna.samplers.RandomSampler(seed=0)
    if study_id is None:
        if create is None:
            studies = sorted(s.study_name for s in storage.get_all_studies())
            raise ConfigError(f"no study {name!r} in {url}; studies there: {studies or 'none'}")
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler)
        study.set_user_attr(CONTEXT_ATTR, create)
        return study, dict(create)
    return optuna.load_study(storage=storage, study_name=name, sampler=sampler), storage.get_study_user_attrs(study_id)[CONTEXT_ATTR]


def save_context(study, context: dict) -> None:
    study.set_user_attr(CONTEXT_ATTR, context)


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

    if url.startswith("sqlite"):
        # Workers sharing a SQLite ledger wait for each other's writes; on a loaded machine a
        # writer can hold the lock past SQLite's default 5 s, and the other would fail.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_SECONDS}})
    # The connections live as long as the process: one a server dropped while a session waited
    # for a person must be replaced, not fail the next query.
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _reach(storage: str, read):
    """`read(storage)`, with an unreachable or malformed storage named in one line (not a
    driver traceback): a wrong URL, a server that is down, a missing driver."""
    import sqlalchemy.exc

    try:
        return read(storage)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        from rectune.tools.tracking import one_line, scrub

        raise ConfigError(scrub(f"cannot open the trial ledger {storage}: {one_line(error)}")) from error


def _proposal_attrs(record: TrialRecord) -> dict[str, Any]:
    return {k: v for k, v in (("tuner", record.tuner), ("rationale", record.rationale),
                              ("proposal_id", record.proposal_id), ("meta", record.meta)) if v}


def enqueue(study, record: TrialRecord) -> int:
    """Queue a proposal (record.params, already validated) as a WAITING trial; returns its number."""
    from optuna.trial import TrialState, create_trial

    # Not study.enqueue_trial: it does not say which trial it made.
    template = create_trial(state=TrialState.WAITING, system_attrs={"fixed_params": record.params},
                            user_attrs=_proposal_attrs(record))
    return _add(study, template)


def add_rejected(study, record: TrialRecord) -> int:
    """Record a proposal a person refused as a finished trial that never counts (FAIL, `rejected`)."""
    from optuna.trial import TrialState, create_trial

    template = create_trial(state=TrialState.FAIL, user_attrs={
        **_proposal_attrs(record), "params": record.params, "rejected": True, "comment": record.comment})
    return _add(study, template)


def _add(study, template) -> int:
    storage = study._storage  # noqa: SLF001 — an optuna.Study exposes neither its storage nor its id
    return storage.get_trial_number_from_id(storage.create_new_trial(study._study_id, template_trial=template))  # noqa: SLF001


def _handle(study, number: int):
    """The storage of `study` and the id of its trial `number`."""
    storage = study._storage  # noqa: SLF001
    return storage, storage.get_trial_id_from_study_id_trial_number(study._study_id, number)  # noqa: SLF001


def trial(study, number: int):
    """The stored trial `number` (a FrozenTrial)."""
    storage, trial_id = _handle(study, number)
    return storage.get_trial(trial_id)


def claim(study, number: int, distributions: dict) -> bool:
    """Take the queued trial `number` for this process; False when another process took it
    first (the WAITING → RUNNING change is one database transaction). Its fixed parameters
    become the trial's Optuna parameters (for Optuna's own views of the study)."""
    from optuna.trial import TrialState

    storage, trial_id = _handle(study, number)
    if not storage.set_trial_state_values(trial_id, TrialState.RUNNING):
        return False
    storage.set_trial_user_attr(trial_id, "owner", {"host": socket.gethostname(), "pid": os.getpid()})
    params = storage.get_trial_system_attrs(trial_id)["fixed_params"]
    for name, value in params.items():
        try:
            internal = distributions[name].to_internal_repr(value)
        except (KeyError, ValueError):
            continue  # outside the space: the runner refuses the trial and says why
        storage.set_trial_param(trial_id, name, internal, distributions[name])
    return True


def tell_complete(study, number: int, result: TrialResult, tuner: str, max_latency_ms: float | None) -> None:
    """Record a claimed trial's result."""
    import optuna

    storage, trial_id = _handle(study, number)
    for name, value in encode_result(result, tuner).items():
        storage.set_trial_user_attr(trial_id, name, value)
    if max_latency_ms is not None:
        # ≤ 0 is feasible: the TPE proposer then prefers configurations that meet the budget.
        optuna.trial.Trial(study, trial_id).set_constraint("latency_ms_per_user", result.latency_ms_per_user - max_latency_ms)
    study.tell(number, result.objective)


def tell_failed(study, number: int, params: dict, error: str) -> None:
    """Record a claimed trial that produced no number: it counts against the budget, with its reason."""
    from optuna.trial import TrialState

    storage, trial_id = _handle(study, number)
    storage.set_trial_user_attr(trial_id, "params", params)
    storage.set_trial_user_attr(trial_id, "error", error)
    storage.set_trial_user_attr(trial_id, "told_at", time.time())
    study.tell(number, state=TrialState.FAIL)


def abandon(study, number: int) -> None:
    """Close a claimed trial that must not run (a duplicate of an older one); it is no part of the history."""
    from optuna.trial import TrialState

    storage, trial_id = _handle(study, number)
    storage.set_trial_user_attr(trial_id, "abandoned", True)
    study.tell(number, state=TrialState.FAIL)


def encode_result(result: TrialResult, tuner: str) -> dict[str, Any]:
    """A complete trial's user attributes (the names ledgers have always used)."""
    return {"tuner": tuner, "params": result.spec.params, **{name: getattr(result, name) for name in _RESULT_ATTRS},
            "told_at": time.time()}


def decode(trial, context: "StudyContext") -> TrialRecord | None:
    """The record of an Optuna trial; None for one that is not part of the history: a trial
    whose process died (it was queued again) or that was abandoned."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        state = "complete"
    elif trial.state == TrialState.FAIL:
        state = "rejected" if attrs.get("rejected") else "failed" if "error" in attrs else None
    else:
        state = {TrialState.WAITING: "waiting", TrialState.RUNNING: "running"}.get(trial.state)
    if state is None:
        return None
    params = attrs.get("params") or {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    result = None
    if state == "complete":
        # Ledgers written before `metric` and `feasible` existed lack them (and before `per_user`
        # and `vs_best`: None, no interval).
        values = {name: attrs.get(name) for name in _RESULT_ATTRS} | {"feasible": attrs.get("feasible", True),
                                                                       "metric": attrs.get("metric", "")}
        result = TrialResult(context.spec(params), trial.value, **values)
    return TrialRecord(trial.number, attrs.get("tuner", context.tuner), state, params, attrs.get("rationale", ""),
                       attrs.get("proposal_id", ""), attrs.get("error", ""), attrs.get("comment", ""), result,
                       attrs.get("meta", {}))


CLAIM_GRACE_SECONDS = 20.0
"""How long a trial may be RUNNING without an owner: a process claims a trial and sets its
owner in the next statement, so one still unclaimed after this long lost its process in between."""


def reclaim_orphans(study, grace_seconds: float = CLAIM_GRACE_SECONDS) -> int:
    """Fail the RUNNING trials whose process is gone, and queue their parameters again, so a
    crash costs the interrupted trial, not a slot of the budget.

    A claimed trial is an orphan when its owner process on this host is dead. An unclaimed
    one is either being claimed right now (a live process sets the owner within
    milliseconds) or lost its process between claim and owner: it is watched until it gets
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
            reclaimed += retry(study, trial)
        if not waiting:
            return reclaimed
        time.sleep(min(0.5, grace_seconds / 4))


def retry(study, trial) -> bool:
    """Fail the trial and queue its proposal again; False when another process did first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except (ValueError, UpdateFinishedTrialError):  # ValueError: Optuna saw it finished already
        return False
    attrs = {k: v for k, v in trial.user_attrs.items() if k in _PROPOSAL_ATTRS}
    # A trial that died before its parameters were set has them only as fixed parameters.
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


LOG_GRACE_SECONDS = 60.0
"""How long after finishing a trial another host's process may still be logging it to MLflow."""


def may_still_log(trial) -> bool:
    """Whether the process that ran `trial` may be logging it right now: it is alive on this
    host, or it ran elsewhere and finished moments ago (its liveness cannot be checked)."""
    owner = trial.user_attrs.get("owner") or {}
    if owner.get("host") == socket.gethostname():
        return owner.get("pid") != os.getpid() and _alive(owner["pid"])
    # Epoch seconds, not Optuna's datetime_complete: that is the writing host's local time.
    return time.time() - trial.user_attrs.get("told_at", 0.0) < LOG_GRACE_SECONDS
