"""The proposer contract, checked once over every registered tuner that proposes on its own
(the LLM agent's is checked against a scripted endpoint in tests/test_agent.py): the same
history gives the same proposal, no configuration is proposed twice, every proposal fits the
search space, and a proposer that has nothing left says Finish instead of repeating."""

from __future__ import annotations

import pytest

from rectune.models.errors import ConfigError
from rectune.tools.proposer import Finish, Proposal, Proposer, ProposerContext
from rectune.tools.proposers import PROPOSERS, make_proposer, register, unattended
from rectune.tools.proposers.local import grid, steps
from rectune.tools.space import SearchSpace
from rectune.tools.study import StudyContext, canonical
from rectune.tools.trial import TrialRecord, TrialResult

TUNERS = sorted(name for name in PROPOSERS if unattended(name))
SPACE = SearchSpace.load()
# The made-up objective below depends on top_n, so the context's objective is measured at top_n
# (at a fixed cutoff such as ndcg@20 top_n cannot change it, and no tuner searches it).
CONTEXT = StudyContext("planted", "activity:2", "cold", "heuristic", objective="ndcg@topn", budget=12, tuner="tpe")
# A space of 3 × 3 configurations, small enough to be used up.
TINY = """
[parameters.top_n]
type = "categorical"
choices = [10, 20, 30]
help = "list length"

[parameters.neighbors]
type = "categorical"
choices = [25, 50, 100]
help = "neighbours"
"""


def score(params: dict) -> float:
    """A made-up objective with one optimum (the proposers only see numbers)."""
    return 1.0 / (1.0 + abs(params["top_n"] - 30) / 10 + abs(params["neighbors"] - 100) / 50)


def record(number: int, params: dict, state: str = "complete", latency: float = 1.0) -> TrialRecord:
    result = None
    if state == "complete":
        result = TrialResult(CONTEXT.spec(params), score(params), {"cold": {"ndcg@20": score(params)}}, latency, 0.0, 0.0,
                             "none", feasible=latency <= 2.0)
    return TrialRecord(number, "test", state, params, result=result)


def drive(name: str, space: SearchSpace, steps_: int, context: StudyContext = CONTEXT) -> tuple[list, Finish | None]:
    """Ask `name` for proposals, adding each to the history as a complete trial."""
    proposer = make_proposer(name)
    history, proposals = [], []
    for _ in range(steps_):
        proposal = proposer.propose(list(history), ProposerContext(context, space, context.budget))
        assert isinstance(proposal, (Proposal, Finish)), proposal
        if isinstance(proposal, Finish):
            return proposals, proposal
        proposals.append(proposal)
        history.append(record(len(history), proposal.params))
    return proposals, None


def test_every_built_in_tuner_is_registered():
    assert {"default", "tpe", "random", "local", "menu"} <= set(TUNERS)


@pytest.mark.parametrize("name", TUNERS)
def test_proposals_fit_the_space_and_never_repeat(name):
    proposals, finish = drive(name, SPACE, 12)
    keys = [canonical(p.params) for p in proposals]
    assert len(keys) == len(set(keys)), f"{name} proposed a configuration twice"
    for proposal in proposals:
        assert proposal.tuner == name
        assert SPACE.validate("heuristic", proposal.params) == proposal.params
        assert set(proposal.params) == set(SPACE.defaults("heuristic"))
    if name == "default":
        assert len(proposals) == 1 and proposals[0].params == SPACE.defaults("heuristic") and finish is not None
    else:
        assert len(proposals) == 12


@pytest.mark.parametrize("name", TUNERS)
def test_the_same_history_gives_the_same_proposal(name):
    history = [record(0, SPACE.defaults("heuristic")),
               record(1, {**SPACE.defaults("heuristic"), "top_n": 30, "k": 600}, latency=3.0),
               record(2, {**SPACE.defaults("heuristic"), "neighbors": 80}, state="failed")]
    context = ProposerContext(CONTEXT, SPACE, CONTEXT.budget)
    first = make_proposer(name).propose(list(history), context)
    again = make_proposer(name).propose(list(history), context)
    assert first == again


@pytest.mark.parametrize("name", TUNERS)
def test_a_used_up_space_ends_in_finish_not_a_repeat(name, tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    tiny = SearchSpace.load(path)
    proposals, finish = drive(name, tiny, 20)
    keys = [canonical(p.params) for p in proposals]
    assert len(keys) == len(set(keys)) and len(keys) <= 9
    assert isinstance(finish, Finish) and finish.reason


@pytest.mark.parametrize("name", TUNERS)
def test_rejected_queued_and_running_configurations_count_as_tried(name, tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    tiny = SearchSpace.load(path)
    everything = [{"top_n": t, "neighbors": n} for t in (10, 20, 30) for n in (25, 50, 100)]
    states = ["complete", "rejected", "waiting", "running", "failed", "complete", "rejected", "running"]
    history = [record(i, params, state) for i, (params, state) in enumerate(zip(everything, states))]
    proposal = make_proposer(name).propose(history, ProposerContext(CONTEXT, tiny, CONTEXT.budget))
    if name == "default":
        assert isinstance(proposal, Finish)
    else:
        # (30, 100) is a neighbour of the best complete trial (20, 100): every tuner can reach it.
        assert proposal.params == everything[-1], "the only configuration not in the history"


def test_random_search_follows_the_study_seed():
    history = [record(0, SPACE.defaults("heuristic"))]
    proposals = {seed: make_proposer("random").propose(history, ProposerContext(
        StudyContext("planted", "activity:2", "cold", "heuristic", "ndcg@topn", seed=seed), SPACE, 12)) for seed in (0, 1)}
    assert proposals[0].params != proposals[1].params


@pytest.mark.parametrize("name", ["random", "tpe"])
def test_neighbouring_seeds_draw_independent_proposals(name):
    # With seed + trials as the sampler seed, seed 1 replayed seed 0 one trial later: the seeds a
    # comparison pairs over would share their draws.
    def proposals(seed: int) -> list[str]:
        context = StudyContext("planted", "activity:2", "cold", "heuristic", "ndcg@topn", seed=seed, budget=8, tuner=name)
        history = [record(0, SPACE.defaults("heuristic"))]
        for number in range(1, 5):
            drawn = make_proposer(name).propose(list(history), ProposerContext(context, SPACE, 8))
            history.append(record(number, drawn.params))
        return [canonical(r.params) for r in history[1:]]

    assert not set(proposals(0)) & set(proposals(1))


def test_local_search_moves_one_parameter_of_the_best_trial_within_the_latency_budget():
    defaults = SPACE.defaults("heuristic")
    fast = record(0, defaults)
    slow_but_better = record(1, {**defaults, "top_n": 30, "neighbors": 100}, latency=5.0)
    assert slow_but_better.objective > fast.objective and not slow_but_better.feasible
    proposal = make_proposer("local").propose([fast, slow_but_better], ProposerContext(CONTEXT, SPACE, 12))
    changed = {k for k in defaults if proposal.params[k] != defaults[k]}
    assert len(changed) == 1 and proposal.rationale.startswith("neighbour of trial 0:")


def test_the_grid_holds_the_bounds_and_steps_go_to_the_next_point():
    k = next(p for p in SPACE.parameters if p.name == "k")
    points = grid(k)
    assert points[0] == k.low and points[-1] == k.high and points == sorted(points)
    assert steps(k, k.low) == [points[1]]
    assert steps(k, points[3]) == [points[2], points[4]]
    between = (points[3] + points[4]) // 2
    assert steps(k, between) == [points[3], points[4]]
    batch = next(p for p in SPACE.parameters if p.name == "batch_size")
    assert steps(batch, 512) == [256, 1024]


def test_a_new_tuner_is_one_registration(monkeypatch):
    import rectune.tools.proposers as proposers

    class Highest(Proposer):
        name = "highest-top-n"

        def __init__(self, seed: int = 0):
            pass

        def propose(self, history, context):
            params = context.space.validate(context.study.pipeline, {"top_n": 200, "k": 3000})
            return Finish("tried") if any(r.params == params for r in history) else Proposal(params, self.name)

    monkeypatch.setattr(proposers, "PROPOSERS", dict(PROPOSERS))
    monkeypatch.setattr(proposers, "_ATTENDED", set())
    register("highest-top-n", Highest)
    proposal = make_proposer("highest-top-n").propose([], ProposerContext(CONTEXT, SPACE, 12))
    assert proposal.params["top_n"] == 200 and unattended("highest-top-n")
    register("needs-a-person", Highest, unattended=False)
    assert not unattended("needs-a-person") and "needs-a-person" not in PROPOSERS
    with pytest.raises(ConfigError, match="tuner must be one of .*but got 'nope'"):
        make_proposer("nope")


def test_tuners_search_only_parameters_that_can_move_the_objective():
    names = lambda pipeline, objective: {p.name for p in SPACE.tunable(pipeline, objective)}  # noqa: E731
    everything = {p.name for p in SPACE.parameters_for("heuristic")}
    # Without a ranker the top-N is taken directly (K changes nothing), and ndcg@20 is scored on 20 items whatever top_n is.
    assert names("heuristic", "ndcg@20") == everything - {"k", "top_n"}
    assert names("heuristic", "f1@topn") == everything - {"k"}
    assert names("heuristic", "candidate_recall@k") == everything - {"top_n"}
    assert "k" in names("heuristic+deepfm", "ndcg@20") and "top_n" not in names("heuristic+deepfm", "ndcg@20")
    context = StudyContext("planted", "activity:2", "cold", "heuristic", budget=12, tuner="tpe")
    for name in ("tpe", "random", "local", "menu"):
        proposals, _ = drive(name, SPACE, 6, context)
        assert all((p.params["k"], p.params["top_n"]) == (500, 20) for p in proposals), name


def test_a_menu_whose_neighbours_are_all_tried_offers_a_tpe_sample_before_the_search_is_stuck(tmp_path):
    from rectune.tools.proposers.menu import menu, stuck

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    tiny = SearchSpace.load(path)
    best = {"top_n": 20, "neighbors": 50}
    # Every one-step neighbour of the best was rejected by a person: tried, but no trial ran since the best.
    around = [{"top_n": t, "neighbors": 50} for t in (10, 30)] + [{"top_n": 20, "neighbors": n} for n in (25, 100)]
    history = [record(0, best)] + [record(i, params, "rejected") for i, params in enumerate(around, 1)]
    assert not stuck(history)
    [sample] = menu(history, ProposerContext(CONTEXT, tiny, CONTEXT.budget))
    assert sample.source == "tpe" and canonical(sample.params) not in {canonical(r.params) for r in history}
    assert make_proposer("menu").propose(history, ProposerContext(CONTEXT, tiny, CONTEXT.budget)).params == sample.params


def test_the_menu_refines_the_best_and_explores_with_tpe_once_stuck():
    from rectune.tools.proposers.menu import STUCK, menu

    defaults = SPACE.defaults("heuristic")
    history = [record(0, defaults), record(1, {**defaults, "top_n": 30}), record(2, {**defaults, "top_n": 40}, state="rejected")]
    context = ProposerContext(CONTEXT, SPACE, CONTEXT.budget)
    options = menu(history, context)
    assert [c.source for c in options] == ["neighbour"] * 4
    keys = [canonical(c.params) for c in options]
    assert len(set(keys)) == 4 and not set(keys) & {canonical(r.params) for r in history}
    best = history[1].params  # top_n 30 scores higher than the default's 20
    for candidate in options:
        assert candidate.changes == {k: [best[k], v] for k, v in candidate.params.items() if best[k] != v}
        [(name, (old, new))] = candidate.changes.items()
        assert candidate.describe() == f"{name} {old:.3g}→{new:.3g}"  # a neighbour is not labelled; a TPE sample is
    assert len({next(iter(c.changes)) for c in options}) == 4  # each on another parameter
    # Deterministic, and shuffled by the seed: another seed orders (and draws) otherwise.
    assert menu(history, context) == options
    assert [canonical(c.params) for c in menu(history, context, seed=1)] != keys
    assert make_proposer("menu").propose(history, context).params == options[0].params
    # STUCK complete trials without a new best: one candidate is a TPE sample.
    worse = [record(3 + i, {**best, "neighbors": 20 + i}) for i in range(STUCK)]
    assert all(r.objective < history[1].objective for r in worse)
    stuck = menu(history + worse, context)
    assert sorted(c.source for c in stuck) == ["neighbour", "neighbour", "neighbour", "tpe"]
    assert [c.describe().endswith(" (TPE sample)") for c in stuck] == [c.source == "tpe" for c in stuck]


def test_other_groups_bests_are_offered_untried_latest_first_and_tpe_warm_runs_them_before_sampling():
    from rectune.tools.proposers.menu import TRANSFERS, menu

    defaults = SPACE.defaults("heuristic")
    light, medium = {**defaults, "neighbors": 100}, {**defaults, "cf_weight": 0.5, "top_n": 30}
    # The default (tried here), a configuration twice, and one of another pipeline (epochs: not the heuristic's) are no transfers.
    transfers = (("light", light), ("medium", medium), ("heavy", defaults), ("young", light), ("old", {**defaults, "epochs": 5}))
    context = ProposerContext(CONTEXT, SPACE, CONTEXT.budget, transfers)
    history = [record(0, defaults)]

    options = menu(history, context)
    moved = [c for c in options if c.source == "transfer"]
    assert len(options) == 4 and len(moved) == TRANSFERS == 2
    assert {c.origin: canonical(c.params) for c in moved} == {"young": canonical(light), "medium": canonical(medium)}
    for candidate in moved:
        assert candidate.changes == {k: [defaults[k], v] for k, v in candidate.params.items() if defaults[k] != v}
        assert candidate.describe().endswith(f" (best of group {candidate.origin})")
    assert [c.source for c in menu(history, ProposerContext(CONTEXT, SPACE, CONTEXT.budget))] == ["neighbour"] * 4

    warm, plain = make_proposer("tpe-warm"), make_proposer("tpe")
    first = warm.propose(history, context)
    # The latest group's first; the light configuration came again from group young, which names it.
    assert (first.params, first.tuner, first.rationale) == (light, "tpe-warm", "warm start: the best of group young")
    history.append(record(1, first.params))
    second = warm.propose(history, context)
    assert (second.params, second.rationale) == (medium, "warm start: the best of group medium")
    history.append(record(2, second.params, state="rejected"))
    # Every transfer tried: the menu holds none, and tpe-warm samples exactly as TPE would.
    assert all(c.source != "transfer" for c in menu(history, context))
    third = warm.propose(history, context)
    assert third.params == plain.propose(history, context).params and third.rationale == "tpe-warm sample"
