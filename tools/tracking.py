"""Recording sessions and trials in MLflow.

One experiment per dataset, one parent run per session (a tuning session or a baseline
run), one nested run per trial. MlflowClient is used rather than the fluent API because
it carries no process-wide active run: a session can be resumed by run id, and several
sessions can be open in one process. mlflow is imported inside methods (~1.5 s import).

Everything logged (params, tags, run names, artifact text) passes through `redact` first:
a tracking server is read by many people and keeps what it is given forever.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from rectune.models.config import tracking_uri as resolve_tracking_uri
from rectune.models.errors import ConfigError
from rectune.tools.cache import file_lock
from rectune.tools.noise import Interval
from rectune.tools.trial import TrialResult

if TYPE_CHECKING:
    from mlflow import MlflowClient

SECRET_ENVS = ("OPENAI_API_KEY", "DEEPSEEK_API_KEY", "RECTUNE_LLM_API_KEY")
REDACTED = "***"
# `token(?!s|iz)` and `auth(?!or)` keep max_tokens, tokenizer and author loggable.
_SECRET_KEY = re.compile(r"api_?key|token(?!s|iz)|secret|password|authorization|auth(?!or)", re.IGNORECASE)
_SECRET_TEXT = re.compile(
    r"(?P<name>[\w-]*(?:api[_-]?key|token|secret|password|authorization|auth)[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?:bearer|basic)\s+)?[^\s\"',;]+"
    r"|\bbearer\s+[\w.~+/=-]+"
    r"|\bsk-[\w-]{16,}"
    # the password of a database or server URL: postgresql://user:PASSWORD@host/db
    r"|(?P<userinfo>://[^\s/:@]+:)[^\s/@]+(?=@)",
    re.IGNORECASE,
)
# Shorter values are placeholders such as EMPTY or dummy (local vLLM/Ollama), not keys;
# scrubbing them would mangle ordinary words.
_MIN_SECRET_LENGTH = 8
_METRIC_NAME_BAD = re.compile(r"[^\w.\- /]")


def scrub(text: str) -> str:
    """`text` with API keys, bearer tokens, URL passwords and `name: value` credentials replaced by ***."""
    for env in SECRET_ENVS:
        secret = os.environ.get(env, "")
        if len(secret) >= _MIN_SECRET_LENGTH:
            text = text.replace(secret, REDACTED)
    return _SECRET_TEXT.sub(lambda m: (m["name"] or m["userinfo"] or "") + REDACTED, text)


def filter_value(text: str) -> str:
    """`text` quoted for an MLflow search filter; session, study and group names are the user's."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ConfigError(f"{text!r}: a name used in MLflow searches may hold ' or \" but not both")


def one_line(error: BaseException) -> str:
    """An exception as one scrubbed line: its first line, or its type when it has no message."""
    text = str(error).strip()
    return scrub(text.splitlines()[0]) if text else type(error).__name__


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `mapping` safe to log: secret-named keys → ***, secrets inside strings → ***."""
    return {
        key: REDACTED if _SECRET_KEY.search(str(key)) else _redact_value(value) for key, value in mapping.items()
    }


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    return scrub(value) if isinstance(value, str) else value


def metric_name(name: str) -> str:
    """`name` in the characters every MLflow backend accepts (`ndcg@20` → `ndcg_at_20`)."""
    return _METRIC_NAME_BAD.sub("_", name.replace("@", "_at_"))


def trial_key(study: str, number: int) -> str:
    """The MLflow run key of trial `number` of ledger study `study`."""
    return f"{study}/trial-{number}"


def metric_columns(values: Mapping[str, float], top_n: int, k: int, fixed: Iterable[int] = ()) -> dict[str, float]:
    """One trial's metrics under names every trial of a study shares, whatever its TopN and K:
    a list metric at the trial's TopN is `name@topn` (`precision@30` → `precision@topn`), at 20
    (computed for every trial) or at a cutoff in `fixed` (the objective's) it keeps its number,
    at any other cutoff it is left out; the candidate recall at K is `candidate_recall@k`."""
    from rectune.models.pipeline import ANCHOR_CUTOFF

    kept = {ANCHOR_CUTOFF, *fixed}
    columns = {}
    for name, value in values.items():
        base, at, cutoff = name.partition("@")
        if not at or not cutoff.isdigit():
            columns[name] = value
        elif base.startswith("candidate_recall"):
            columns[f"{base}@k" if int(cutoff) == k else name] = value
        else:
            columns |= {f"{base}@{cutoff}": value} if int(cutoff) in kept else {}
            columns |= {f"{base}@topn": value} if int(cutoff) == top_n else {}
    return columns


def trial_metrics(result: TrialResult) -> dict[str, float]:
    """What MLflow records of a trial: the objective, the costs (train_seconds: this trial's wait for
    its fitted stages; fit_seconds: what fitting them cost, also when they came from the cache), its paired difference to the
    study's best before it (`vs_best_diff`, `vs_best_low`, `vs_best_high`), and every group's metrics on
    each split under stable names (`val/cold/ndcg@20`, `val/cold/f1@topn`, which MLflow shows as
    `val/cold/ndcg_at_20`, `val/cold/f1_at_topn`); TopN is a param."""
    from rectune.models.pipeline import PipelineConfig

    spec = result.spec
    top_n, k = spec.params.get("top_n", PipelineConfig.top_n), spec.params.get("k", PipelineConfig.k)
    cutoff = spec.objective.partition("@")[2]
    fixed = (int(cutoff),) if cutoff.isdigit() else ()
    metrics = {"objective": result.objective, "latency_ms_per_user": result.latency_ms_per_user,
               "train_seconds": result.train_seconds, "eval_seconds": result.eval_seconds}
    if result.fit_seconds is not None:
        metrics["fit_seconds"] = result.fit_seconds
    if result.vs_best is not None:
        metrics |= {f"vs_best_{name}": result.vs_best[name] for name in ("diff", "low", "high")}
    for split, by_group in (("val", result.metrics), ("test", result.test_metrics or {})):
        for group, values in by_group.items():
            metrics |= {f"{split}/{group}/{name}": value for name, value in metric_columns(values, top_n, k, fixed).items()}
    return metrics


def metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table, one row per group (`overall` first), one column per metric."""
    names = sorted({name for values in metrics.values() for name in values})
    groups = sorted(metrics, key=lambda group: (group != "overall", group))
    lines = ["| group | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for group in groups:
        cells = (f"{metrics[group][name]:.4f}" if name in metrics[group] else "-" for name in names)
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI, None for anything else."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite" or parts.path in ("", "/", "/:memory:"):
        return None
    # sqlite:///rel.db → path "/rel.db" (relative to the CWD); sqlite:////abs.db → "//abs.db".
    return Path(unquote(parts.path[1:])).resolve()


def _default_artifact_root(uri: str) -> Path | None:
    """Next to a sqlite file; otherwise MLflow's choice (a server decides for its clients)."""
    database = sqlite_path(uri)
    return None if database is None else database.parent / "mlartifacts"


def _strings(mapping: Mapping[str, Any]) -> dict[str, str]:
    # Stringify first: a secret inside a nested value must meet the text scrubber too.
    return redact({str(key): str(value) for key, value in mapping.items()})


@dataclass
class TrackingSession:
    """An open parent run; trials become its nested runs."""

    client: MlflowClient
    run_id: str
    experiment_id: str

    def log_trial(
        self, result: TrialResult, tuner: str, key: str, *, trial_number: int | None = None, study: str | None = None,
        rationale: str | None = None, extra_tags: Mapping[str, Any] | None = None, run_name: str | None = None,
    ) -> str:
        """Record one finished trial as a nested run, once: a run with tag `run_key` = `key` in
        this experiment is not logged again (a process re-run after a crash finds it). Returns
        the run's id. A ledger trial is keyed by `trial_key`; a run outside the ledger (no trial
        number, no study) by its own key, which also names it unless `run_name` does."""
        # Scrubbed as the tag is stored: a key quoting a secret is stored without it.
        done = self.client.search_runs([self.experiment_id], f"tags.run_key = {filter_value(scrub(key))}", max_results=1)
        if done:
            return done[0].info.run_id
        spec = result.spec
        tags = {
            "run_key": key,
            "tuner": tuner,
            "group": spec.group,
            "groups": spec.groups,
            "pipeline": spec.pipeline,
            "trial_number": trial_number,
            "optuna_study": study,
            "cache": result.cache,
            "feasible": result.feasible,
            # The per-user values (result.per_user) stay in the ledger: thousands of numbers a run page cannot show.
            **({} if result.vs_best is None else {"within_noise": Interval.from_json(result.vs_best).within_noise,
                                                 "vs_best_trial": result.vs_best["trial"]}),
            **(extra_tags or {}),
        }
        # The trial has already run: back-date the start so MLflow's duration shows its cost.
        start = int((time.time() - result.train_seconds - result.eval_seconds) * 1000)
        run = self.client.create_run(
            self.experiment_id,
            start_time=start,
            run_name=run_name or (key if trial_number is None else f"trial-{trial_number}"),
            tags={"mlflow.parentRunId": self.run_id, **_strings({k: v for k, v in tags.items() if v is not None})},
        )
        run_id = run.info.run_id
        params = {**spec.params, "pipeline": spec.pipeline, "seed": spec.seed, "objective": spec.objective}
        _log(self.client, run_id, params=params, metrics=trial_metrics(result))
        for point in result.ranker_curve or []:  # a curve MLflow plots against the epoch
            _log(self.client, run_id, metrics={f"ranker_{name}": point[name] for name in ("train_loss", "val_loss")
                                               if point.get(name) is not None}, step=point["epoch"])
        table = "## validation\n\n" + metrics_table(result.metrics)
        if result.test_metrics:
            table += "\n## test\n\n" + metrics_table(result.test_metrics)
        self.client.log_text(run_id, scrub(table), "metrics_by_group.md")
        if rationale:
            self.client.log_text(run_id, scrub(rationale), "rationale.md")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def logged_keys(self, study: str) -> set[str]:
        """Run keys of the trials of `study` already recorded in this experiment, under any parent
        run (a worker may log trials of a study that another process's run started)."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.optuna_study = {filter_value(study)}",
                                       max_results=50000)
        # The study's parent run carries the study tag too, without a trial number. Runs logged
        # before run keys existed are known by their trial number.
        return {run.data.tags.get("run_key") or trial_key(study, int(run.data.tags["trial_number"]))
                for run in runs if "trial_number" in run.data.tags}

    def log_session_artifact(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, scrub(text), name)

    def log_session_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        _log(self.client, self.run_id, metrics=metrics, step=step)

    def log_session_tags(self, tags: Mapping[str, Any]) -> None:
        _log(self.client, self.run_id, tags=tags)


def _log(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, Any] | None = None,
    step: int = 0,
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(metric_name(k), float(v), now, step) for k, v in (metrics or {}).items()],
        params=[Param(k, v) for k, v in _strings(params or {}).items()],
        tags=[RunTag(k, v) for k, v in _strings(tags or {}).items()],
    )


def _reach_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in one line, at once, when an http(s) tracking server does not answer: MLflow's
    own client retries a dead server for minutes before its traceback."""
    import ssl
    import urllib.error
    import urllib.request

    from rectune.tools.loopback import DIRECT, is_loopback

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    # Credentials stay out of the probe (urllib would take user:password@ for the host name).
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname  # IPv6 keeps its brackets
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    probe = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/health"
    opener = DIRECT if is_loopback(uri) else urllib.request.build_opener()
    try:
        with opener.open(probe, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered; MLflow reports what the answer means
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        # A TLS failure may be this probe's alone (MLflow's client can be given other
        # certificates); any other failure is a server MLflow would retry for minutes.
        if isinstance(reason, ssl.SSLError):
            return
        raise ConfigError(f"cannot reach the MLflow tracking server {scrub(uri)}: {reason}; start it (`rectune ui` serves "
                          "the local store) or give another --tracking-uri") from error


class Tracker:
    """Opens sessions in one MLflow tracking store (URI: flag → env → rectune.toml → ./mlflow.db)."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: Path | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.artifact_root = artifact_root if artifact_root is not None else _default_artifact_root(self.tracking_uri)
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            database = sqlite_path(self.tracking_uri)
            if database is None:
                _reach_server(self.tracking_uri)
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
                return self._client
            # Two processes creating a new sqlite store at once race in its schema migration
            # (alembic: "expected to match one row"); the first access creates it, so serialise that.
            database.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(database.with_name(database.name + ".lock")):
                client = MlflowClient(tracking_uri=self.tracking_uri)
                client.search_experiments(max_results=1)
            self._client = client
        return self._client

    def experiment_id(self, dataset: str) -> str:
        """The experiment named `dataset`, created with an explicit artifact location if new.

        Without one, MLflow with a local database writes artifacts to ./mlruns in whatever
        directory the process runs in.
        """
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(dataset)
        if experiment is None:
            location = None
            if self.artifact_root is not None:
                location = (Path(self.artifact_root) / re.sub(r"[^\w.-]", "_", dataset)).resolve().as_uri()
            try:
                return self.client.create_experiment(dataset, artifact_location=location)
            except MlflowException:
                # Another process created it between our lookup and create.
                experiment = self.client.get_experiment_by_name(dataset)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            # A deleted experiment still holds its name; restoring is the only way to log to it.
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    @contextmanager
    def session(
        self,
        dataset: str,
        name: str,
        tuner: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> Iterator[TrackingSession]:
        """Open a parent run, or resume `run_id` (then `name` is ignored and only new params are
        logged); the run ends FINISHED, or FAILED/KILLED when the block raises."""
        client = self.client
        params = params or {}
        if run_id is None:
            tags = {**(tags or {}), "tuner": tuner, "dataset": dataset}
            run = client.create_run(self.experiment_id(dataset), run_name=scrub(name), tags=_strings(tags))
            _log(client, run.info.run_id, params=params)
        else:
            run = client.get_run(run_id)
            experiment = client.get_experiment(run.info.experiment_id).name
            if experiment != dataset:
                raise ConfigError(f"run {run_id} belongs to experiment {experiment!r}, not dataset {dataset!r}")
            logged = run.data.params
            changed = {k: v for k, v in _strings(params).items() if k in logged and logged[k] != v}
            if changed:
                raise ConfigError(f"run {run_id} was started with other settings; cannot resume with {changed}")
            client.update_run(run_id, status="RUNNING")
            _log(client, run_id, params={k: v for k, v in params.items() if k not in logged}, tags=tags)
        session = TrackingSession(client, run.info.run_id, run.info.experiment_id)
        try:
            yield session
        except BaseException as exc:
            client.set_terminated(session.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        client.set_terminated(session.run_id, "FINISHED")
