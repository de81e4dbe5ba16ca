"""Tables and the session report, rendered from the state: what the LLM, the terminal and
the report read. Nothing here runs a trial or calls the LLM."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rectune.tools.adoption import Adoption
from rectune.tools.noise import Interval
from rectune.tools.trial import changed, spent

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


def outcome(record: "TrialRecord | None") -> str:
    """A trial's objective as the terminal shows it, or why it produced none."""
    if record is None:
        return "none yet"
    return f"{record.objective:.5f}" if record.state == "complete" else f"failed ({record.error})"


def history_table(history: list["TrialRecord"], defaults: dict, objective: str, latency: bool = True) -> str:
    """Every trial of a group as the LLM sees it; rejected and failed proposals included, so
    that none is offered again. A pipeline with a ranker also shows its recall stage's
    candidate recall@K — whether K or the ranker limits the list — and the ranker's loss
    after each epoch on its training and validation lists — whether it under- or overfits:
    what TPE cannot see. `latency`: the measured ms per user, which differ from run to run."""
    stage = any(_candidate_recall(r) is not None for r in history)
    curves = any(r.result is not None and r.result.ranker_curve for r in history)
    extra = ((" candidate recall@K |" if stage else "") + (" ranker loss by epoch (train/val) |" if curves else "")
             + (" latency ms/user |" if latency else ""))
    lines = [f"| trial | tuner | changes from default | {objective} | recall@20 |{extra} vs best |",
             "|---|---|---|---|---|---|" + "---|" * (stage + curves + latency)]
    for record in history:
        changes = json_compact(changed(record.params, defaults)) or "(default)"
        blanks = " | -" * (2 + stage + curves + latency)
        if record.state == "rejected":
            outcome = f"rejected by a person: {cell(record.comment)}{blanks}"
        elif record.state != "complete" or record.result is None:
            outcome = f"failed: {cell(record.error)}{blanks}"
        else:
            recall = record.result.metrics.get(record.result.spec.group, {}).get("recall@20", 0.0)
            candidates = f" {_candidate_recall(record) or 0.0:.4f} |" if stage else ""
            if curves:
                candidates += f" {_curve(record.result.ranker_curve)} |"
            # vs best: this trial minus the best before it, paired over the users, 95% interval.
            versus = "-" if record.result.vs_best is None else Interval.from_json(record.result.vs_best).text()
            if latency:
                over = "" if record.feasible else " (over the latency budget)"
                candidates += f" {record.result.latency_ms_per_user:.3f}{over} |"
            outcome = f"{record.objective:.5f} | {recall:.5f} |{candidates} {versus}"
        lines.append(f"| {record.number} | {_tuner(record)} | {changes} | {outcome} |")
    return "\n".join(lines)


def _tuner(record: "TrialRecord") -> str:
    """Who proposed a trial, and how: `llm (neighbour)`, `llm (tpe, fallback)`, `llm (own)` for its own change."""
    source = record.meta.get("source")
    if not source:
        return record.tuner
    return f"{record.tuner} ({source}{', fallback' if record.meta.get('fallback') else ''})"


def _curve(points: list[dict] | None) -> str:
    """`5.986/5.896, 5.803/5.747`: the ranker's training/validation loss after each epoch."""
    def short(value):
        return "-" if value is None else f"{value:.3f}".lstrip("0")
    return ", ".join(f"{short(p['train_loss'])}/{short(p.get('val_loss'))}" for p in points or []) or "-"


def _candidate_recall(record: "TrialRecord") -> float | None:
    if record.result is None:
        return None
    metrics = record.result.metrics.get(record.result.spec.group, {})
    return next((value for name, value in metrics.items() if name.startswith("candidate_recall@")), None)


def _adoption_sentence(adoption: "Adoption") -> str:
    """What the session report says of the adopted configuration, with the gain over the default on validation."""
    gain = "" if adoption.gain is None else f" ({adoption.gain.text()} on validation)"
    if adoption.best_is_default:
        return "; no trial beat the default on validation"
    if adoption.kept_default:
        return f"; the default is kept: {adoption.reason}{gain}"
    return f"; trial {adoption.record.number} is adopted: {adoption.reason}{gain}"


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
    wall = time.time() - state["began_at"] - state.get("waited", 0.0) if state.get("began_at") else 0.0
    waits = ", waits for a person excluded" if state.get("waited") else ""
    share = f" ({seconds / wall:.0%} of the {wall:.0f} s since model selection began{waits})" if wall > 0 else ""
    return (f"LLM: {calls} calls, {refused} refused ({(calls - refused) / max(calls, 1):.0%} valid), {seconds:.1f} s{share}, "
            f"{prompt} prompt tokens ({prompt / max(calls, 1):.0f} a call; {cached} read from the endpoint's prompt cache, "
            f"{cached / max(prompt, 1):.0%}) + {usage.get('output_tokens', 0)} completion tokens. "
            f"Trials: {trial_seconds:.1f} s of training and evaluation.")


def session_report(settings: "Settings", state: dict, histories: dict[str, list["TrialRecord"]],
                   adoptions: dict[str, Adoption | None], tests: dict[str, dict[str, dict]], defaults: dict[str, dict],
                   selection_tables: str = "") -> str:
    """The session's markdown report. `adoptions`: group → what tools.adoption.adopt made of its
    history; `tests`: group → {default, best, adopted} → test metrics;
    `defaults`: group → its pipeline's default configuration; `selection_tables`: the
    pipelines per group as the pick saw them."""
    rows, lines, gains = [], [], []
    # @20 is computed for every configuration, whatever its TopN: compare there.
    names = list(dict.fromkeys([settings.objective, "recall@20", "ndcg@20", "precision@20", "hitrate@20"]))
    for group, history in histories.items():
        choice, adoption = state["selection"][group], adoptions[group]
        used = spent(history)
        if adoption is None:
            rows.append(f"| {cell(group)} | {choice['pipeline']} | {settings.objective} | – | – | no trial produced a number |")
            lines.append(f"- **{cell(group)}**: {choice['pipeline']}: none of its {used} trials produced a number "
                         f"(trial 0: {cell(history[0].error) if history else '?'}); stopped by {state['finished'].get(group, '?')}")
            continue
        for name in names:
            before, best, after = (tests[group][label].get(name, float("nan")) for label in ("default", "best", "adopted"))
            rows.append(f"| {cell(group)} | {choice['pipeline']} | {name} | {before:.5f} | {best:.5f} | {after:.5f} | "
                        f"{after - before:+.5f} |")
        best, default, gain = adoption.best, adoption.default, adoption.gain
        moves = json_compact(changed(best.params, defaults[group])) or "the default"
        lines.append(f"- **{cell(group)}**: {choice['pipeline']} ({cell(choice['reason'])}); best trial {best.number} of "
                     f"{used} ({moves}); stopped by {state['finished'].get(group, '?')}" + _adoption_sentence(adoption))
        if gain is not None:
            verdict = "(the default is the best)" if adoption.best_is_default else "yes" if gain.within_noise else "no"
            gains.append(f"| {cell(group)} | {choice['pipeline']} | {default.objective:.5f} | {best.objective:.5f} | "
                         f"{gain.text()} | {verdict} | {'the default' if adoption.kept_default else f'trial {adoption.record.number}'} |")
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
        *([f"## Validation {settings.objective}: default vs best, paired over the group's users", "",
           "Gain = best − default per user, averaged, with its 95% bootstrap interval over the users; within noise = "
           "the interval holds 0. The best is adopted only when its gain is more than noise; otherwise the default is "
           "kept (a best of several noisy trials within noise of the default tended to fall below it on test).", "",
           "| group | pipeline | default | best | gain [95% interval] | within noise | adopted |", "|---|---|---|---|---|---|---|",
           *gains, ""] if gains else []),
        "## Test split: default vs adopted configuration", "",
        "The best on validation is shown whether adopted or not; change = adopted − default.", "",
        "| group | pipeline | metric | default | best | adopted | change |", "|---|---|---|---|---|---|---|", *rows, "",
        usage_line(state, histories),
    ])
