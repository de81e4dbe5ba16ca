"""Model selection's noise band (agent/selection.py): which pipelines tie, what the LLM may
pick, and what the rule decides alone. The session-level behaviour (no pick call when
nothing ties) is in tests/test_agent.py."""

from __future__ import annotations

import re

import numpy as np
from langchain_core.messages import AIMessage

from rectune.agent.selection import CRITERIA, decided, group_table, pick_tool, read_pick, tied
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
    # The pick's prompt reads only the band: the two rows it may choose, and no column saying so.
    prompt_table = group_table("cold", rows, "ndcg@20", band_only=True).splitlines()
    assert [line.split(" | ")[0] for line in prompt_table[3:]] == ["| heuristic", "| two_tower"]
    assert "within noise" not in prompt_table[1] and len(prompt_table[2].split("|")) == len(prompt_table[3].split("|"))


def test_the_pick_tool_offers_only_the_band_and_refuses_anything_else():
    ties = {"cold": ["heuristic", "two_tower"], "heavy": ["two_tower+deepfm", "two_tower"]}
    schema = pick_tool(ties)["function"]["parameters"]
    assert schema["required"] == ["cold", "heavy"]
    assert schema["properties"]["cold"]["properties"]["pipeline"]["enum"] == ["heuristic", "two_tower"]
    # The criterion before the pipeline: a model writing left to right names the pipeline knowing why.
    assert list(schema["properties"]["cold"]["properties"]) == ["because", "pipeline"]
    assert schema["properties"]["cold"]["properties"]["because"]["enum"] == list(CRITERIA)

    def reply(**args):
        return AIMessage(content="", tool_calls=[{"name": "choose_pipelines", "args": args, "id": "1"}])

    picked, problems = read_pick(reply(cold={"because": "fastest serving", "pipeline": "two_tower"},
                                       heavy={"because": "cheapest fit", "pipeline": "heuristic"}), ties)
    # A valid pick is kept; only the group that went wrong is asked about again.
    assert picked == {"cold": {"pipeline": "two_tower", "because": "fastest serving"}}
    assert problems == "group 'heavy': 'heuristic' is not within noise of the best; choose one of ['two_tower+deepfm', 'two_tower']"
    picked, problems = read_pick(reply(cold={"because": "cheapest fit", "pipeline": "two_tower"}), ties)
    assert list(picked) == ["cold"] and problems == "no choice for group 'heavy' (an object with because and pipeline)"
    picked, problems = read_pick(reply(cold={"because": "cheapest fit", "pipeline": "two_tower"},
                                       heavy={"because": "5x faster to fit", "pipeline": "two_tower"}), ties)
    assert problems == f"group 'heavy': because must be one of {list(CRITERIA)}, not '5x faster to fit'"
    assert read_pick(AIMessage(content="heuristic everywhere"), ties)[0] == {}


def test_the_criterion_decides_and_the_reason_cites_only_the_table():
    rows = {"two_tower+deepfm": {"objective": .0496, "f1@20": .0120, "fit_seconds": 34.0, "ms_per_user": .41,
                                 "vs_best": {"diff": 0.0, "low": 0.0, "high": 0.0}},
            "two_tower": {"objective": .0494, "f1@20": .0118, "fit_seconds": 23.0, "ms_per_user": .12,
                          "vs_best": {"diff": -.0002, "low": -.0006, "high": .0002}},
            "heuristic": {"objective": .0470, "f1@20": .0110, "fit_seconds": 6.0, "ms_per_user": .05,
                          "vs_best": {"diff": -.0026, "low": -.0040, "high": -.0012}}}
    band = tied(rows)
    assert band == ["two_tower+deepfm", "two_tower"]
    cheap = decided(rows, band, {"because": "cheapest fit", "pipeline": "two_tower"}, "", SPACE)
    assert (cheap["pipeline"], cheap["chosen_by"], cheap["because"], cheap["agrees"]) == ("two_tower", "llm", "cheapest fit", False)
    assert cheap["reason"] == ("the cheapest to fit of the 2 within noise: 23.0 s fit against two_tower+deepfm 34.0 s fit; "
                               "objective -.0002 [-.0006, +.0002] to two_tower+deepfm")
    assert "named" not in cheap
    # The LLM names the ranker's pipeline as the cheapest (it is not): the table's cheapest is taken, and the
    # reason says what was named. No number the table lacks can reach the report.
    wrong = decided(rows, band, {"because": "cheapest fit", "pipeline": "two_tower+deepfm"}, "", SPACE)
    assert (wrong["pipeline"], wrong["named"]) == ("two_tower", "two_tower+deepfm")
    assert wrong["reason"].endswith("(the LLM named two_tower+deepfm, which is not the cheapest to fit by the table)")
    best = decided(rows, band, {"because": "best objective", "pipeline": "two_tower+deepfm"}, "", SPACE)
    assert best["pipeline"] == "two_tower+deepfm" and best["agrees"]
    assert best["reason"] == "the best objective of the 2 within noise: 0.04960 against two_tower 0.04940"
    f1 = decided(rows, band, {"because": "best F1", "pipeline": "two_tower"}, "", SPACE)
    assert f1["pipeline"] == "two_tower+deepfm" and "F1 0.01200 against two_tower F1 0.01180" in f1["reason"]
    # Fewest stages: the ranker-less pipeline, whichever was named.
    simple = decided(rows, band, {"because": "fewest stages", "pipeline": "two_tower+deepfm"}, "", SPACE)
    assert simple["pipeline"] == "two_tower" and simple["reason"].startswith("the simplest (fewest stages) of the 2 within "
                                                                           "noise: no ranker against two_tower+deepfm ranker deepfm")
    fast = decided(rows, band, {"because": "fastest serving", "pipeline": "two_tower+deepfm"}, "", SPACE)
    assert fast["pipeline"] == "two_tower" and "0.120 ms/user against two_tower+deepfm 0.410 ms/user" in fast["reason"]
    # A row without the value (a table from before it was measured): the named pipeline cannot be shown
    # to meet the criterion, so the one measured best by it is taken, and the reason says why.
    unmeasured = {**rows, "two_tower": {k: v for k, v in rows["two_tower"].items() if k != "fit_seconds"}}
    lacking = decided(unmeasured, band, {"because": "cheapest fit", "pipeline": "two_tower"}, "", SPACE)
    assert lacking["pipeline"] == "two_tower+deepfm"
    assert lacking["reason"].endswith("(the LLM named two_tower, whose value the table lacks)")
    # Every number of every reason is one the table prints.
    printed = group_table("heavy", rows, "ndcg@20")
    for choice in (cheap, wrong, best, f1, simple, fast):
        for number in re.findall(r"\d*\.\d+", choice["reason"]):
            assert number.lstrip("0") in printed or number in printed, (number, choice["reason"])


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
    assert decided(rows, ["heuristic", "two_tower"], {"because": "best objective", "pipeline": "two_tower"}, "", SPACE)["chosen_by"] == "llm"
    failed = decided(rows, ["heuristic", "two_tower"], None, "no tool call", SPACE)
    assert (failed["pipeline"], failed["chosen_by"]) == ("heuristic", "fallback") and "no tool call" in failed["reason"]


def test_without_per_user_values_there_is_no_band():
    rows = {"heuristic": {"objective": 0.3}, "two_tower": {"objective": 0.31}}
    assert tied(rows) == ["two_tower"]
    assert decided(rows, tied(rows), None, "", SPACE)["reason"] == "the only pipeline within noise of the best"
