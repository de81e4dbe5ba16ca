"""A latency budget that some trials meet and others miss.

The other budget tests use 1e-9 or 1e-6 ms, which no trial meets: a runner that marked
every trial infeasible would pass them. Timings differ from run to run, so the budget here
is set between two measured trials, whose served lists (and the time serving them took)
the runner then reuses: the same latencies meet the budget, deterministically.
"""

from rectune.models.groups import make_groups
from rectune.tools.cache import ModelCache
from rectune.tools.runner import TrialRunner
from rectune.tools.space import SearchSpace
from rectune.tools.trial import TrialSpec

SMALL = {"epochs": 1, "ranker_epochs": 1, "embedding_dim": 32, "k": 60, "top_n": 10, "negative_pool": 100, "batch_size": 256}


def spec(pipeline: str) -> TrialSpec:
    small = {k: v for k, v in SMALL.items() if k in SearchSpace.load().defaults(pipeline)}
    return TrialSpec("planted", "all", "all", pipeline, small, seed=0)


def test_a_budget_between_two_trials_passes_the_faster_and_fails_the_slower(planted):
    runner = TrialRunner(planted, make_groups(planted, "all"), cache=ModelCache())
    specs = [spec("heuristic"), spec("heuristic+deepfm")]
    measured = [runner.run(s) for s in specs]
    assert all(result.feasible for result in measured)  # no budget yet
    fast, slow = sorted(measured, key=lambda result: result.latency_ms_per_user)
    assert fast.latency_ms_per_user < slow.latency_ms_per_user

    runner.max_latency_ms = (fast.latency_ms_per_user + slow.latency_ms_per_user) / 2
    again = {result.spec.pipeline: result for result in (runner.run(s) for s in specs)}
    for result in measured:
        assert again[result.spec.pipeline].cache == "ranking"
        assert again[result.spec.pipeline].latency_ms_per_user == result.latency_ms_per_user
    assert again[fast.spec.pipeline].feasible and not again[slow.spec.pipeline].feasible
    assert again[fast.spec.pipeline].objective == fast.objective  # the budget marks trials; it changes no metric

    runner.max_latency_ms = fast.latency_ms_per_user  # a trial exactly at the budget meets it
    assert runner.run(fast.spec).feasible and not runner.run(slow.spec).feasible
