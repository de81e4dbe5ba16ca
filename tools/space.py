"""The tuning search space: which PipelineConfig fields a tuner may change, and within what.

The space is data (tools/search_space.toml) read by the LLM prompt (`describe`), the
Optuna baseline (`suggest`, `distributions`) and the docs (`markdown`). Defaults, field
types, stages and the pipelines a parameter applies to come from
models.pipeline.PipelineConfig, so the file declares only ranges, choices, help and
constraints between parameters.
"""

from __future__ import annotations

import difflib
import numbers
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rectune.models.errors import ConfigError, InvalidProposal
from rectune.models.pipeline import PIPELINES, PipelineConfig

if TYPE_CHECKING:
    import optuna

DEFAULT_FILE = Path(__file__).with_name("search_space.toml")
# recall / ranker are the pipeline itself, and the comparison protocol replicates over
# seeds: tuning the seed would fit noise.
NOT_TUNABLE = ("recall", "ranker", "seed")
_FIELDS = {f.name: f for f in fields(PipelineConfig)}
_KEYS = {"int": {"type", "low", "high", "log", "help"}, "float": {"type", "low", "high", "log", "help"},
         "categorical": {"type", "choices", "help"}}
_SYMBOLS = {">=": "≥", "<=": "≤"}

Value = int | float | str


def _as_int(value: Any) -> int | None:
    """64 and 64.0 are integers; True, 64.5 and "64" are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value) if isinstance(value, numbers.Integral) or float(value).is_integer() else None


def _as_float(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)


def _as_str(value: Any) -> str | None:
    """Sequence fields (DeepFM `hidden`) take "128,64", "128, 64" or [128, 64]."""
    if isinstance(value, (list, tuple)) and value and all(_as_int(v) is not None for v in value):
        return ",".join(str(_as_int(v)) for v in value)
    return "".join(value.split()) if isinstance(value, str) else None


_CONVERT = {int: _as_int, float: _as_float, str: _as_str}


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    """`int`, `float` or `categorical`."""
    default: Value
    """PipelineConfig's default, in the space's form (`hidden` as "128,64")."""
    help: str
    stage: str
    """PipelineConfig's stage: `recall` / `ranker` (a change retrains) or `serving` (it does not)."""
    used_by: tuple[str, ...]
    """The stage models it affects (PipelineConfig metadata); empty = every pipeline."""
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    choices: tuple[Value, ...] = ()

    def applies_to(self, pipeline: str) -> bool:
        return not self.used_by or any(model in self.used_by for model in PIPELINES[pipeline])

    def check(self, value: Any) -> tuple[Value | None, list[str]]:
        """The value in the space's form (None if it has the wrong type) and what is wrong with it.

        An out-of-range number keeps its value so that constraints can still be checked.
        """
        if self.type == "categorical":
            choice = _CONVERT[type(self.choices[0])](value)
            if choice in self.choices:
                return choice, []
            return None, [f"{self.name} must be one of {list(self.choices)!r}, but got {value!r}"]
        number = (_as_int if self.type == "int" else _as_float)(value)
        if number is None:
            return None, [f"{self.name} must be {'an integer' if self.type == 'int' else 'a number'}, but got {value!r}"]
        if not self.low <= number <= self.high:
            return number, [f"{self.name}={number!r} is out of range [{self.low!r}, {self.high!r}]"]
        return number, []

    def domain(self) -> str:
        if self.type == "categorical":
            return f"one of {list(self.choices)!r}"
        return f"{self.type} in [{self.low!r}, {self.high!r}]" + (", log scale" if self.log else "")

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(self.choices)
        return (IntDistribution if self.type == "int" else FloatDistribution)(self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Constraint:
    """`left >= right` or `left <= right` between two parameters."""

    name: str
    left: str
    op: str
    right: str

    def problem(self, values: dict) -> str | None:
        """None when it holds or when either side is absent (not applicable, or of the wrong type)."""
        a, b = values.get(self.left), values.get(self.right)
        if a is None or b is None or (a >= b if self.op == ">=" else a <= b):
            return None
        return f"{self.left}={a!r} must be {_SYMBOLS[self.op]} {self.right}={b!r}"

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


def _parameter(name: str, entry: Any, where: str) -> Parameter:
    def fail(problem: str):
        raise ConfigError(f"{where}: {problem}")

    if name not in _FIELDS:
        close = difflib.get_close_matches(name, list(_FIELDS), n=1)
        fail(f"PipelineConfig has no field {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    if name in NOT_TUNABLE:
        fail(f"{name} is not tunable")
    if not isinstance(entry, dict):
        fail(f"must be a table, but got {entry!r}")
    kind = entry.get("type")
    if kind not in _KEYS:
        fail(f"type must be one of {list(_KEYS)}, but got {kind!r}")
    if set(entry) - _KEYS[kind]:
        fail(f"unknown key(s) {sorted(set(entry) - _KEYS[kind])} for a {kind} parameter; allowed: {sorted(_KEYS[kind])}")
    if not isinstance(entry.get("help"), str) or not entry["help"].strip():
        fail(f"help must be a non-empty string, but got {entry.get('help')!r}")
    field = _FIELDS[name]
    default = field.default
    common = dict(name=name, type=kind, help=entry["help"].strip(), stage=field.metadata["stage"],
                  used_by=field.metadata["used_by"],
                  default=",".join(map(str, default)) if isinstance(default, tuple) else default)
    if kind == "categorical":
        choices = entry.get("choices")
        kinds = {type(c) for c in choices} if isinstance(choices, list) else set()
        if not (choices and len(kinds) == 1 and kinds <= set(_CONVERT)):
            fail(f"choices must be a non-empty list of integers, numbers or strings of one type, but got {choices!r}")
        for choice in choices:
            try:
                PipelineConfig.from_dict({name: choice})
            except ConfigError as exc:
                fail(f"choice {choice!r} is not a valid PipelineConfig value: {exc}")
        parameter = Parameter(**common, choices=tuple(choices))
    else:
        if field.type != kind:
            fail(f"type {kind!r} does not match the PipelineConfig field type {field.type!r}")
        convert = _as_int if kind == "int" else _as_float
        bounds = {key: convert(entry.get(key)) for key in ("low", "high")}
        for key, bound in bounds.items():
            if bound is None:
                fail(f"{key} must be {'an integer' if kind == 'int' else 'a number'}, but got {entry.get(key)!r}")
        if bounds["low"] >= bounds["high"]:
            fail(f"low must be < high, but got low={bounds['low']!r}, high={bounds['high']!r}")
        log = entry.get("log", False)
        if not isinstance(log, bool):
            fail(f"log must be true or false, but got {log!r}")
        if log and bounds["low"] <= 0:
            fail(f"a log scale needs low > 0, but got low={bounds['low']!r}")
        parameter = Parameter(**common, **bounds, log=log)
    _, problems = parameter.check(parameter.default)
    if problems:
        fail(f"the PipelineConfig default does not fit: {problems[0]}")
    return parameter


def _constraint(name: str, text: Any, known: dict[str, Parameter], where: str) -> Constraint:
    match = re.fullmatch(r"\s*(\w+)\s*(>=|<=)\s*(\w+)\s*", text) if isinstance(text, str) else None
    if not match:
        raise ConfigError(f"{where}: must read \"a >= b\" or \"a <= b\", but got {text!r}")
    left, op, right = match.groups()
    for side in (left, right):
        if side not in known:
            raise ConfigError(f"{where}: {side!r} is not a parameter of the space")
    return Constraint(name, left, op, right)


def _unknown_pipeline(pipeline: Any) -> str:
    return f"pipeline must be one of {list(PIPELINES)}, but got {pipeline!r}"


@dataclass(frozen=True)
class SearchSpace:
    parameters: tuple[Parameter, ...]
    """In file order, which is also the order of every dict and listing."""
    constraints: tuple[Constraint, ...]
    path: Path
    inert: tuple[tuple[str, str, str], ...] = ()
    """(recall model, parameter, why) for parameters that change nothing on the dataset at hand
    (set by the trial runner, which knows it: `with_inert`); tuners leave them at their defaults."""

    @classmethod
    def load(cls, path: str | Path = DEFAULT_FILE) -> SearchSpace:
        """Read and check a space file; ConfigError names the file and the entry at fault."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the search space ({exc.strerror})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
        if set(data) - {"parameters", "constraints"}:
            raise ConfigError(f"{path}: unknown table(s) {sorted(set(data) - {'parameters', 'constraints'})}; "
                              "expected [parameters.NAME] and [constraints]")
        if not isinstance(data.get("parameters"), dict) or not data["parameters"]:
            raise ConfigError(f"{path}: declares no [parameters.NAME] table")
        if not isinstance(data.get("constraints", {}), dict):
            raise ConfigError(f"{path}: [constraints] must be a table of NAME = \"a >= b\", but got {data['constraints']!r}")
        parameters = {name: _parameter(name, entry, f"{path}: [parameters.{name}]")
                      for name, entry in data["parameters"].items()}
        constraints = tuple(_constraint(name, text, parameters, f"{path}: [constraints] {name}")
                            for name, text in data.get("constraints", {}).items())
        defaults = {name: p.default for name, p in parameters.items()}
        for constraint in constraints:
            if problem := constraint.problem(defaults):
                raise ConfigError(f"{path}: [constraints] {constraint.name}: the PipelineConfig defaults break it: {problem}")
        return cls(tuple(parameters.values()), constraints, path)

    def parameters_for(self, pipeline: str) -> list[Parameter]:
        if pipeline not in PIPELINES:
            raise ConfigError(_unknown_pipeline(pipeline))
        return [p for p in self.parameters if p.applies_to(pipeline)]

    def tunable(self, pipeline: str, objective: str) -> list[Parameter]:
        """The parameters of `pipeline` that can move `objective`: what every tuner searches.

        The others keep their defaults, because a trial that changes only them repeats a
        tried one: without a ranker the top-N is taken directly, so K changes nothing
        (unless the objective is measured at K); an objective not measured at the top-N, such
        as `ndcg@20`, is scored on the first 20 items whatever `top_n` is; and `inert` names
        what the dataset makes inert."""
        cutoff = objective.strip().lower().rpartition("@")[2]
        inert = {name for recall, name, _ in self.inert if recall == PIPELINES[pipeline][0]}
        if PIPELINES[pipeline][1] == "none" and cutoff != "k":
            inert.add("k")
        if cutoff != "topn":
            inert.add("top_n")
        return [p for p in self.parameters_for(pipeline) if p.name not in inert]

    def with_inert(self, found: dict[str, dict[str, str]]) -> SearchSpace:
        """This space with `found` (recall model → parameter → why it changes nothing) as its inert parameters."""
        return replace(self, inert=tuple((recall, name, why) for recall, names in found.items() for name, why in names.items()))

    def defaults(self, pipeline: str) -> dict[str, Value]:
        return {p.name: p.default for p in self.parameters_for(pipeline)}

    def validate(self, pipeline: str, values: dict, base: dict | None = None) -> dict[str, Value]:
        """Every parameter of `pipeline`: defaults, overridden by `base`, overridden by `values`.

        Values come back in the space's form (64.0 → 64, [128, 64] → "128,64"); any
        violation raises InvalidProposal listing all of them.
        """
        if pipeline not in PIPELINES:
            raise InvalidProposal([_unknown_pipeline(pipeline)])
        params = {p.name: p for p in self.parameters_for(pipeline)}
        problems, valid = [], {}
        for name, value in {**self.defaults(pipeline), **(base or {}), **values}.items():
            if name not in params:
                problems.append(self._not_applicable(name, pipeline, list(params)))
                continue
            valid[name], found = params[name].check(value)
            problems += found
        problems += [p for c in self.constraints if (p := c.problem(valid))]
        if problems:
            raise InvalidProposal(problems)
        return valid

    def _not_applicable(self, name: Any, pipeline: str, known: list[str]) -> str:
        owner = next((p for p in self.parameters if p.name == name), None)
        if owner:
            return f"{name} does not apply to pipeline {pipeline} (it only affects {', '.join(owner.used_by)})"
        if name in _FIELDS:
            return f"{name} is not tunable (tunable for {pipeline}: {', '.join(known)})"
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown parameter {name!r} (known for {pipeline}: {', '.join(known)}{hint})"

    def to_config(self, pipeline: str, values: dict) -> PipelineConfig:
        """The validated values over PipelineConfig's defaults (seed and untuned fields included)."""
        return PipelineConfig.from_dict({"pipeline": pipeline, **self.validate(pipeline, values)})

    def distributions(self, pipeline: str, objective: str | None = None) -> dict[str, optuna.distributions.BaseDistribution]:
        """The fixed distributions `suggest` samples from: for `study.ask(fixed_distributions=...)`;
        with `objective`, only those of the tunable parameters."""
        parameters = self.parameters_for(pipeline) if objective is None else self.tunable(pipeline, objective)
        return {p.name: p.distribution() for p in parameters}

    def suggest(self, trial: optuna.trial.BaseTrial, pipeline: str, objective: str | None = None) -> dict[str, Value]:
        """Sample every parameter of `pipeline` (with `objective`: its tunable ones, the others at
        their defaults), then repair constraints by moving the left side.

        Each parameter keeps one fixed distribution (e.g. k always in [50, 3000]) because
        TPE models every parameter from past trials under a single distribution, and LLM
        proposals enter the same study through `distributions()`; a k range that followed
        top_n would change trial by trial. So k and top_n are sampled independently and a
        k below top_n is raised to top_n: `trial.params` keeps the sample, the returned
        dict is what to evaluate, and the user attribute `space_repairs` records the change.
        """
        values = self.defaults(pipeline)
        for p in self.parameters_for(pipeline) if objective is None else self.tunable(pipeline, objective):
            if p.type == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, p.choices)
            elif p.type == "int":
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        repairs = []
        for c in self.constraints:
            if c.problem(values):
                repairs.append(f"{c.left}={values[c.left]!r} set to {c.right}={values[c.right]!r} ({c})")
                values[c.left] = values[c.right]
        if repairs:
            trial.set_user_attr("space_repairs", repairs)
        return self.validate(pipeline, values)

    def describe(self, pipeline: str, objective: str | None = None) -> str:
        """The space of `pipeline` for an LLM prompt: one line per parameter (with `objective`:
        per tunable one), then the constraints."""
        lines = [f"Tunable parameters of {pipeline} (name: domain; default; meaning):"]
        for p in self.parameters_for(pipeline) if objective is None else self.tunable(pipeline, objective):
            note = "; serving only, no retraining" if p.stage == "serving" else ""
            lines.append(f"- {p.name}: {p.domain()}; default {p.default!r}{note}; {p.help}")
        names = {p.name for p in (self.parameters_for(pipeline) if objective is None else self.tunable(pipeline, objective))}
        lines += [f"Constraint: {c}" for c in self.constraints if {c.left, c.right} <= names]
        return "\n".join(lines)

    def markdown(self) -> str:
        """Every parameter as a Markdown table, with the pipelines it applies to, then the constraints."""
        rows = ["| parameter | domain | default | stage | applies to | meaning |", "|---|---|---|---|---|---|"]
        for p in self.parameters:
            pipelines = [name for name in PIPELINES if p.applies_to(name)]
            applies = "all pipelines" if len(pipelines) == len(PIPELINES) else ", ".join(pipelines)
            rows.append(f"| `{p.name}` | {p.domain()} | `{p.default}` | {p.stage} | {applies} | {p.help.replace('|', '/')} |")
        rows += ["", *(f"Constraint `{c.name}`: `{c}`, checked wherever both parameters apply." for c in self.constraints)]
        return "\n".join(rows)
