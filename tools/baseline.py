"""`rectune baseline` and `rectune worker`: both drive the one study loop (tools.study.run_study)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict

from rectune.models.errors import ConfigError
from rectune.tools.proposers import PROPOSERS, make_proposer, unattended
from rectune.tools.proposers.optuna_sampler import TPE_ARGUMENTS
from rectune.tools.runner import TrialRunner
from rectune.tools.study import Study, StudyContext, run_study


def study_name(context: StudyContext) -> str:
    return f"{context.dataset}-{context.groups}-{context.group}-{context.pipeline}-{context.tuner}-seed{context.seed}"


def check_sampler(name: str) -> None:
    """Refuse a tuner that cannot fill a study on its own (the LLM agent's proposals need its session)."""
    if not unattended(name):
        tuners = sorted(n for n in PROPOSERS if unattended(n))
        raise ConfigError(f"--sampler must be one of {tuners}, but got {name!r}"
                          + (" (its studies are filled by the agent's proposals)" if name in PROPOSERS else ""))


def study_session(tracker, study: Study, tuner: str):
    """The study's MLflow parent run: created once, resumed by every later process."""
    context = study.context
    # The budget may grow when a study is continued: a tag (mutable), not a param (immutable).
    params = {k: v for k, v in asdict(context).items() if k != "budget"}
    if context.tuner == "tpe":
        params |= {f"tpe.{k}": v for k, v in TPE_ARGUMENTS.items()}
    if tracker is None:
        return nullcontext()
    return tracker.session(context.dataset, name=study.name, tuner=tuner, params=params,
                           tags={"optuna_study": study.name, "group": context.group, "pipeline": context.pipeline,
                                 "budget": context.budget},
                           run_id=study.optuna.user_attrs.get("mlflow_run_id"))


def run_baseline(context: StudyContext, runner: TrialRunner, storage: str, name: str | None = None, tracker=None,
                 progress: bool = True, echo=None, transfers: tuple[tuple[str, dict], ...] = ()) -> Study:
    """Run (or continue) a study filled by `context.tuner` until `context.budget` trials are spent.

    Trial 0 is the default configuration, so every tuner starts from the same point.
    Re-running the same command on the same storage continues where it stopped.
    `transfers`: other groups' best configurations (`ProposerContext.transfers`).
    """
    check_sampler(context.tuner)
    study = Study.open(storage, name or study_name(context), context)
    with study_session(tracker, study, context.tuner) as session:
        if session is not None:
            study.optuna.set_user_attr("mlflow_run_id", session.run_id)
        run_study(study, make_proposer(context.tuner), runner, session, progress=progress, echo=echo, transfers=transfers)
    return study


def work(storage: str, name: str, data_dir=None, cache_dir=None, tracker=None, sample: bool = True,
         max_trials: int | None = None, progress: bool = True) -> int:
    """Execute trials of an existing study: queued proposals first; then, if `sample` and the
    study's tuner proposes on its own, new ones up to its budget. Returns the trials run here.

    Several workers may share a study: each queued trial goes to exactly one of them, and
    each counts the others' running trials against the budget.
    """
    study = Study.open(storage, name)
    context = study.context
    runner = TrialRunner.open(context.dataset, context.groups, data_dir=data_dir, cache_dir=cache_dir,
                              max_latency_ms=context.max_latency_ms, progress=progress)
    proposer = make_proposer(context.tuner) if sample and unattended(context.tuner) else None
    with study_session(tracker, study, "worker") as session:
        if session is not None and "mlflow_run_id" not in study.optuna.user_attrs:
            study.optuna.set_user_attr("mlflow_run_id", session.run_id)
        run_study(study, proposer, runner, session, progress=False, max_trials=max_trials)
    return study.ran
