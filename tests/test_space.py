"""The search space: the shipped file, validation messages, the loader's checks, Optuna use."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import optuna
import pytest

from rectune.models.errors import ConfigError, InvalidProposal, RectuneError
from rectune.models.pipeline import PIPELINES, PipelineConfig
from rectune.tools.space import DEFAULT_FILE, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

HEURISTIC_NAMES = "embedding_dim, k, top_n, neighbors, cf_weight, popularity_weight, text_weight, ease_lambda"
TWO_TOWER_NAMES = ("embedding_dim, k, top_n, neighbors, cf_weight, popularity_weight, text_weight, ease_lambda, lr, epochs, "
                   "batch_size, temperature, weight_decay, content_layers, heuristic_weight")


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.load()


def problems(space: SearchSpace, pipeline: str, values: dict, base: dict | None = None) -> list[str]:
    with pytest.raises(InvalidProposal) as caught:
        space.validate(pipeline, values, base)
    return caught.value.problems


def test_shipped_file_declares_the_issue_ranges(space):
    numeric = {p.name: (p.low, p.high, p.log) for p in space.parameters if p.type != "categorical"}
    assert numeric == {
        "embedding_dim": (32, 512, True), "k": (50, 3000, True), "top_n": (5, 200, False),
        "neighbors": (10, 500, True), "cf_weight": (0.0, 1.0, False), "popularity_weight": (1e-4, 2.0, True),
        "text_weight": (0.0, 1.0, False), "ease_lambda": (10.0, 5000.0, True),
        "lr": (1e-4, 3e-2, True), "epochs": (1, 20, False), "temperature": (0.02, 1.0, True),
        "weight_decay": (0.0, 1e-3, False), "ranker_dim": (4, 64, False), "dropout": (0.0, 0.5, False),
        "ranker_lr": (1e-4, 1e-2, True), "ranker_epochs": (1, 10, False), "negatives": (4, 128, True),
        "negative_pool": (100, 2000, True), "content_layers": (0, 3, False), "heuristic_weight": (0.0, 2.0, False),
    }
    choices = {p.name: p.choices for p in space.parameters if p.type == "categorical"}
    assert choices == {"batch_size": (256, 512, 1024, 2048), "hidden": ("64", "128,64", "256,128", "512,256,128")}
    assert [str(c) for c in space.constraints] == ["k >= top_n"]
    assert space.path == DEFAULT_FILE


def test_applies_to_comes_from_used_by(space):
    assert ", ".join(p.name for p in space.parameters_for("heuristic")) == HEURISTIC_NAMES
    assert ", ".join(p.name for p in space.parameters_for("two_tower")) == TWO_TOWER_NAMES
    deepfm = ["ranker_dim", "hidden", "dropout", "ranker_lr", "ranker_epochs", "negatives", "negative_pool"]
    assert [p.name for p in space.parameters_for("heuristic+deepfm")] == HEURISTIC_NAMES.split(", ") + deepfm
    assert [p.name for p in space.parameters_for("two_tower+deepfm")] == TWO_TOWER_NAMES.split(", ") + deepfm
    assert all("seed" not in space.defaults(pipeline) for pipeline in PIPELINES)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_defaults_are_pipeline_config_defaults(space, pipeline):
    config = PipelineConfig.from_dict({"pipeline": pipeline})
    defaults = space.defaults(pipeline)
    assert defaults == {name: ",".join(map(str, v)) if isinstance(v, tuple) else v
                        for name, v in config.to_dict().items() if name in defaults}
    assert space.validate(pipeline, defaults) == defaults
    assert space.validate(pipeline, {}) == defaults
    assert space.to_config(pipeline, {}) == config


def test_unknown_parameter_suggests_the_closest_name(space):
    assert problems(space, "two_tower", {"embedding": 128}) == [
        f"unknown parameter 'embedding' (known for two_tower: {TWO_TOWER_NAMES}; did you mean 'embedding_dim'?)"]
    assert problems(space, "heuristic", {"zzz": 1}) == [f"unknown parameter 'zzz' (known for heuristic: {HEURISTIC_NAMES})"]


def test_non_tunable_and_not_applicable_parameters(space):
    assert problems(space, "heuristic", {"seed": 3}) == [f"seed is not tunable (tunable for heuristic: {HEURISTIC_NAMES})"]
    assert problems(space, "heuristic", {"lr": 0.01}) == ["lr does not apply to pipeline heuristic (it only affects two_tower)"]
    assert problems(space, "two_tower", {"negatives": 2}) == ["negatives does not apply to pipeline two_tower (it only affects deepfm)"]


def test_type_range_choice_and_constraint_messages(space):
    assert problems(space, "two_tower", {"k": "large"}) == ["k must be an integer, but got 'large'"]
    assert problems(space, "two_tower", {"k": 5000}) == ["k=5000 is out of range [50, 3000]"]
    assert problems(space, "two_tower", {"lr": "fast"}) == ["lr must be a number, but got 'fast'"]
    assert problems(space, "two_tower", {"lr": 0.1}) == ["lr=0.1 is out of range [0.0001, 0.03]"]
    assert problems(space, "two_tower", {"k": 100, "top_n": 150}) == ["k=100 must be ≥ top_n=150"]
    assert problems(space, "two_tower+deepfm", {"hidden": "7"}) == [
        "hidden must be one of ['64', '128,64', '256,128', '512,256,128'], but got '7'"]
    assert problems(space, "two_tower", {"batch_size": 300}) == ["batch_size must be one of [256, 512, 1024, 2048], but got 300"]


def test_every_violation_is_reported_together(space):
    found = problems(space, "heuristic", {"k": 10, "top_n": "many", "cf_weight": 1.5, "embedding": 64, "lr": 0.01})
    assert found == [
        "k=10 is out of range [50, 3000]",
        "top_n must be an integer, but got 'many'",
        "cf_weight=1.5 is out of range [0.0, 1.0]",
        f"unknown parameter 'embedding' (known for heuristic: {HEURISTIC_NAMES}; did you mean 'embedding_dim'?)",
        "lr does not apply to pipeline heuristic (it only affects two_tower)",
    ]
    # Out of range still has a value, so the constraint is checked too.
    assert problems(space, "two_tower", {"k": 10}) == ["k=10 is out of range [50, 3000]", "k=10 must be ≥ top_n=20"]
    with pytest.raises(RectuneError, match="(?s)k=10 is out of range.*k=10 must be ≥ top_n=20"):
        space.validate("two_tower", {"k": 10})


def test_unknown_pipeline(space):
    message = "pipeline must be one of ['heuristic', 'heuristic+deepfm', 'two_tower', 'two_tower+deepfm'], but got 'knn'"
    assert problems(space, "knn", {}) == [message]
    with pytest.raises(ConfigError, match=re.escape(message)):
        space.defaults("knn")


@pytest.mark.parametrize(("pipeline", "name", "given", "expected"), [
    ("two_tower", "embedding_dim", 64.0, 64), ("two_tower", "k", np.int64(800), 800),
    ("heuristic", "cf_weight", 1, 1.0), ("two_tower", "batch_size", 512.0, 512),
    ("two_tower+deepfm", "hidden", "256, 128", "256,128"), ("two_tower+deepfm", "hidden", [256, 128], "256,128"),
    ("two_tower+deepfm", "hidden", (64,), "64"),
])
def test_coercions(space, pipeline, name, given, expected):
    value = space.validate(pipeline, {name: given})[name]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("name", "given", "message"), [
    ("embedding_dim", "64", "embedding_dim must be an integer, but got '64'"),
    ("embedding_dim", 64.5, "embedding_dim must be an integer, but got 64.5"),
    ("k", True, "k must be an integer, but got True"),
    ("dropout", None, "dropout must be a number, but got None"),
    ("dropout", math.nan, "dropout=nan is out of range [0.0, 0.5]"),
    ("hidden", [128, "x"], "hidden must be one of ['64', '128,64', '256,128', '512,256,128'], but got [128, 'x']"),
])
def test_rejected_coercions(space, name, given, message):
    assert problems(space, "heuristic+deepfm", {name: given}) == [message]


def test_base_is_merged_under_values(space):
    base = {"k": 100, "top_n": 150, "hidden": [64]}
    assert problems(space, "two_tower+deepfm", {}, base) == ["k=100 must be ≥ top_n=150"]
    merged = space.validate("two_tower+deepfm", {"k": 1500}, base)
    assert merged == {**space.defaults("two_tower+deepfm"), "k": 1500, "top_n": 150, "hidden": "64"}
    assert list(merged) == list(space.defaults("two_tower+deepfm"))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_to_config_round_trip(space, pipeline):
    changes = {"embedding_dim": 256, "k": 1500, "top_n": 50}
    changes |= {"hidden": [256, 128], "dropout": 0.3} if "deepfm" in pipeline else {}
    values = space.validate(pipeline, changes)
    config = space.to_config(pipeline, changes)
    assert (config.recall, config.ranker) == PIPELINES[pipeline]
    assert {name: ",".join(map(str, v)) if isinstance(v, tuple) else v
            for name, v in config.to_dict().items() if name in values} == values
    assert space.to_config(pipeline, values) == config


def test_to_config_raises_invalid_proposal(space):
    with pytest.raises(InvalidProposal, match="k=20000 is out of range"):
        space.to_config("heuristic", {"k": 20000})


PARAMETER = '[parameters.k]\ntype = "int"\nlow = 50\nhigh = 3000\nhelp = "recall size"\n'


@pytest.mark.parametrize(("text", "message"), [
    (PARAMETER + '[parameters.embeding_dim]\ntype = "int"\nlow = 32\nhigh = 512\nhelp = "x"\n',
     "[parameters.embeding_dim]: PipelineConfig has no field 'embeding_dim'; did you mean 'embedding_dim'?"),
    (PARAMETER.replace("low = 50", "low = 600"),
     "[parameters.k]: the PipelineConfig default does not fit: k=500 is out of range [600, 3000]"),
    (PARAMETER.replace('"int"', '"integer"'),
     "[parameters.k]: type must be one of ['int', 'float', 'categorical'], but got 'integer'"),
    (PARAMETER.replace('"int"', '"float"'),
     "[parameters.k]: type 'float' does not match the PipelineConfig field type 'int'"),
    (PARAMETER.replace("low = 50", 'low = "fifty"'), "[parameters.k]: low must be an integer, but got 'fifty'"),
    (PARAMETER.replace("high = 3000", "high = 30"), "[parameters.k]: low must be < high, but got low=50, high=30"),
    (PARAMETER.replace("help", "hint"),
     "[parameters.k]: unknown key(s) ['hint'] for a int parameter; allowed: ['help', 'high', 'log', 'low', 'type']"),
    (PARAMETER + 'log = "yes"\n', "[parameters.k]: log must be true or false, but got 'yes'"),
    ('[parameters.weight_decay]\ntype = "float"\nlow = 0.0\nhigh = 1e-3\nlog = true\nhelp = "x"\n',
     "[parameters.weight_decay]: a log scale needs low > 0, but got low=0.0"),
    ('[parameters.seed]\ntype = "int"\nlow = 0\nhigh = 9\nhelp = "x"\n', "[parameters.seed]: seed is not tunable"),
    ('[parameters.hidden]\ntype = "categorical"\nchoices = ["128,64", "wide"]\nhelp = "x"\n',
     "[parameters.hidden]: choice 'wide' is not a valid PipelineConfig value: hidden must be integers like 128,64, but got 'wide'"),
    ('[parameters.batch_size]\ntype = "categorical"\nchoices = [1024, "big"]\nhelp = "x"\n',
     "[parameters.batch_size]: choices must be a non-empty list of integers, numbers or strings of one type, but got [1024, 'big']"),
    (PARAMETER + '[constraints]\nk_ge_top_n = "k >= topn"\n', "[constraints] k_ge_top_n: 'topn' is not a parameter of the space"),
    (PARAMETER + '[constraints]\nk_big = "k > 5"\n', "[constraints] k_big: must read \"a >= b\" or \"a <= b\", but got 'k > 5'"),
    (PARAMETER + '[knobs]\nx = 1\n', "unknown table(s) ['knobs']; expected [parameters.NAME] and [constraints]"),
    ("[parameters.k\n", "not valid TOML"),
])
def test_broken_space_file_names_file_and_entry(tmp_path, text, message):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        SearchSpace.load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml: cannot read the search space"):
        SearchSpace.load(tmp_path / "absent.toml")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_optuna_suggest_stays_inside_the_space(space, pipeline):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1, n_startup_trials=10))
    parameters = space.parameters_for(pipeline)

    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial, pipeline)
        assert list(values) == [p.name for p in parameters]
        assert all(not p.check(values[p.name])[1] for p in parameters)
        assert values["k"] >= values["top_n"]
        assert space.validate(pipeline, values) == values
        # Minimising pushes k down and top_n up, so TPE keeps sampling k < top_n pairs to repair.
        return math.log(values["k"]) - values["top_n"] / 100

    study.optimize(objective, n_trials=50)
    assert len(study.trials) == 50
    repaired = ["space_repairs" in t.user_attrs for t in study.trials]
    assert repaired == [t.params["k"] < t.params["top_n"] for t in study.trials] and any(repaired)


def test_suggest_raises_k_to_top_n_and_records_it(space):
    sampled = {**space.defaults("two_tower"), "k": 60, "top_n": 150}
    trial = optuna.trial.FixedTrial(sampled)
    values = space.suggest(trial, "two_tower")
    assert values == {**sampled, "k": 150}
    assert trial.user_attrs == {"space_repairs": ["k=60 set to top_n=150 (k >= top_n)"]}


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_distributions_take_enqueued_proposals(space, pipeline):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    defaults = space.defaults(pipeline)
    proposal = space.validate(pipeline, {"k": 1500, "embedding_dim": 256})
    for params, value in ((defaults, 0.1), (proposal, 0.2)):
        study.enqueue_trial(params)
        trial = study.ask(fixed_distributions=space.distributions(pipeline))
        assert trial.params == params
        study.tell(trial, value)
    # Tuner trials share the study with the enqueued ones: same parameter distributions.
    study.optimize(lambda trial: float(space.suggest(trial, pipeline)["k"]), n_trials=3)
    assert len(study.trials) == 5


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_describe_lists_exactly_the_pipeline_parameters(space, pipeline):
    text = space.describe(pipeline)
    listed = [line[2:].split(":")[0] for line in text.splitlines() if line.startswith("- ")]
    assert listed == [p.name for p in space.parameters_for(pipeline)]
    assert "- k: int in [50, 3000], log scale; default 500; serving only, no retraining; recall size K" in text
    assert text.endswith("Constraint: k >= top_n")


def test_describe_shows_choices_and_defaults(space):
    text = space.describe("heuristic+deepfm")
    assert "- hidden: one of ['64', '128,64', '256,128', '512,256,128']; default '128,64'; DeepFM MLP" in text
    assert "- cf_weight: float in [0.0, 1.0]; default 0.85; EASE item-CF vs content-graph similarity" in text


def test_markdown_lists_every_parameter_and_where_it_applies(space):
    text = space.markdown()
    for p in space.parameters:
        assert f"| `{p.name}` | {p.domain()} | `{p.default}` | {p.stage} |" in text
    assert "| `k` | int in [50, 3000], log scale | `500` | serving | all pipelines |" in text
    assert "| `lr` | float in [0.0001, 0.03], log scale | `0.003` | recall | two_tower, two_tower+deepfm |" in text
    assert "| `negatives` | int in [4, 128], log scale | `32` | ranker | heuristic+deepfm, two_tower+deepfm |" in text
    assert "`k >= top_n`" in text


def test_readme_table_is_the_space_file():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- space:begin -->\n", 1)[1].split("\n<!-- space:end -->", 1)[0]
    assert table == SearchSpace.load().markdown(), "README's search-space table is stale: paste `rectune space` into it"
