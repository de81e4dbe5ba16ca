"""Is the LLM worth it? The agent against Optuna TPE and random search, fairly.

Per seed, the agent runs a session (approve=auto) and picks a pipeline per group; TPE and
random search then tune the same pipeline on the same group with the same search space,
objective, budget, seed and first trial (the default configuration), through the same
runner and ledger. Everything is resumable: agent sessions continue from their
checkpoint, baselines from their study. The report compares best-so-far validation curves,
test metrics of each tuner's best configuration (paired by seed, bootstrap intervals),
trials needed to beat the default by a margin, and wall time and tokens.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.graph import best_record
from agent.session import latest_checkpoint, run
from models.errors import RectuneError
from models.groups import make_groups
from tools.baseline import run_baseline
from tools.ledger import StudyContext
from tools.plots import best_so_far
from tools.runner import TrialRunner
from tools.trial import TrialSpec

TUNERS = ("llm", "tpe", "random")
BOOTSTRAP_SAMPLES = 5000
PERMUTATIONS = 1000
EXACT_SIGN_FLIPS_UP_TO = 16


@dataclass(frozen=True)
class Comparison:
    name: str
    dataset: str
    groups: str
    budget: int
    seeds: tuple[int, ...]
    objective: str = "ndcg@20"
    reach: float = 0.05
    """Report the trials each tuner needs to beat the default by this share."""
    storage: str = "sqlite:///rectune-optuna.db"
    tracking_uri: str = "sqlite:///mlflow.db"
    checkpoint: str = "rectune-sessions.db"
    data_dir: str | None = None
    cache_dir: str | None = None
    llm_base_url: str | None = None
    llm_model: str | None = None
    agent_may_finish: bool = False
    """False: the agent runs every trial of its budget, as the baselines do (equal trial counts)."""


@dataclass
class Run:
    tuner: str
    group: str
    seed: int
    pipeline: str
    curve: list[float]
    """Best validation objective so far, trial by trial (trial 0 = the default)."""
    best_params: dict
    trial_seconds: float
    llm_seconds: float = 0.0
    tokens: int = 0
    test: float = float("nan")


def bootstrap_interval(values: np.ndarray, seed: int = 0, level: float = 0.95,
                       clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling whole clusters when given
    (the groups of one seed share its LLM session and its pick: they are not independent)."""
    clusters = np.arange(len(values)) if clusters is None else clusters
    ids, codes = np.unique(clusters, return_inverse=True)
    sums, sizes = np.bincount(codes, weights=values), np.bincount(codes)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(ids), size=(BOOTSTRAP_SAMPLES, len(ids)))
    means = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def sign_flip_p(values: np.ndarray, clusters: np.ndarray | None = None) -> float:
    """Two-sided p-value of a zero mean difference: every sign pattern over the clusters
    (exact; with 5 seeds it cannot go below 2/32 = 0.0625, which is worth knowing)."""
    clusters = np.arange(len(values)) if clusters is None else clusters
    sums = np.bincount(np.unique(clusters, return_inverse=True)[1], weights=values)
    if len(sums) <= EXACT_SIGN_FLIPS_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(sums))))
    else:
        signs = np.random.default_rng(0).choice((1.0, -1.0), size=(PERMUTATIONS * 20, len(sums)))
    flipped = np.abs(signs @ sums)
    return float(np.mean(flipped >= abs(sums.sum()) - 1e-15))


def group_difference_test(values: np.ndarray, codes: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Between-group variance of a per-user metric and its permutation p-value (are the
    groups distinguishable, or as alike as random partitions of the users?)."""
    def between(labels: np.ndarray) -> float:
        means = np.bincount(labels, weights=values) / np.maximum(np.bincount(labels), 1)
        return float(np.sum(np.bincount(labels) * (means - values.mean()) ** 2) / len(values))

    observed = between(codes)
    rng = np.random.default_rng(seed)
    null = np.array([between(rng.permutation(codes)) for _ in range(PERMUTATIONS)])
    return observed, float((1 + np.sum(null >= observed)) / (1 + PERMUTATIONS))


def distinguishability(values: np.ndarray, codes: np.ndarray, labels: list[str]) -> str:
    """One line: each group's mean per-user metric with its interval, and the permutation p-value."""
    _, p_value = group_difference_test(values, codes)
    parts = []
    for i, label in enumerate(labels):
        low, high = bootstrap_interval(values[codes == i])
        parts.append(f"{label} {values[codes == i].mean():.4f} [{low:.4f}, {high:.4f}]")
    verdict = " — they differ no more than random partitions of the users do" if p_value > 0.05 else " — they differ"
    return "; ".join(parts) + f"; p = {p_value:.3f}{verdict}."


def trials_to_reach(curve: list[float], share: float) -> int | None:
    target = curve[0] * (1 + share)
    return next((i for i, value in enumerate(curve) if value >= target), None)


def compare(spec: Comparison, echo=print, report_dir: Path = Path("reports"), tracker=None, trace: bool = False) -> Path:
    runner = TrialRunner.open(spec.dataset, spec.groups, data_dir=spec.data_dir, cache_dir=spec.cache_dir)
    labels = list(runner.groups.labels)
    runs: list[Run] = []
    tables = None
    for seed in spec.seeds:
        session = f"{spec.name}-llm-seed{seed}"
        settings = {"session": session, "dataset": spec.dataset, "groups": spec.groups, "objective": spec.objective,
                    "budget": spec.budget, "seed": seed, "approve": "auto", "max_llm_calls": 3 * spec.budget, "may_finish": spec.agent_may_finish,
                    "storage": spec.storage, "tracking_uri": spec.tracking_uri, "data_dir": spec.data_dir,
                    "cache_dir": spec.cache_dir, "llm_base_url": spec.llm_base_url, "llm_model": spec.llm_model}
        echo(f"[compare] seed {seed}: the LLM agent")
        saved = latest_checkpoint(session, spec.checkpoint)
        if saved is not None and saved.checkpoint["channel_values"].get("phase") == "done":
            values = saved.checkpoint["channel_values"]  # finished: no need to start the LLM again
        else:
            values = run(settings, None, echo, spec.checkpoint, resume=saved is not None, tracker=tracker,
                         report_dir=report_dir, trace=trace)
        tables = tables or (values["table"], values["selection"])
        usage = values.get("usage") or {}
        for group in labels:
            history = values["history"][group]
            best = best_record(history)
            runs.append(Run("llm", group, seed, values["selection"][group]["pipeline"],
                            np.maximum.accumulate([r["objective"] for r in history]).tolist(), best["params"],
                            sum(r.get("seconds", 0.0) for r in history),
                            usage.get("seconds", 0.0) / len(labels), int(usage.get("input_tokens", 0) + usage.get("output_tokens", 0)) // len(labels)))
            for sampler in ("tpe", "random"):
                echo(f"[compare] seed {seed}: {sampler} on {group} ({values['selection'][group]['pipeline']})")
                context = StudyContext(spec.dataset, spec.groups, group, values["selection"][group]["pipeline"], spec.objective,
                                       seed, spec.budget, sampler)
                study = run_baseline(context, runner, spec.storage, f"{spec.name}-{sampler}-{group}-seed{seed}", tracker, progress=False)
                trials = sorted((t for t in study.get_trials() if t.value is not None), key=lambda t: t.number)
                best_trial = max(trials, key=lambda t: t.value)
                runs.append(Run(sampler, group, seed, context.pipeline, np.maximum.accumulate([t.value for t in trials]).tolist(),
                                best_trial.user_attrs["params"],
                                sum(t.user_attrs["train_seconds"] + t.user_attrs["eval_seconds"] for t in trials)))
    for item in runs:
        result = runner.run(TrialSpec(spec.dataset, spec.groups, item.group, item.pipeline, item.best_params, item.seed, spec.objective),
                            report_test=True)
        item.test = float(result.test_metrics[item.group][result.metric])
    return _report(spec, runs, tables, runner, report_dir, tracker, echo)


def _picks(runs: list[Run], group: str) -> str:
    counts = Counter(r.pipeline for r in runs if r.tuner == "llm" and r.group == group)
    return ", ".join(f"{pipeline} ×{n}" for pipeline, n in counts.most_common())


def _report(spec: Comparison, runs: list[Run], tables, runner: TrialRunner, report_dir: Path, tracker, echo) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    labels = list(runner.groups.labels)
    lines = [f"# LLM agent vs Optuna — {spec.name}", "",
             f"Dataset {spec.dataset}, groups {spec.groups}, objective {spec.objective} on validation (tuning) and test "
             f"(reporting), budget {spec.budget} trials per group and tuner (trial 0 = the default configuration for every "
             f"tuner), seeds {list(spec.seeds)}, same search space and runner; the agent "
             + ("could stop a group before its budget." if spec.agent_may_finish else "had to use its whole budget (no finish tool)."),
             ""]
    plots = []
    lines += ["## Best-so-far validation objective", ""]
    for group in labels:
        # The agent may finish before its budget: its best then stays where it was.
        curves = {tuner: [(r.curve + r.curve[-1:] * (spec.budget - len(r.curve)))[:spec.budget]
                          for r in runs if r.tuner == tuner and r.group == group]
                  for tuner in TUNERS}
        path = best_so_far(curves, report_dir / f"{spec.name}-{group}.png", f"{spec.dataset} · group {group}",
                           f"best validation {spec.objective}")
        plots.append(path)
        lines.append(f"![{group}]({path.name})")
    lines += ["", f"## Test {spec.objective} of each tuner's best configuration", "",
              "| group | tuner | mean over seeds | per seed | trials used | trials to beat default +{:.0%} (median) | trial seconds | LLM seconds | LLM tokens |".format(spec.reach),
              "|---|---|---|---|---|---|---|---|---|"]
    for group in labels:
        for tuner in TUNERS:
            mine = [r for r in runs if r.tuner == tuner and r.group == group]
            reach = [trials_to_reach(r.curve, spec.reach) for r in mine]
            reached = [x for x in reach if x is not None]
            lines.append(f"| {group} | {tuner} | {np.mean([r.test for r in mine]):.5f} | {', '.join(f'{r.test:.4f}' for r in mine)} | {', '.join(str(len(r.curve)) for r in mine)} | "
                         f"{(str(int(np.median(reached))) + f' ({len(reached)}/{len(mine)} seeds)') if reached else 'never'} | "
                         f"{sum(r.trial_seconds for r in mine):.0f} | {sum(r.llm_seconds for r in mine):.0f} | {sum(r.tokens for r in mine)} |")
    lines += ["", "Seconds and tokens are summed over the seeds; a session's LLM seconds and tokens, model selection "
              "included, are split evenly over its groups. The agent runs first in each seed, so the models it trains "
              "(trial 0's included) are in the cache when the baselines need them: compare trial seconds with that in mind."]
    lines += ["", "## Paired differences on test (LLM − baseline, same group and seed)", "",
              "95% bootstrap interval over the seeds (for all groups, the seeds are resampled whole) and the exact "
              "sign-flip p-value.", "",
              "| baseline | group | mean difference | interval | p | LLM better / tied / worse |", "|---|---|---|---|---|---|"]
    for baseline in ("tpe", "random"):
        for group in [*labels, "all groups"]:
            pairs = [(r.test - b.test, r.seed) for r in runs if r.tuner == "llm" and (group == "all groups" or r.group == group)
                     for b in runs if b.tuner == baseline and b.group == r.group and b.seed == r.seed]
            differences, seeds = np.array([d for d, _ in pairs]), np.array([seed for _, seed in pairs])
            low, high = bootstrap_interval(differences, clusters=seeds) if len(set(seeds)) > 1 else (float("nan"), float("nan"))
            lines.append(f"| {baseline} | {group} | {differences.mean():+.5f} | [{low:+.5f}, {high:+.5f}] | {sign_flip_p(differences, seeds):.3f} | "
                         f"{int((differences > 1e-12).sum())} / {int((np.abs(differences) <= 1e-12).sum())} / {int((differences < -1e-12).sum())} |")
    if tables:
        table, selection = tables
        lines += ["", f"## Model selection (RQ1): default configuration per group × pipeline, validation, seed {spec.seeds[0]}", "",
                  "| group | " + " | ".join(next(iter(table.values()))) + " | LLM picks (over seeds) | argmax |", "|---|" + "---|" * (len(next(iter(table.values()))) + 2)]
        for group, pipelines in table.items():
            lines.append(f"| {group} | " + " | ".join(f"{m['objective']:.5f}" for m in pipelines.values()) +
                         f" | {_picks(runs, group)} | {selection[group]['argmax']} |")
    if tables and len(labels) > 1:
        pipeline = tables[1][labels[0]]["argmax"]
        users, values = runner.per_user(TrialSpec(spec.dataset, spec.groups, "all", pipeline, {}, spec.seeds[0], spec.objective))
        lines += ["", f"Are the groups distinguishable? Per-user validation {spec.objective} of {pipeline} (default), "
                  f"mean and 95% bootstrap interval per group, and a permutation test of the between-group variance "
                  f"({PERMUTATIONS} random relabellings of the users):", "",
                  f"- {spec.groups}: " + distinguishability(values, runner.groups.codes[users], labels)]
        if not spec.groups.startswith("prefix"):
            try:  # the paper's id-prefix groups, on the same per-user values, for reference
                prefix = make_groups(runner.dataset, "prefix")
                lines.append("- prefix (user-id letters): " + distinguishability(values, prefix.codes[users], list(prefix.labels)))
            except RectuneError as error:
                lines.append(f"- prefix: not available ({error})")
    text = "\n".join(lines) + "\n"
    path = report_dir / f"{spec.name}.md"
    path.write_text(text)
    if tracker is not None:
        with tracker.session(spec.dataset, name=spec.name, tuner="compare", params={"budget": spec.budget, "seeds": list(spec.seeds),
                                                                                     "objective": spec.objective, "groups": spec.groups}) as session:
            session.log_session_artifact(text, "comparison.md")
            for plot in plots:
                session.client.log_artifact(session.run_id, str(plot))
    echo(f"[compare] report: {path}")
    return path
