"""The rule bench/core.py names the default pipeline by (the README's claims rest on it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("bench_core", Path(__file__).parents[1] / "bench" / "core.py")
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)


def rows_and_values(means: dict[str, float], fits: dict[str, dict], users: int = 4000, spread: float = 0.05):
    """Per-user validation NDCG@20: one user effect shared by every pipeline (the pairing removes
    it) plus each pipeline's own noise, centred so that each mean is exactly `means`."""
    rng = np.random.default_rng(0)
    shared = rng.random(users) * spread * 10
    shared -= shared.mean()
    values = {}
    for name, mean in means.items():
        own = rng.normal(0, spread, users)
        values[name] = shared + mean + own - own.mean()
    rows = {name: {"val": {"ndcg@20": float(values[name].mean())}, "fit_seconds": fits[name]} for name in means}
    return rows, values


FITS = {"heuristic": {"recall": 6.0}, "two_tower": {"recall": 23.0},
        "heuristic+deepfm": {"recall": 0.4, "ranker": 25.0}, "two_tower+deepfm": {"recall": 0.8, "ranker": 33.0}}


def test_a_tie_goes_to_the_simpler_pipeline_and_a_clear_win_to_the_best():
    tied, values = rows_and_values({"heuristic": 0.040, "two_tower": 0.0494, "heuristic+deepfm": 0.039,
                                    "two_tower+deepfm": 0.0496}, FITS)
    chosen = core.simplest_within_noise(tied, values)
    assert chosen["best_on_val"] == "two_tower+deepfm" and chosen["within_noise_of_best"] == ["two_tower+deepfm", "two_tower"]
    assert chosen["chosen"] == "two_tower"
    # A ranker's cost counts the recall stage it reused: 23 + 33.8 s.
    assert chosen["fit_seconds"]["two_tower+deepfm"] == 56.8

    clear, values = rows_and_values({"heuristic": 0.040, "two_tower": 0.0450, "heuristic+deepfm": 0.039,
                                     "two_tower+deepfm": 0.0496}, FITS)
    assert core.simplest_within_noise(clear, values)["chosen"] == "two_tower+deepfm"


def test_among_tied_pipelines_of_one_stage_the_cheaper_fit_wins():
    rows, values = rows_and_values({"heuristic": 0.3041, "two_tower": 0.3052, "heuristic+deepfm": 0.20,
                                    "two_tower+deepfm": 0.20}, FITS)
    chosen = core.simplest_within_noise(rows, values)
    assert chosen["best_on_val"] == "two_tower" and chosen["chosen"] == "heuristic"
