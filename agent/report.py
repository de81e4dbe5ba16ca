"""Tables and the session report, rendered from the state: what the LLM, the terminal and
the report read. Nothing here runs a trial or calls the LLM."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rectune.agent.context import Settings
    from rectune.tools.trial import TrialRecord


def json_compact(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


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


def outcome(record: "TrialRecord | None") -> str:
    """A trial's objective as the terminal shows it, or why it produced none."""
    if record is None:
        return "none yet"
    return f"{record.objective:.5f}" if record.state == "complete" else f"failed ({record.error})"


def history_table(history: list["TrialRecord"], defaults: dict, objective: str) -> str:
    """Every trial of a group as the LLM sees it; rejected and failed proposals included, so
    that none is offered again."""
    lines = [f"| trial | tuner | changes from default | {objective} | recall@20 | latency ms/user |", "|---|---|---|---|---|---|"]
    for record in history:
        changes = json_compact({k: v for k, v in record.params.items() if defaults.get(k) != v}) or "(default)"
        if record.state == "rejected":
            outcome = f"rejected by a person: {cell(record.comment)} | - | -"
        elif record.state != "complete" or record.result is None:
            outcome = f"failed: {cell(record.error)} | - | -"
        else:
            over = "" if record.feasible else " (over the latency budget)"
            recall = record.result.metrics.get(record.result.spec.group, {}).get("recall@20", 0.0)
            outcome = f"{record.objective:.5f} | {recall:.5f} | {record.result.latency_ms_per_user:.3f}{over}"
        lines.append(f"| {record.number} | {record.tuner} | {changes} | {outcome} |")
    return "\n".join(lines)


def selection_table(selection: dict, objective: str) -> str:
    """The paper's check per group: the pick beside what the objective, and F1@TopN, would pick."""
    lines = [f"| group | pipeline | chosen by | {objective} argmax | agrees | F1@TopN argmax | agrees | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for group, choice in selection.items():
        lines.append(f"| {group} | {choice['pipeline']} | {'LLM' if choice['llm'] else 'fallback'} | {choice['argmax']} | "
                     f"{'yes' if choice['agrees'] else 'no'} | {choice['f1_argmax']} | {'yes' if choice['f1_agrees'] else 'no'} | "
                     f"{cell(choice['reason'])} |")
    return "\n".join(lines)


def table_rows(table: dict) -> str:
    """Model selection's metrics, one row per group and pipeline (the pick's prompt)."""
    rows = ["| group | pipeline | " + " | ".join(next(iter(next(iter(table.values())).values()))) + " |"]
    rows.append("|" + "---|" * (len(rows[0].split("|")) - 2))
    for group, pipelines in table.items():
        for pipeline, metrics in pipelines.items():
            rows.append(f"| {group} | {pipeline} | " + " | ".join(f"{v:.5f}" for v in metrics.values()) + " |")
    return "\n".join(rows)


def usage_line(state: dict, histories: dict[str, list["TrialRecord"]]) -> str:
    """LLM calls (the pick's included), how many were refused, seconds and tokens; trial seconds."""
    usage = state.get("usage") or {}
    trial_seconds = sum(r.result.train_seconds + r.result.eval_seconds
                        for rows in histories.values() for r in rows if r.result is not None)
    calls = sum(state.get("llm_calls", {}).values())
    refused = sum(state.get("invalid_calls", {}).values())
    return (f"LLM: {calls} calls, {refused} refused ({(calls - refused) / max(calls, 1):.0%} valid), "
            f"{usage.get('seconds', 0.0):.1f} s, {usage.get('input_tokens', 0)} prompt + {usage.get('output_tokens', 0)} "
            f"completion tokens. Trials: {trial_seconds:.1f} s of training and evaluation.")


def session_report(settings: "Settings", state: dict, histories: dict[str, list["TrialRecord"]],
                   tests: dict[str, dict[str, dict]], defaults: dict[str, dict]) -> str:
    """The session's markdown report. `tests`: group → {default, tuned} → test metrics;
    `defaults`: group → its pipeline's default configuration."""
    rows, lines = [], []
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
        lines.append(f"- **{cell(group)}**: {choice['pipeline']} ({cell(choice['reason'])}); best trial {best.number} of "
                     f"{spent} ({changed}); stopped by {state['finished'].get(group, '?')}")
    return "\n".join([
        f"# rectune session {settings.session}", "",
        f"Dataset {settings.dataset}, groups {settings.groups}, objective {settings.objective} (tuned on validation), "
        f"budget {settings.budget} trials per group, seed {settings.seed}, approval {settings.approve}.", "",
        "## Model selection (validation, default configurations)", "",
        selection_table(state["selection"], settings.objective), "",
        "## Pipelines and tuning", "", *lines, "",
        "## Test split: default vs tuned configuration", "",
        "| group | pipeline | metric | default | tuned | change |", "|---|---|---|---|---|---|", *rows, "",
        usage_line(state, histories),
    ])
