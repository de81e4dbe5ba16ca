"""The Optuna baseline and the queue worker, both over the one trial runner and ledger."""

from __future__ import annotations

import os
from dataclasses import asdict

from models.errors import ConfigError
from tools.ledger import (TPE_ARGUMENTS, StudyContext, best, context_of, enqueue, in_flight, log_unlogged, open_study,
                          reclaim_orphans, run_next, spent)
from tools.runner import TrialRunner

BASELINE_SAMPLERS = ("tpe", "random")


def study_name(context: StudyContext) -> str:
    return f"{context.dataset}-{context.groups}-{context.group}-{context.pipeline}-{context.sampler}-seed{context.seed}"


def _session(tracker, study, context: StudyContext, tuner: str):
    """The study's MLflow parent run: created once, resumed by every later process."""
    # The budget may grow when a study is continued: a tag (mutable), not a param (immutable).
    params = {k: v for k, v in asdict(context).items() if k != "budget"}
    if context.sampler == "tpe":
        params |= {f"tpe.{k}": v for k, v in TPE_ARGUMENTS.items()}
    session = tracker.session(context.dataset, name=study.study_name, tuner=tuner, params=params,
                              tags={"optuna_study": study.study_name, "group": context.group, "pipeline": context.pipeline,
                                    "budget": context.budget},
                              run_id=study.user_attrs.get("mlflow_run_id"))
    return session


def run_baseline(context: StudyContext, runner: TrialRunner, storage: str, name: str | None = None, tracker=None,
                 progress: bool = True):
    """Run (or continue) an Optuna study until `context.budget` trials are spent.

    Trial 0 is the default configuration, enqueued when the study is created, so every
    tuner starts from the same point. Re-running the same command on the same storage
    continues where it stopped instead of starting over.
    """
    from contextlib import nullcontext

    from tqdm import tqdm

    if context.sampler not in BASELINE_SAMPLERS:
        raise ConfigError(f"the baseline samples with {' or '.join(BASELINE_SAMPLERS)}, but got {context.sampler!r} "
                          "(an `llm` study is filled by the agent's proposals)")
    study = open_study(storage, name or study_name(context), context)
    reclaim_orphans(study)
    if not study.get_trials(deepcopy=False):
        enqueue(study, runner.space.defaults(context.pipeline), "default")
    with (_session(tracker, study, context, context.sampler) if tracker else nullcontext()) as session:
        if session is not None:
            study.set_user_attr("mlflow_run_id", session.run_id)
        log_unlogged(study, session)
        with tqdm(total=context.budget, initial=min(spent(study), context.budget), disable=not progress,
                  desc=f"{context.sampler} {context.group}", unit="trial") as bar:
            while spent(study) < context.budget:
                run_next(study, runner, runner.space, session)
                bar.update(1)
                top = best(study)
                bar.set_postfix({context.objective: f"{top.value:.4f}" if top else "-"})
    return study


def work(storage: str, name: str, data_dir=None, cache_dir=None, tracker=None, sample: bool = True,
         max_trials: int | None = None, progress: bool = True) -> int:
    """Execute trials of an existing study: queued proposals first; then, if `sample`, new
    ones from the study's sampler until its budget is spent. Returns the trials run here.

    Several workers may share a study: each queued trial goes to exactly one of them.
    Sampled trials are checked against the budget before they are created, so parallel
    workers can overshoot it by at most one sampled trial each.
    """
    from contextlib import nullcontext

    study = open_study(storage, name, offset=os.getpid())
    context = context_of(study)
    runner = TrialRunner.open(context.dataset, context.groups, data_dir=data_dir, cache_dir=cache_dir,
                              max_latency_ms=context.max_latency_ms, progress=progress)
    reclaim_orphans(study)
    done = 0
    with (_session(tracker, study, context, "worker") if tracker else nullcontext()) as session:
        if session is not None and "mlflow_run_id" not in study.user_attrs:
            study.set_user_attr("mlflow_run_id", session.run_id)
        log_unlogged(study, session)
        while max_trials is None or done < max_trials:
            from optuna.trial import TrialState

            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            running = in_flight(study) - len(waiting)
            sampling = sample and context.sampler != "llm"
            if not waiting and not (sampling and spent(study) + running < context.budget):
                break
            if run_next(study, runner, runner.space, session, only_queued=not sampling) is not None:
                done += 1
    return done
