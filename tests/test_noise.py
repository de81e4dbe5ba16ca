"""Paired intervals over a group's users: the encoding trials store, the bootstrap, and the
session report's and the comparison's verdicts on the tuned configuration's gain."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from rectune.models.errors import ConfigError
from rectune.tools.noise import Interval, paired_interval, per_user_vector, vector
from rectune.tools.trial import TrialRecord, TrialResult, TrialSpec


def sparse_scores(n: int, seed: int, hit_rate: float = 0.1) -> np.ndarray:
    """Per-user scores as a top-N metric gives them: most users 0, the others in (0, 1]."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < hit_rate, rng.random(n), 0.0)


def test_a_per_user_vector_round_trips_through_json_up_to_its_rounding():
    values = sparse_scores(500, seed=1)
    values[3] = 1 / 3
    encoded = json.loads(json.dumps(per_user_vector(values), allow_nan=False))
    assert encoded["n"] == 500 and len(encoded["nonzero"]) == np.count_nonzero(values) < 100
    assert np.array_equal(vector(encoded), np.round(values, 6))
    assert vector(encoded)[3] == 0.333333
    assert vector(per_user_vector(np.zeros(4))).tolist() == [0.0] * 4
    with pytest.raises(ConfigError, match="finite"):
        per_user_vector(np.array([0.1, np.nan]))


def test_identical_configurations_differ_by_exactly_nothing():
    values = sparse_scores(300, seed=2)
    interval = paired_interval(values, values.copy())
    assert interval == Interval(0.0, 0.0, 0.0) and interval.within_noise


def test_a_clear_shift_is_more_than_noise():
    base = sparse_scores(2000, seed=3)
    better = base + np.where(base > 0, 0.05, 0.0)
    interval = paired_interval(better, base)
    assert interval.low > 0 and not interval.within_noise
    assert interval.diff == pytest.approx(np.mean(better - base))
    assert interval.low < interval.diff < interval.high
    assert paired_interval(base, better).high < 0


def test_pairing_cancels_what_the_users_share():
    # Users differ far more from each other (base) than the two configurations do (0.01 ± 0.02).
    rng = np.random.default_rng(4)
    base = rng.normal(0.0, 1.0, size=3000)
    a, b = base + 0.01 + rng.normal(0.0, 0.02, size=3000), base
    paired = paired_interval(a, b)
    assert paired.low > 0 and paired.high - paired.diff < 0.002
    # Two independent means of the same data: a normal interval ±1.96·SE holds 0, and is ~100× wider.
    unpaired_half_width = 1.96 * np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert unpaired_half_width > abs(a.mean() - b.mean())
    assert paired.high - paired.low < unpaired_half_width / 10


def test_the_bootstrap_is_fixed_by_its_seed():
    a, b = sparse_scores(1000, seed=5), sparse_scores(1000, seed=6)
    first = paired_interval(a, b, seed=7)
    assert paired_interval(a, b, seed=7) == first
    other = paired_interval(a, b, seed=8)
    assert other.diff == first.diff and (other.low, other.high) != (first.low, first.high)


def test_the_bootstrap_interval_has_the_width_of_the_standard_error():
    # 5000 users: the resamples are drawn in chunks; together they must still give ±1.96 SE.
    a, b = sparse_scores(5000, seed=1), sparse_scores(5000, seed=2)
    interval = paired_interval(a, b)
    standard_error = np.std(a - b) / np.sqrt(5000)
    assert (interval.high - interval.low) / (2 * 1.96 * standard_error) == pytest.approx(1.0, abs=0.1)


def test_vectors_of_other_users_are_refused():
    with pytest.raises(ConfigError, match="same users on both sides, but got 3 and 4 users"):
        paired_interval(np.zeros(3), np.zeros(4))
    with pytest.raises(ConfigError, match="at least one user"):
        paired_interval(np.zeros(0), np.zeros(0))


def test_an_interval_reads_as_the_readme_writes_numbers():
    interval = Interval(0.0012, -0.0008, 0.0031)
    assert interval.text() == "+.0012 [-.0008, +.0031]" and interval.within_noise
    # A value that rounds to nothing is +.0000, never -.0000.
    assert Interval(-0.00001, -0.00004, 1.25).text() == "+.0000 [+.0000, +1.2500]"
    assert not Interval(0.002, 0.001, 0.003).within_noise and not Interval(-0.002, -0.003, -0.001).within_noise
    stored = {**interval.to_json(), "trial": 3}
    assert Interval.from_json(json.loads(json.dumps(stored))) == interval


SPEC = TrialSpec("baby", "activity", "cold", "heuristic")


def record(number: int, params: dict, values: np.ndarray, tuner: str = "tpe", vs_best: dict | None = None) -> TrialRecord:
    result = TrialResult(SPEC, float(np.mean(values)), {"cold": {"ndcg@20": float(np.mean(values)), "recall@20": 0.1}},
                         0.5, 1.0, 1.0, "none", per_user=per_user_vector(values), vs_best=vs_best)
    return TrialRecord(number, tuner, "complete", params, result=result)


def test_the_session_report_says_when_the_gain_over_the_default_is_within_noise():
    from rectune.agent.context import Settings
    from rectune.agent.report import history_table, session_report
    from rectune.tools.adoption import adopt

    base = sparse_scores(4000, seed=9)
    rng = np.random.default_rng(10)
    defaults = {"k": 100, "top_n": 20}
    # cold: a tuned list that moves its users up and down about equally, no better than the default;
    # heavy: every user with a hit gains; light: every user loses, so the default stays the best.
    tuned = {"cold": base + np.where(base > 0, rng.normal(0.0005, 0.05, 4000), 0), "heavy": base + np.where(base > 0, 0.05, 0.0),
             "light": base * 0.5}
    histories = {group: [record(0, defaults, base, "default"), record(1, {"k": k, "top_n": 20}, tuned[group])]
                 for group, k in (("cold", 200), ("heavy", 300), ("light", 50))}
    settings = Settings(session="s", seed=4)
    choice = {"pipeline": "heuristic", "llm": True, "argmax": "heuristic", "agrees": True, "f1_argmax": "heuristic",
              "f1_agrees": True, "reason": "best"}
    state = {"selection": dict.fromkeys(histories, choice), "finished": dict.fromkeys(histories, "budget")}
    tests = dict.fromkeys(histories, {"default": {"ndcg@20": 0.03}, "best": {"ndcg@20": 0.031}, "adopted": {"ndcg@20": 0.031}})
    adoptions = {group: adopt(history, defaults, seed=4) for group, history in histories.items()}
    text = session_report(settings, state, histories, adoptions, tests, dict.fromkeys(histories, defaults))

    within = adopt(histories["cold"], defaults, seed=4).gain
    assert within == paired_interval(vector(histories["cold"][1].result.per_user), np.round(base, 6), seed=4)
    assert within.within_noise and within.diff != 0
    assert (f"best trial 1 of 2 (k=200); stopped by budget; the default is kept: the best's gain over the default is "
            f"within noise ({within.text()} on validation)") in text
    beyond = adopt(histories["heavy"], defaults, seed=4).gain
    assert (f"trial 1 is adopted: its gain over the default is more than noise ({beyond.text()} on validation)" in text
            and beyond.low > 0)
    assert "- **light**: heuristic (best); best trial 0 of 2 (the default); stopped by budget; no trial beat the default on validation" in text
    assert f"| cold | heuristic | {np.mean(base):.5f} | {histories['cold'][1].objective:.5f} | {within.text()} | yes | the default |" in text
    assert f"| heavy | heuristic | {np.mean(base):.5f} | {histories['heavy'][1].objective:.5f} | {beyond.text()} | no | trial 1 |" in text
    assert "| +.0000 [+.0000, +.0000] | (the default is the best) | trial 0 |" in text

    # Without per-user values (a ledger from before they were kept) the report has no verdict.
    old = [TrialRecord(r.number, r.tuner, r.state, r.params,
                       result=TrialResult(SPEC, r.objective, r.result.metrics, 0.5, 1.0, 1.0, "none")) for r in histories["cold"]]
    assert adopt(old, defaults, seed=4).gain is None
    unpaired = session_report(settings, {**state, "selection": {"cold": choice}}, {"cold": old},
                              {"cold": adopt(old, defaults, seed=4)}, tests, {"cold": defaults})
    assert "noise" not in unpaired and "trial 1 is adopted: no per-user values to test the gain" in unpaired

    compared = record(1, {"k": 200}, base, vs_best={**Interval(0.0012, -0.0008, 0.0031).to_json(), "trial": 0})
    header, _, first, second = history_table([histories["cold"][0], compared], defaults, "ndcg@20").splitlines()
    assert header.endswith("| latency ms/user | vs best |")
    assert first.endswith("| 0.500 | - |") and second.endswith("| 0.500 | +.0012 [-.0008, +.0031] |")
    # A ranker's trials show its loss after each epoch, training/validation; a trial without one a dash.
    ranked = replace(compared, result=replace(compared.result, ranker_curve=[
        {"epoch": 1, "train_loss": 0.4123, "val_loss": 0.4371}, {"epoch": 2, "train_loss": 0.3709, "val_loss": None}]))
    header, rule, first, second = history_table([histories["cold"][0], ranked], defaults, "ndcg@20").splitlines()
    assert header.endswith("| recall@20 | ranker loss by epoch (train/val) | latency ms/user | vs best |")
    assert rule.count("|") == header.count("|")
    assert first.endswith("| - | 0.500 | - |") and second.endswith("| .412/.437, .371/- | 0.500 | +.0012 [-.0008, +.0031] |")
    # Without the measured latency (what the LLM reads when no latency budget is set) the row loses that cell alone.
    header, rule, first, second = history_table([histories["cold"][0], ranked], defaults, "ndcg@20", latency=False).splitlines()
    assert header.endswith("| recall@20 | ranker loss by epoch (train/val) | vs best |")
    assert rule.count("|") == header.count("|") and second.count("|") == header.count("|")
    assert second.endswith("| .412/.437, .371/- | +.0012 [-.0008, +.0031] |") and "0.500" not in second


def test_the_comparison_counts_the_seeds_whose_gain_is_within_noise():
    from rectune.agent.compare import Comparison, Run, _noise
    from rectune.agent.context import Settings

    def run(tuner: str, seed: int, gain: Interval | None) -> Run:
        return Run(tuner, "cold", seed, "heuristic", [0.1], {}, {}, 1.0, gain=gain)

    spec = Comparison(Settings(session="cmp", budget=2), seeds=(0, 1, 2), tuners=("tpe", "random"))
    runs = [run("tpe", 0, Interval(0.002, 0.001, 0.003)), run("tpe", 1, Interval(0.0004, -0.001, 0.002)),
            run("tpe", 2, Interval(0.0, 0.0, 0.0)), run("random", 0, Interval(0.001, -0.001, 0.003)),
            run("random", 1, None), run("random", 2, Interval(0.003, 0.002, 0.004))]
    lines = _noise(spec, runs, ["cold"])
    assert "| cold | tpe | +0.00080 | 2/3 | +.0020 [+.0010, +.0030]; +.0004 [-.0010, +.0020]; +.0000 [+.0000, +.0000] |" in lines
    # A seed without per-user values (an older ledger) is left out of the count.
    assert "| cold | random | +0.00200 | 1/2 | +.0010 [-.0010, +.0030]; +.0030 [+.0020, +.0040] |" in lines


def test_a_best_is_adopted_only_when_it_beats_the_default_beyond_noise():
    from dataclasses import replace

    from rectune.tools.adoption import adopt

    base = sparse_scores(4000, seed=9)
    noisy = base + np.where(base > 0, np.random.default_rng(10).normal(0.0005, 0.05, 4000), 0)
    defaults, better = {"k": 100}, base + np.where(base > 0, 0.05, 0.0)
    default = record(0, defaults, base, "default")

    within = adopt([default, record(1, {"k": 200}, noisy)], defaults, seed=4)
    assert within.kept_default and within.record is default and within.best.number == 1 and within.gain.within_noise
    assert within.reason == "the best's gain over the default is within noise"
    beyond = adopt([default, record(1, {"k": 200}, noisy), record(2, {"k": 300}, better)], defaults, seed=4)
    assert not beyond.kept_default and beyond.record.number == 2 and beyond.gain.low > 0
    alone = adopt([default, record(1, {"k": 50}, base * 0.5)], defaults, seed=4)
    assert alone.best_is_default and alone.record is default and alone.gain.diff == 0

    # The default over the latency budget cannot be kept: a feasible best is adopted, noise or not.
    slow = replace(default, result=replace(default.result, feasible=False))
    assert adopt([slow, record(1, {"k": 200}, noisy)], defaults, seed=4).record.number == 1
    # No default to compare with (its trial failed), or no per-user values: the best stands, and says why.
    failed = TrialRecord(0, "default", "failed", defaults, error="out of memory")
    assert adopt([failed, record(1, {"k": 200}, noisy)], defaults, seed=4).reason == "the default produced no number"
    bare = [replace(r, result=replace(r.result, per_user=None)) for r in (default, record(1, {"k": 200}, noisy))]
    assert adopt(bare, defaults, seed=4).reason == "no per-user values to test the gain"
    assert adopt([failed], defaults, seed=4) is None


def test_the_comparison_reports_adopted_configurations_and_the_ungated_bests_beside_them():
    from rectune.agent.compare import Comparison, Run, _differences, _tests
    from rectune.agent.context import Settings

    def run(tuner: str, seed: int, test: float, best_test: float) -> Run:
        # The LLM adopted a tuned configuration in seed 0 only; TPE kept the default in both.
        adopted = {"k": 200} if (tuner, seed) == ("llm", 0) else {"k": 100}
        return Run(tuner, "cold", seed, "heuristic", [0.1, 0.1], adopted, {"k": 200}, 1.0, test=test, best_test=best_test,
                   adopted_trial=1 if adopted["k"] == 200 else 0)

    spec = Comparison(Settings(session="cmp", budget=2), seeds=(0, 1), tuners=("llm", "tpe"))
    runs = [run("llm", 0, 0.032, 0.032), run("llm", 1, 0.030, 0.029), run("tpe", 0, 0.030, 0.031), run("tpe", 1, 0.030, 0.031)]
    table = _tests(spec, runs, ["cold"])
    assert "| cold | llm | 0.03100 | 0.0320, 0.0300 | 1/2 | 0.03050 | 2, 2 |" in "\n".join(table)
    assert "| cold | tpe | 0.03000 | 0.0300, 0.0300 | 0/2 | 0.03100 | 2, 2 |" in "\n".join(table)
    adopted, ungated = "\n".join(_differences(spec, runs, ["cold"])), "\n".join(_differences(spec, runs, ["cold"], ungated=True))
    assert "| tpe | cold | +0.00100 |" in adopted and "| 1 / 1 / 0 |" in adopted
    assert "| tpe | cold | -0.00050 |" in ungated and "| 1 / 0 / 1 |" in ungated and "ungated" in ungated
