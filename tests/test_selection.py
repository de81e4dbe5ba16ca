"""Model selection's noise band (agent/selection.py): which pipelines tie, what the LLM may
pick, and what the rule decides alone. The session-level behaviour (no pick call when
nothing ties) is in tests/test_agent.py."""

from __future__ import annotations

import numpy as np
from langchain_core.messages import AIMessage

from rectune.agent.selection import decided, group_table, pick_tool, read_pick, tied
from rectune.tools.noise import paired_interval
from rectune.tools.space import SearchSpace

SPACE = SearchSpace.load()


def rows_from(per_user: dict[str, np.ndarray]) -> dict[str, dict]:
    """Selection rows as the select node builds them, from made-up per-user objectives."""
    best = max(per_user, key=lambda p: per_user[p].mean())
    return {p: {"objective": float(v.mean()), "f1@20": float(v.mean()) / 2, "fit_seconds": 1.0, "ms_per_user": 0.5,
                "vs_best": paired_interval(v, per_user[best], seed=0).to_json()} for p, v in per_user.items()}


def test_the_band_holds_the_pipelines_whose_paired_interval_contains_zero():
    rng = np.random.default_rng(0)
    base, noise = rng.random(3000), rng.normal(0, 0.05, 3000)
    rows = rows_from({
        "heuristic": base + 0.010,                                  # the best
        "two_tower": base + 0.009 + noise - noise.mean(),          # .001 below, noisy per user: within noise
        "heuristic+deepfm": base,                                # clearly worse: paired, the noise cancels
        "two_tower+deepfm": base - 0.02,
    })
    assert tied(rows)[0] == "heuristic"
    assert set(tied(rows)) == {"heuristic", "two_tower"}
    table = group_table("cold", rows, "ndcg@20")
    assert table.splitlines()[3].startswith("| heuristic | ") and "| best |" in table.splitlines()[3]
    assert "| heuristic+deepfm | " in table and "| no |" in table


def test_the_pick_tool_offers_only_the_band_and_refuses_anything_else():
    ties = {"cold": ["heuristic", "two_tower"], "heavy": ["two_tower+deepfm", "two_tower"]}
    schema = pick_tool(ties)["function"]["parameters"]
    assert schema["required"] == ["cold", "heavy"]
    assert schema["properties"]["cold"]["properties"]["pipeline"]["enum"] == ["heuristic", "two_tower"]

    def reply(**args):
        return AIMessage(content="", tool_calls=[{"name": "choose_pipelines", "args": args, "id": "1"}])

    picked, problems = read_pick(reply(cold={"pipeline": "two_tower", "reason": "cheaper: 0.4 ms"},
                                       heavy={"pipeline": "heuristic", "reason": "simple"}), ties)
    # A valid pick is kept; only the group that went wrong is asked about again.
    assert picked == {"cold": {"pipeline": "two_tower", "reason": "cheaper: 0.4 ms"}}
    assert problems == "group 'heavy': 'heuristic' is not within noise of the best; choose one of ['two_tower+deepfm', 'two_tower']"
    picked, problems = read_pick(reply(cold={"pipeline": "two_tower", "reason": "cheaper"}), ties)
    assert list(picked) == ["cold"] and problems == "no choice for group 'heavy' (an object with pipeline and reason)"
    picked, problems = read_pick(reply(cold={"pipeline": "two_tower", "reason": "cheaper: 0.4 ms"},
                                       heavy={"pipeline": "two_tower", "reason": "5x faster to fit"}), ties)
    assert problems == "" and picked["heavy"] == {"pipeline": "two_tower", "reason": "5x faster to fit"}
    assert read_pick(AIMessage(content="heuristic everywhere"), ties)[0] == {}


def test_alone_in_its_band_the_best_is_picked_by_rule_with_the_runner_up_in_its_reason():
    rng = np.random.default_rng(1)
    base = rng.random(3000)
    rows = rows_from({"heuristic": base + 0.02, "two_tower": base, "heuristic+deepfm": base - 0.01,
                      "two_tower+deepfm": base - 0.03})
    band = tied(rows)
    assert band == ["heuristic"]
    choice = decided(rows, band, None, "", SPACE)
    assert (choice["pipeline"], choice["chosen_by"], choice["llm"], choice["agrees"], choice["in_band"]) == \
        ("heuristic", "rule", False, True, True)
    assert choice["reason"].startswith("the only pipeline within noise of the best (next: two_tower, -.0200 [")
    # The LLM's pick inside a band is kept; a failed LLM leaves the best, saying why.
    assert decided(rows, ["heuristic", "two_tower"], {"pipeline": "two_tower", "reason": "r"}, "", SPACE)["chosen_by"] == "llm"
    failed = decided(rows, ["heuristic", "two_tower"], None, "no tool call", SPACE)
    assert (failed["pipeline"], failed["chosen_by"]) == ("heuristic", "fallback") and "no tool call" in failed["reason"]


def test_without_per_user_values_there_is_no_band():
    rows = {"heuristic": {"objective": 0.3}, "two_tower": {"objective": 0.31}}
    assert tied(rows) == ["two_tower"]
    assert decided(rows, tied(rows), None, "", SPACE)["reason"] == "the only pipeline within noise of the best"
