"""Is the LLM worth it? Any list of tuners (`--tuners llm,tpe,random,local`) on equal terms.

Per seed, the LLM agent's model selection (the graph's select and pick steps, checkpointed)
picks a pipeline per group, unless `--pipeline` fixes one for every group (a pipeline whose
default is far from its optimum is where tuners can differ); every tuner then tunes that pipeline on that group with the
same search space, objective, budget, seed and first trial (the default configuration),
through the one study loop (tools.study.run_study) and ledger. Every curve is read from
the ledger. Everything is resumable: the picks continue from their checkpoint, the
studies from the ledger. The report compares best-so-far validation curves, test metrics
of each tuner's adopted configuration (its best only when that beats the default beyond noise,
tools/adoption.py; paired by seed, bootstrap intervals; the ungated bests beside them), trials needed to
beat the default by a margin, in how many seeds each tuner's gain over the default on
validation is within noise (paired over the group's users), and wall time and tokens.
"""

from __future__ import annotations

import itertools
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rectune.agent import proposer as _registers_llm  # noqa: F401 — `llm` is a tuner once this module is loaded
from rectune.agent.context import Resources, Settings
from rectune.models.errors import ConfigError, RectuneError
from rectune.models.groups import make_groups
from rectune.tools.adoption import adopt
from rectune.tools.noise import Interval
from rectune.tools.plots import best_so_far
from rectune.tools.runner import TrialRunner
from rectune.tools.trial import canonical

BOOTSTRAP_SAMPLES = 5000
PERMUTATIONS = 1000
EXACT_SIGN_FLIPS_UP_TO = 16


@dataclass(frozen=True)
class Comparison:
    """A comparison: the agent's settings (its session name is the comparison's name) and what varies."""

    settings: Settings
    """Dataset, groups, objective, budget, stores, LLM; `may_finish` says whether the agent may stop a group early."""
    seeds: tuple[int, ...]
    tuners: tuple[str, ...] = ("llm", "menu", "tpe", "random")
    """Registered proposers (tools.proposers), each run on every group and seed."""
    reach: float = 0.05
    """Report the trials each tuner needs to beat the default by this share."""
    checkpoint: str = "rectune-sessions.db"
    """Where the per-seed picks are checkpointed."""
    pipeline: str | None = None
    """Tune this pipeline on every group, with no model selection; None: the agent picks per group and seed."""

    @property
    def name(self) -> str:
        return self.settings.session

    def seed_settings(self, seed: int) -> Settings:
        return replace(self.settings, session=f"{self.name}-seed{seed}", seed=seed, approve="auto")


@dataclass
class Run:
    """One tuner's study of one group and seed, as read from the ledger."""

    tuner: str
    group: str
    seed: int
    pipeline: str
    curve: list[float]
    """Best validation objective so far, trial by trial (trial 0 = the default)."""
    adopted_params: dict
    """The best configuration when it beats the default beyond noise on validation, else the default (tools.adoption)."""
    best_params: dict
    trial_seconds: float
    llm_seconds: float = 0.0
    tokens: int = 0
    test: float = float("nan")
    """Test objective of the adopted configuration."""
    best_test: float = float("nan")
    """Test objective of the best configuration, adopted or not."""
    gain: Interval | None = None
    """The best minus the default on validation, paired over the group's users (None without per-user values)."""
    adopted_trial: int = 0
    """The adopted trial's number: 0 (the default, every tuner's first trial) unless a tuned trial beat it beyond noise."""


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
    """The first trial whose best-so-far beats the default (trial 0) by `share`, or None."""
    target = curve[0] * (1 + share)
    return next((i for i, value in enumerate(curve) if value >= target), None)


def curve_of(history) -> list[float]:
    """Best objective so far after each trial that counted (a failed trial keeps the best where it was)."""
    values = [r.objective if r.state == "complete" else float("-inf") for r in history if r.state in ("complete", "failed")]
    return np.maximum.accumulate(values).tolist() if values else []


def compare(spec: Comparison, echo=print, report_dir: Path = Path("reports"), tracker=None) -> Path:
    """Run (or continue) every tuner on every group and seed, then write the report."""
    from rectune.models.pipeline import PIPELINES
    from rectune.tools.proposers import PROPOSERS

    unknown = [t for t in spec.tuners if t not in PROPOSERS]
    if unknown or not spec.tuners:
        raise ConfigError(f"--tuners must name registered tuners {sorted(PROPOSERS)}, but got {list(spec.tuners)}")
    settings = spec.settings
    if spec.pipeline is not None and spec.pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline must be one of {list(PIPELINES)}, but got {spec.pipeline!r}")
    runner = TrialRunner.open(settings.dataset, settings.groups, data_dir=settings.data_dir, cache_dir=settings.cache_dir,
                              max_latency_ms=settings.max_latency_ms)
    fixed = {"selection": {group: {"pipeline": spec.pipeline} for group in runner.groups.labels}}
    runs, selections, table = [], [], None
    with ExitStack() as stack:
        # The LLM starts when a pick or a study first needs it, and stops with the comparison.
        found = Resources(runner, _LazyLLM(stack, settings, echo), None, echo, report_dir)
        for seed in spec.seeds:
            if spec.pipeline is None:
                values = _pick(spec, seed, found)
                table = table or values["table"]
                selections.append(values["selection"])
            else:
                values = fixed
            for group in runner.groups.labels:
                for tuner in spec.tuners:
                    # Each tuner carries its own bests from group to group (the menu and tpe-warm read them).
                    earlier = [(r.group, r.best_params) for r in runs if (r.seed, r.tuner, r.pipeline) ==
                               (seed, tuner, values["selection"][group]["pipeline"])]
                    runs.append(_tune(spec, seed, group, tuner, values, found, tracker, tuple(earlier)))
    tested: dict[tuple, float] = {}  # most tuners keep the default: evaluate each configuration once
    for item in runs:
        context = spec.seed_settings(item.seed).study_context(item.group, item.pipeline)
        for params in (item.adopted_params, item.best_params):
            key = (item.seed, item.group, item.pipeline, canonical(params))
            if key not in tested:
                result = runner.run(context.spec(params), report_test=True)
                tested[key] = float(result.test_metrics[item.group][result.metric])
        item.test, item.best_test = (tested[(item.seed, item.group, item.pipeline, canonical(p))]
                                     for p in (item.adopted_params, item.best_params))
    return _report(spec, runs, (table, selections) if table else None, runner, report_dir, tracker, echo)


class _LazyLLM:
    """The chat model, started the first time something binds it (a finished comparison never does)."""

    def __init__(self, stack: ExitStack, settings: Settings, echo):
        self.stack, self.settings, self.echo, self.model = stack, settings, echo, None

    def bind_tools(self, *args, **kwargs):
        if self.model is None:
            from rectune.agent.llm import resolve_llm
            from rectune.agent.session import llm_client

            endpoint = resolve_llm(self.settings.llm_base_url, self.settings.llm_model)
            self.model = self.stack.enter_context(llm_client(endpoint, self.settings.cache_dir, self.echo))
        return self.model.bind_tools(*args, **kwargs)


def _pick(spec: Comparison, seed: int, found: Resources) -> dict:
    """The seed's model selection: the graph's select and pick steps, checkpointed (run once)."""
    from rectune.agent.graph import build_pick_graph
    from rectune.agent.session import checkpointer

    settings = spec.seed_settings(seed)
    config = {"configurable": {"thread_id": f"{settings.session}-pick"}}
    with checkpointer(spec.checkpoint) as saver:
        graph = build_pick_graph(saver)
        saved = graph.get_state(config)
        if saved.values.get("selection") is not None and not saved.next:
            return saved.values
        found.echo(f"[compare] seed {seed}: model selection")
        graph.invoke(None if saved.next else {"settings": settings.to_json()}, config, context=found, durability="sync")
        return graph.get_state(config).values


def _tune(spec: Comparison, seed: int, group: str, tuner: str, values: dict, found: Resources, tracker,
          transfers: tuple[tuple[str, dict], ...] = ()) -> Run:
    """One tuner's study of one group and seed, run or continued to its budget; read from the ledger.
    `transfers`: the tuner's best configurations on the groups before this one."""
    from rectune.tools.baseline import run_baseline
    from rectune.tools.proposers import make_proposer, unattended
    from rectune.tools.study import Study

    settings = spec.seed_settings(seed)
    pipeline = values["selection"][group]["pipeline"]
    context = settings.study_context(group, pipeline, tuner)
    name = f"{spec.name}-{tuner}-{group}-seed{seed}"
    found.echo(f"[compare] seed {seed}: {tuner} on {group} ({pipeline})")
    if unattended(tuner):
        study = run_baseline(context, found.runner, settings.storage, name, tracker, progress=False, transfers=transfers)
    else:
        study = Study.open(settings.storage, name, context)
        stopped = study.optuna.user_attrs.get("finished")
        if study.spent() < context.budget and not stopped:
            proposer = make_proposer(tuner, seed=0, llm=found.llm, may_finish=settings.may_finish, echo=found.echo)
            _run_attended(study, proposer, found, tracker, transfers)
    history = study.history()
    adoption = adopt(history, found.runner.space.defaults(pipeline), seed)
    if adoption is None:
        raise RectuneError(f"{tuner} on group {group} (seed {seed}): no trial produced a number "
                           f"({next((r.error for r in history if r.error), 'no trial ran')}); nothing to compare")
    meta = [r.meta for r in history if r.tuner == tuner]
    # The LLM's model selection, split evenly over the groups, counts in its rows.
    pick = {k: v / len(found.runner.groups.labels) for k, v in (values.get("usage") or {}).items()} if tuner == "llm" else {}
    return Run(tuner, group, seed, pipeline, curve_of(history), adoption.record.params, adoption.best.params,
               sum(r.result.train_seconds + r.result.eval_seconds for r in history if r.result is not None),
               sum(m.get("llm_seconds", 0.0) for m in meta) + pick.get("seconds", 0.0),
               int(sum(m.get("input_tokens", 0) + m.get("output_tokens", 0) for m in meta)
                   + pick.get("input_tokens", 0) + pick.get("output_tokens", 0)),
               gain=adoption.gain, adopted_trial=adoption.record.number)


def _run_attended(study, proposer, found: Resources, tracker, transfers: tuple[tuple[str, dict], ...]) -> None:
    """run_study for a tuner that needs more than the study (the LLM); a Finish is kept in the
    ledger, so a continued comparison does not ask it again."""
    from rectune.tools.baseline import study_session
    from rectune.tools.study import run_study

    with study_session(tracker, study, study.context.tuner) as session:
        if session is not None:
            study.optuna.set_user_attr("mlflow_run_id", session.run_id)
        run_study(study, proposer, found.runner, session, progress=False, transfers=transfers)
    if proposer.finished:
        study.optuna.set_user_attr("finished", proposer.finished)


def _picks(selections: list[dict], group: str) -> str:
    """The pipelines picked for `group` over the seeds, and who decided: `heuristic ×4 (rule 3, LLM 1)`."""
    chosen = [s[group] for s in selections]
    counts, deciders = Counter(c["pipeline"] for c in chosen), Counter(c.get("chosen_by", "llm") for c in chosen)
    by = ", ".join(f"{'LLM' if who == 'llm' else who} {n}" for who, n in deciders.most_common())
    return ", ".join(f"{pipeline} ×{n}" for pipeline, n in counts.most_common()) + f" ({by})"


def _curves(spec: Comparison, runs: list[Run], labels: list[str], report_dir: Path) -> tuple[list[str], list[Path]]:
    budget = spec.settings.budget
    lines, plots = ["## Best-so-far validation objective", ""], []
    for group in labels:
        # A tuner may finish before its budget: its best then stays where it was.
        curves = {tuner: [(r.curve + r.curve[-1:] * (budget - len(r.curve)))[:budget]
                          for r in runs if r.tuner == tuner and r.group == group] for tuner in spec.tuners}
        path = best_so_far(curves, report_dir / f"{spec.name}-{group}.png", f"{spec.settings.dataset} · group {group}",
                           f"best validation {spec.settings.objective}")
        plots.append(path)
        lines.append(f"![{group}]({path.name})")
    return lines, plots


def _tests(spec: Comparison, runs: list[Run], labels: list[str]) -> list[str]:
    lines = ["", f"## Test {spec.settings.objective} of each tuner's adopted configuration", "",
             "A tuner's best on validation is adopted only when its gain over the default is more than noise (paired "
             "over the group's users, tools/adoption.py); otherwise the default is kept. The best's own test value, "
             "adopted or not, is beside it.", "",
             f"| group | tuner | mean over seeds | per seed | tuned trial adopted | best's mean (ungated) | trials used | "
             f"trials to beat default +{spec.reach:.0%} (median) | trial seconds | LLM seconds | LLM tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for group in labels:
        for tuner in spec.tuners:
            mine = [r for r in runs if r.tuner == tuner and r.group == group]
            reached = [x for x in (trials_to_reach(r.curve, spec.reach) for r in mine) if x is not None]
            lines.append(f"| {group} | {tuner} | {np.mean([r.test for r in mine]):.5f} | {', '.join(f'{r.test:.4f}' for r in mine)} | "
                         f"{sum(r.adopted_trial != 0 for r in mine)}/{len(mine)} | "
                         f"{np.mean([r.best_test for r in mine]):.5f} | {', '.join(str(len(r.curve)) for r in mine)} | "
                         f"{(str(int(np.median(reached))) + f' ({len(reached)}/{len(mine)} seeds)') if reached else 'never'} | "
                         f"{sum(r.trial_seconds for r in mine):.0f} | {sum(r.llm_seconds for r in mine):.0f} | {sum(r.tokens for r in mine)} |")
    return lines + ["", "Seconds and tokens are summed over the seeds; the LLM's model selection (its seconds split evenly "
                    "over the groups) is counted in the llm rows. Tuners run in the order listed, so the models the first "
                    "trains (trial 0's included) are in the cache when the others need them: compare trial seconds with "
                    "that in mind."]


def _noise(spec: Comparison, runs: list[Run], labels: list[str]) -> list[str]:
    """Per tuner and group: how many seeds' tuned best beat the default by no more than noise."""
    lines = ["", f"## Gain of each tuner's best over the default on validation {spec.settings.objective}", "",
             "Best − default, paired over the group's validation users, with its 95% bootstrap interval over the users; "
             "within noise = the interval holds 0 (a tuner whose best is the default gains +.0000 within noise).", "",
             "| group | tuner | mean gain | within noise | per seed |", "|---|---|---|---|---|"]
    for group in labels:
        for tuner in spec.tuners:
            gains = [r.gain for r in runs if r.tuner == tuner and r.group == group and r.gain is not None]
            if gains:
                lines.append(f"| {group} | {tuner} | {np.mean([g.diff for g in gains]):+.5f} | "
                             f"{sum(g.within_noise for g in gains)}/{len(gains)} | {'; '.join(g.text() for g in gains)} |")
    return lines


def _differences(spec: Comparison, runs: list[Run], labels: list[str], ungated: bool = False) -> list[str]:
    """The first tuner (the LLM, by default) against each other one, paired by group and seed, on
    the adopted configurations — or, `ungated`, on the bests whether adopted or not."""
    first = spec.tuners[0]
    value = (lambda run: run.best_test) if ungated else (lambda run: run.test)
    title = (f"## Paired differences on test of the best configurations, ungated ({first} − other tuner)"
             if ungated else f"## Paired differences on test ({first} − other tuner, same group and seed)")
    note = (" For reference: what adopting every best, within noise or not, would have given." if ungated else
            " Adopted configurations (a best within noise of the default leaves the default).")
    lines = ["", title, "",
             "95% bootstrap interval over the seeds (for all groups, the seeds are resampled whole) and the exact "
             "sign-flip p-value." + note, "",
             f"| other tuner | group | mean difference | interval | p | {first} better / tied / worse |", "|---|---|---|---|---|---|"]
    for other in spec.tuners[1:]:
        for group in [*labels, "all groups"]:
            pairs = [(value(r) - value(b), r.seed) for r in runs if r.tuner == first and (group == "all groups" or r.group == group)
                     for b in runs if b.tuner == other and b.group == r.group and b.seed == r.seed]
            differences, seeds = np.array([d for d, _ in pairs]), np.array([seed for _, seed in pairs])
            if len(set(seeds)) > 1:
                low, high = bootstrap_interval(differences, clusters=seeds)
                interval = f"[{low:+.5f}, {high:+.5f}]"
            else:
                interval = "one seed: none"
            lines.append(f"| {other} | {group} | {differences.mean():+.5f} | {interval} | {sign_flip_p(differences, seeds):.3f} | "
                         f"{int((differences > 1e-12).sum())} / {int((np.abs(differences) <= 1e-12).sum())} / {int((differences < -1e-12).sum())} |")
    return lines


def _selection(spec: Comparison, tables, runner: TrialRunner, labels: list[str]) -> list[str]:
    table, selections = tables
    columns = next(iter(table.values()))
    lines = ["", f"## Model selection (RQ1): default configuration per group × pipeline, validation, seed {spec.seeds[0]}", "",
             "Over the seeds, how often the pick is within the noise band of the objective's argmax, is that argmax, and is "
             "the argmax of F1@TopN (each seed's own table).", "",
             "| group | " + " | ".join(columns) + " | picks over seeds (decided by) | argmax (seed "
             f"{spec.seeds[0]}) | pick within the argmax's noise band | pick = argmax | pick = F1@TopN argmax |",
             "|---|" + "---|" * (len(columns) + 5)]
    for group, pipelines in table.items():
        chosen = [s[group] for s in selections]
        tied = sum(bool(c.get("in_band", c["pipeline"] == c["argmax"])) for c in chosen)
        # Selections checkpointed before the F1 argmax was recorded say nothing about it.
        f1 = [c["pipeline"] == c["f1_argmax"] for c in chosen if "f1_argmax" in c]
        lines.append(f"| {group} | " + " | ".join(f"{m['objective']:.5f}" for m in pipelines.values()) +
                     f" | {_picks(selections, group)} | {chosen[0]['argmax']} | {tied}/{len(chosen)} | "
                     f"{sum(c['pipeline'] == c['argmax'] for c in chosen)}/{len(chosen)} | {sum(f1)}/{len(f1)} |")
    if len(labels) < 2:
        return lines
    pipeline = selections[0][labels[0]]["argmax"]
    context = spec.seed_settings(spec.seeds[0]).study_context("all", pipeline)
    users, values = runner.per_user(context.spec({}))
    lines += ["", f"Are the groups distinguishable? Per-user validation {spec.settings.objective} of {pipeline} (default), "
              f"mean and 95% bootstrap interval per group, and a permutation test of the between-group variance "
              f"({PERMUTATIONS} random relabellings of the users):", "",
              f"- {spec.settings.groups}: " + distinguishability(values, runner.groups.codes[users], labels)]
    if not spec.settings.groups.startswith("prefix"):
        try:  # the paper's id-prefix groups, on the same per-user values, for reference
            prefix = make_groups(runner.dataset, "prefix")
            lines.append("- prefix (user-id letters): " + distinguishability(values, prefix.codes[users], list(prefix.labels)))
        except RectuneError as error:
            lines.append(f"- prefix: not available ({error})")
    return lines


def _report(spec: Comparison, runs: list[Run], tables, runner: TrialRunner, report_dir: Path, tracker, echo) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    labels, settings = list(runner.groups.labels), spec.settings
    curves, plots = _curves(spec, runs, labels, report_dir)
    lines = [f"# Tuners compared — {spec.name}", "",
             f"Dataset {settings.dataset}, groups {settings.groups}, objective {settings.objective} on validation (tuning) and "
             f"test (reporting), budget {settings.budget} trials per group and tuner (trial 0 = the default configuration for "
             f"every tuner), tuners {', '.join(spec.tuners)}, seeds {list(spec.seeds)}, same search space and runner; "
             + (f"pipeline {spec.pipeline} on every group (fixed by --pipeline: no model selection); " if spec.pipeline else "")
             + "the agent "
             + ("could stop a group before its budget." if settings.may_finish else "had to use its whole budget (no finish tool)."),
             "", *curves, *_tests(spec, runs, labels), *_noise(spec, runs, labels), *_differences(spec, runs, labels),
             *_differences(spec, runs, labels, ungated=True)]
    if tables:
        lines += _selection(spec, tables, runner, labels)
    text = "\n".join(lines) + "\n"
    path = report_dir / f"{spec.name}.md"
    path.write_text(text)
    if tracker is not None:
        with tracker.session(settings.dataset, name=spec.name, tuner="compare", params={
                "budget": settings.budget, "seeds": list(spec.seeds), "objective": settings.objective, "groups": settings.groups,
                "tuners": list(spec.tuners), "pipeline": spec.pipeline or "picked per group"}) as session:
            session.log_session_artifact(text, "comparison.md")
            for plot in plots:
                session.client.log_artifact(session.run_id, str(plot))
    echo(f"[compare] report: {path}")
    return path
