"""Tables and the session report, rendered from the state: what the LLM, the terminal and
the report read. Nothing here runs a trial or calls the LLM."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rectune.tools.noise import Interval, paired_interval, vector
from rectune.tools.trial import canonical

if TYPE_CHECKING:
    from rectune.agent.context import Settings
    from rectune.tools.trial import TrialRecord


def json_compact(values: dict) -> str:
    """`name=value, …`, floats to 4 significant digits: a sampler's 0.3466940954843356 costs the
    LLM a dozen tokens per mention and says nothing more than 0.3467."""
    return ", ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in values.items())


def cell(text: str) -> str:
    """Text inside a markdown table cell: on one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def metrics_row(metrics: dict, objective: str, top_n: int) -> dict:
    """The few metrics the LLM and the tables show, rounded."""
    names = [objective, "recall@20", "ndcg@20", f"precision@{top_n}", f"recall@{top_n}", f"f1@{top_n}"]
    return {name: round(float(metrics[name]), 5) for name in dict.fromkeys(names) if name in metrics}


def best_record(history: list["TrialRecord"]) -> "TrialRecord | None":
    """The best complete trial that met the latency budget; a slower one only when none did."""
    done = [r for r in history if r.state == "complete" and r.objective is not None]
    return max(done, key=lambda r: (r.feasible, r.objective), default=None)


def default_record(history: list["TrialRecord"], defaults: dict) -> "TrialRecord | None":
    """The complete trial of the default configuration (trial 0 of every study), if any."""
    return next((r for r in history if r.state == "complete" and canonical(r.params) == canonical(defaults)), None)


def gain_over_default(history: list["TrialRecord"], defaults: dict, seed: int) -> Interval | None:
    """The best trial minus the default configuration on validation, paired over the group's
    users; None when either was not run to completion or has no per-user values (a ledger
    written before they were kept, or an objective such as coverage that has none)."""
    best, default = best_record(history), default_record(history, defaults)
    if best is None or default is None or best.result.per_user is None or default.result.per_user is None:
        return None
    return paired_interval(vector(best.result.per_user), vector(default.result.per_user), seed=seed)


def outcome(record: "TrialRecord | None") -> str:
    """A trial's objective as the terminal shows it, or why it produced none."""
    if record is None:
        return "none yet"
    return f"{record.objective:.5f}" if record.state == "complete" else f"failed ({record.error})"


def history_table(history: list["TrialRecord"], defaults: dict, objective: str) -> str:
    """Every trial of a group as the LLM sees it; rejected and failed proposals included, so
    that none is offered again. A pipeline with a ranker also shows its recall stage's
    candidate recall@K — whether K or the ranker limits the list, which TPE cannot see."""
    stage = any(_candidate_recall(r) is not None for r in history)
    extra = " candidate recall@K |" if stage else ""
    lines = [f"| trial | tuner | changes from default | {objective} | recall@20 |{extra} latency ms/user | vs best |",
             "|---|---|---|---|---|---|---|" + ("---|" if stage else "")]
    for record in history:
        changes = json_compact({k: v for k, v in record.params.items() if defaults.get(k) != v}) or "(default)"
        blanks = " | -" * (3 + stage)
        if record.state == "rejected":
            outcome = f"rejected by a person: {cell(record.comment)}{blanks}"
        elif record.state != "complete" or record.result is None:
            outcome = f"failed: {cell(record.error)}{blanks}"
        else:
            over = "" if record.feasible else " (over the latency budget)"
            recall = record.result.metrics.get(record.result.spec.group, {}).get("recall@20", 0.0)
            candidates = f" {_candidate_recall(record) or 0.0:.4f} |" if stage else ""
            # vs best: this trial minus the best before it, paired over the users, 95% interval.
            versus = "-" if record.result.vs_best is None else Interval.from_json(record.result.vs_best).text()
            outcome = f"{record.objective:.5f} | {recall:.5f} |{candidates} {record.result.latency_ms_per_user:.3f}{over} | {versus}"
        lines.append(f"| {record.number} | {_tuner(record)} | {changes} | {outcome} |")
    return "\n".join(lines)


def _tuner(record: "TrialRecord") -> str:
    """Who proposed a trial, and how: `llm (neighbour)`, `llm (tpe, fallback)`, `llm (own)` for its own change."""
    source = record.meta.get("source")
    if not source:
        return record.tuner
    return f"{record.tuner} ({source}{', fallback' if record.meta.get('fallback') else ''})"


def _candidate_recall(record: "TrialRecord") -> float | None:
    if record.result is None:
        return None
    metrics = record.result.metrics.get(record.result.spec.group, {})
    return next((value for name, value in metrics.items() if name.startswith("candidate_recall@")), None)


def _noise_sentence(gain: Interval | None, best_is_default: bool) -> str:
    """What the session report says of the tuned configuration's gain over the default on validation."""
    if gain is None:
        return ""
    if best_is_default:
        return "; no trial beat the default on validation"
    verdict = "is within noise" if gain.within_noise else "is more than noise" if gain.diff > 0 else "is a loss beyond noise"
    return f"; on validation, the gain over the default, {gain.text()}, {verdict}"


def selection_table(selection: dict, objective: str) -> str:
    """The paper's check per group: the pick beside what the objective, and F1@TopN, would pick."""
    lines = [f"| group | pipeline | chosen by | {objective} argmax | agrees | F1@TopN argmax | agrees | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for group, choice in selection.items():
        # Sessions checkpointed before the noise band have no chosen_by: the LLM picked, or its fallback did.
        by = choice.get("chosen_by") or ("llm" if choice["llm"] else "fallback")
        by = {"llm": "LLM", "rule": "rule: alone within noise"}.get(by, by)
        lines.append(f"| {group} | {choice['pipeline']} | {by} | {choice['argmax']} | "
                     f"{'yes' if choice['agrees'] else 'no'} | {choice['f1_argmax']} | {'yes' if choice['f1_agrees'] else 'no'} | "
                     f"{cell(choice['reason'])} |")
    return "\n".join(lines)


def usage_line(state: dict, histories: dict[str, list["TrialRecord"]]) -> str:
    """LLM calls (the pick's included), how many were refused, seconds and tokens; trial seconds."""
    usage = state.get("usage") or {}
    trial_seconds = sum(r.result.train_seconds + r.result.eval_seconds
                        for rows in histories.values() for r in rows if r.result is not None)
    calls = sum(state.get("llm_calls", {}).values())
    refused = sum(state.get("invalid_calls", {}).values())
    prompt, cached, seconds = usage.get("input_tokens", 0), usage.get("cached_tokens", 0), usage.get("seconds", 0.0)
    wall = time.time() - state["began_at"] if state.get("began_at") else 0.0
    share = f" ({seconds / wall:.0%} of the {wall:.0f} s since model selection began)" if wall > 0 else ""
    return (f"LLM: {calls} calls, {refused} refused ({(calls - refused) / max(calls, 1):.0%} valid), {seconds:.1f} s{share}, "
            f"{prompt} prompt tokens ({prompt / max(calls, 1):.0f} a call; {cached} read from the endpoint's prompt cache, "
            f"{cached / max(prompt, 1):.0%}) + {usage.get('output_tokens', 0)} completion tokens. "
            f"Trials: {trial_seconds:.1f} s of training and evaluation.")


def session_report(settings: "Settings", state: dict, histories: dict[str, list["TrialRecord"]],
                   tests: dict[str, dict[str, dict]], defaults: dict[str, dict], selection_tables: str = "") -> str:
    """The session's markdown report. `tests`: group → {default, tuned} → test metrics;
    `defaults`: group → its pipeline's default configuration; `selection_tables`: the
    pipelines per group as the pick saw them."""
    rows, lines, gains = [], [], []
    # @20 is computed for every configuration, whatever its TopN: compare there.
    names = list(dict.fromkeys([settings.objective, "recall@20", "ndcg@20", "precision@20", "hitrate@20"]))
    for group, history in histories.items():
        choice, best = state["selection"][group], best_record(history)
        spent = sum(1 for r in history if r.state in ("complete", "failed"))
        if best is None:
            rows.append(f"| {cell(group)} | {choice['pipeline']} | {settings.objective} | – | – | no trial produced a number |")
            lines.append(f"- **{cell(group)}**: {choice['pipeline']}: none of its {spent} trials produced a number "
                         f"(trial 0: {cell(history[0].error) if history else '?'}); stopped by {state['finished'].get(group, '?')}")
            continue
        for name in names:
            before, after = tests[group]["default"].get(name, float("nan")), tests[group]["tuned"].get(name, float("nan"))
            rows.append(f"| {cell(group)} | {choice['pipeline']} | {name} | {before:.5f} | {after:.5f} | {after - before:+.5f} |")
        changed = json_compact({k: v for k, v in best.params.items() if defaults[group].get(k) != v}) or "the default"
        default, gain = default_record(history, defaults[group]), gain_over_default(history, defaults[group], settings.seed)
        lines.append(f"- **{cell(group)}**: {choice['pipeline']} ({cell(choice['reason'])}); best trial {best.number} of "
                     f"{spent} ({changed}); stopped by {state['finished'].get(group, '?')}" + _noise_sentence(gain, best is default))
        if gain is not None:
            verdict = "(the default is the best)" if best is default else "yes" if gain.within_noise else "no"
            gains.append(f"| {cell(group)} | {choice['pipeline']} | {default.objective:.5f} | {best.objective:.5f} | "
                         f"{gain.text()} | {verdict} |")
    return "\n".join([
        f"# rectune session {settings.session}", "",
        f"Dataset {settings.dataset}, groups {settings.groups}, objective {settings.objective} (tuned on validation), "
        f"budget {settings.budget} trials per group, seed {settings.seed}, approval {settings.approve}.", "",
        "## Model selection (validation, default configurations)", "",
        *([selection_tables, ""] if selection_tables else []),
        selection_table(state["selection"], settings.objective), "",
        "## Pipelines and tuning", "", *lines, "",
        *(line for group, history in histories.items() for line in (
            f"### What was tried on {cell(group)}", "", history_table(history, defaults[group], settings.objective), "")),
        *([f"## Validation {settings.objective}: default vs tuned, paired over the group's users", "",
           "Gain = tuned − default per user, averaged, with its 95% bootstrap interval over the users; within noise = "
           "the interval holds 0.", "",
           "| group | pipeline | default | tuned | gain [95% interval] | within noise |", "|---|---|---|---|---|---|",
           *gains, ""] if gains else []),
        "## Test split: default vs tuned configuration", "",
        "| group | pipeline | metric | default | tuned | change |", "|---|---|---|---|---|---|", *rows, "",
        usage_line(state, histories),
    ])
