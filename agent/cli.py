"""The `rectune` command line.

Heavy libraries (torch, lightning, mlflow) are imported inside the commands that use
them, so `rectune --help` and the data commands start fast.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Optional

import typer

from rectune.models.errors import RectuneError
from rectune.models.formats import FORMAT_NAMES

app = typer.Typer(help="rectune: an LLM-in-the-loop tuner for recommender pipelines.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect and download datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataDirOption = typer.Option(None, "--data-dir", help="Directory with one sub-directory per dataset (env RECTUNE_DATA_DIR, or data_dir in rectune.toml; default ./data).")


def absolute_dataset_path(value: str) -> str:
    """A registered name as it is; a path made absolute, so that a study's workers, started
    from any directory, load the same files."""
    from rectune.models.loaders import DATASETS

    path = Path(value).expanduser()
    return value if value in DATASETS or not path.exists() else str(path.resolve())


DatasetOption = typer.Option("baby", "--dataset", callback=absolute_dataset_path,
                             help="A registered dataset name (see `rectune data list`), or the path of any MMRec dataset: a "
                                  "directory with NAME.inter (split by its x_label) and optional text_feat.npy / image_feat.npy.")


def say(line: str) -> None:
    """typer.echo for lines that may quote a storage, tracking or endpoint URL: its password is scrubbed."""
    from rectune.tools.tracking import scrub

    typer.echo(scrub(line))


def fail(error: RectuneError) -> None:
    from rectune.tools.tracking import scrub

    # Messages may quote a storage or endpoint URL, and its password must not reach the terminal.
    typer.secho(f"error: {scrub(str(error))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def command_line_defaults() -> None:
    """Before any command: rectune's own warnings (data notes, cache problems) as one
    `warning:` line on stderr each — Python's default format adds a file:line and a source
    line a user has no use for — and MLflow's usage telemetry off."""
    import warnings

    # MLflow reports usage to its makers on import unless told not to; a tuner run on research
    # data, often offline, should not phone home (MLFLOW_DISABLE_TELEMETRY=false allows it).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from rectune.models.errors import RectuneWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RectuneWarning):
            typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("default", RectuneWarning)  # once per message and place, as Python does


# An Enum, not Literal: typer ≥ 0.12 (our floor) renders Enum members as choices.
DataFormat = enum.Enum("DataFormat", {name: name for name in FORMAT_NAMES}, type=str)


@data_app.command("info")
def data_info(
    name: str = typer.Argument(..., help="A registered dataset name (see `rectune data list`), or with --format a file or directory."),
    data_dir: Optional[Path] = DataDirOption,
    split: Optional[str] = typer.Option(None, help="given | random[:0.8,0.1,0.1] | leave-last-out (default: the dataset's own)."),
    seed: int = typer.Option(42, help="Seed of the random split."),
    format: Optional[DataFormat] = typer.Option(None, "--format", help="Read NAME as a path in this format instead of a registered name."),
) -> None:
    """Load a dataset and print its size, split and features as JSON (data-quality warnings go to stderr)."""
    from rectune.models.loaders import load_dataset
    from rectune.models.splits import SplitStrategy

    try:
        dataset = load_dataset(name, data_dir, SplitStrategy.parse(split, seed) if split else None,
                               format=format.value if format else None)
    except RectuneError as error:
        fail(error)
    typer.echo(json.dumps(dataset.summary(), indent=2))


@data_app.command("list")
def data_list(data_dir: Optional[Path] = DataDirOption) -> None:
    """List the registered datasets and whether each is present in the data directory."""
    from rectune.models.config import data_dir as resolve
    from rectune.models.loaders import DATASETS

    root = resolve(data_dir)
    for source in DATASETS.values():
        present = "present" if (root / source.directory).is_dir() else "missing"
        typer.echo(f"{source.name:<12} {present:<8} {root / source.directory}  {source.description}")


@data_app.command("pull")
def data_pull(
    name: str = typer.Argument(..., help="A registered dataset name: baby, ml-100k or beauty-2023."),
    data_dir: Optional[Path] = DataDirOption,
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Fetch each file as BASE_URL/<file name> from a mirror (env RECTUNE_DOWNLOAD_BASE_URL)."),
    force: bool = typer.Option(False, "--force", help="Download again even when the files are present."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for a connection and for each read."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Download a dataset's public source into the data directory, load it to check it, print its summary."""
    from rectune.models.download import pull

    try:
        result = pull(name, data_dir, base_url=base_url, progress=progress, force=force, timeout=timeout)
    except RectuneError as error:
        fail(error)
    for path in result.downloaded:
        typer.echo(f"downloaded {path}")
    for path in result.skipped:
        typer.echo(f"present    {path} (--force downloads it again)")
    typer.echo(json.dumps(result.summary, indent=2))


def parse_assignments(assignments: list[str]) -> dict:
    """`key=value` pairs; values are read as JSON where they parse (numbers, true, lists)."""
    values = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, but got {assignment!r}", param_hint="--set")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    return values


@app.command("evaluate")
def evaluate(
    dataset_name: str = DatasetOption,
    data_dir: Optional[Path] = DataDirOption,
    groups_spec: str = typer.Option("prefix", "--groups", help="User groups: all, prefix[:LETTERS[:MAX]], activity[:Q], age, gender, occupation, attr:COLUMN, file:PATH."),
    pipelines: str = typer.Option("all", help="Comma-separated pipelines (heuristic, heuristic+deepfm, two_tower, two_tower+deepfm) or all."),
    split: str = typer.Option("val", help="val (for choosing) or test (for reporting)."),
    objective: str = typer.Option("ndcg@20", help="Metric that picks the best pipeline per group, e.g. ndcg@20, recall@20, f1@20."),
    assignments: list[str] = typer.Option([], "--set", help="Override a pipeline parameter, e.g. --set k=1000 --set top_n=50 (repeatable)."),
    out: Optional[Path] = typer.Option(None, help="Also write the full results as JSON here."),
    progress: bool = typer.Option(True, help="Show progress bars while training."),
) -> None:
    """Train the candidate pipelines with default parameters and compare them per user group."""
    from tqdm import tqdm

    from rectune.models.features import attach_item_features
    from rectune.models.groups import make_groups, require_held_out
    from rectune.models.loaders import load_dataset
    from rectune.models.pipeline import PIPELINES, Pipeline, PipelineConfig

    names = list(PIPELINES) if pipelines == "all" else [p.strip() for p in pipelines.split(",")]
    if split not in ("val", "test"):
        raise typer.BadParameter(f"must be val or test, but got {split!r}", param_hint="--split")
    try:
        overrides = parse_assignments(assignments)
        configs = [PipelineConfig.from_dict({"pipeline": name, **overrides}) for name in names]
        dataset = attach_item_features(load_dataset(dataset_name, data_dir), progress=progress)
        groups = make_groups(dataset, groups_spec)
        require_held_out(dataset, groups, (split,))
        typer.echo(f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items, item features {dataset.item_features.source}; "
                   f"groups {groups_spec}: " + ", ".join(f"{g} {n}" for g, n in groups.sizes().items()))
        results = {}
        for config in tqdm(configs, desc="pipelines", disable=not progress):
            pipeline = Pipeline(config).fit(dataset)
            evaluation = pipeline.evaluate(dataset, split, groups)
            results[config.name] = {"config": config.to_dict(), "fit_seconds": pipeline.fit_seconds,
                                    "overall": evaluation.metrics.overall, "groups": evaluation.metrics.groups}
    except RectuneError as error:
        fail(error)
    if objective not in next(iter(results.values()))["overall"]:
        fail(RectuneError(f"unknown objective {objective!r}; computed metrics: {sorted(next(iter(results.values()))['overall'])}"))
    top_n = configs[0].top_n
    columns = list(dict.fromkeys(["recall@20", "ndcg@20", f"precision@{top_n}", f"recall@{top_n}", f"f1@{top_n}", objective]))
    typer.echo(f"\n{split} metrics (full ranking, seen items masked); * = best {objective} in the group")
    typer.echo(f"{'group':<12} {'pipeline':<18} " + " ".join(f"{c:>12}" for c in columns))
    for group in ["overall", *groups.labels]:
        rows = {name: (r["overall"] if group == "overall" else r["groups"][group]) for name, r in results.items()}
        best = max(rows, key=lambda name: rows[name][objective])
        for name, metrics in rows.items():
            mark = "*" if name == best else " "
            typer.echo(f"{group:<12} {mark}{name:<17} " + " ".join(f"{metrics[c]:>12.4f}" for c in columns))
    if out is not None:
        out.write_text(json.dumps({"dataset": dataset.summary(), "groups": groups.sizes(), "split": split, "results": results}, indent=2))
        typer.echo(f"wrote {out}")


@app.command("space")
def space(
    pipeline: Optional[str] = typer.Option(None, help="Show one pipeline's parameters as the LLM sees them; default: the whole space as a markdown table."),
) -> None:
    """Print the search space (tools/search_space.toml): ranges, defaults, what each parameter does."""
    from rectune.tools.space import SearchSpace

    try:
        loaded = SearchSpace.load()
        typer.echo(loaded.describe(pipeline) if pipeline else loaded.markdown())
    except RectuneError as error:
        fail(error)


StorageOption = typer.Option(None, "--storage", help="Optuna storage URL for the trial ledger (env RECTUNE_STORAGE; default sqlite:///./rectune-optuna.db; PostgreSQL for many machines).")
TrackingOption = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (env MLFLOW_TRACKING_URI / RECTUNE_TRACKING_URI; default sqlite:///./mlflow.db).")
CacheDirOption = typer.Option(None, "--cache-dir", help="Where features and trained models are cached (env RECTUNE_CACHE_DIR; default ~/.cache/rectune).")


@app.command("baseline")
def baseline(
    dataset_name: str = DatasetOption,
    groups_spec: str = typer.Option("activity", "--groups", help="User-group spec (see `rectune evaluate --help`)."),
    group: str = typer.Option(..., help="The group whose validation objective is tuned, or `all`."),
    pipeline: str = typer.Option(..., help="heuristic, heuristic+deepfm, two_tower or two_tower+deepfm."),
    budget: int = typer.Option(20, min=1, help="Trials in total, the default configuration (trial 0) included."),
    sampler: str = typer.Option("tpe", help="A registered tuner that proposes on its own: tpe, random (Optuna, arguments pinned, logged to MLflow), local (one-parameter neighbours of the best trial), menu (the agent's candidate menu without the LLM: always its first candidate), default (trial 0 only) or tpe-warm (TPE that first runs other groups' best configurations; here, with no other groups, the same as tpe — `rectune compare` gives it the transfers)."),
    seed: int = typer.Option(0, help="Seed of the sampler and of every model."),
    objective: str = typer.Option("ndcg@20", help="Validation metric to maximise: ndcg@20, recall@50, f1@topn, …"),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="Per-user recommendation latency budget; slower trials are infeasible."),
    study: Optional[str] = typer.Option(None, help="Study name (default: derived from the settings)."),
    storage: Optional[str] = StorageOption,
    tracking_uri: Optional[str] = TrackingOption,
    data_dir: Optional[Path] = DataDirOption,
    cache_dir: Optional[Path] = CacheDirOption,
    progress: bool = typer.Option(True, help="Show a progress bar with the best value so far."),
) -> None:
    """Tune one pipeline on one group with a tuner that needs no LLM (TPE, random or local search) for a fixed budget; re-running the same command continues to the budget."""
    from rectune.tools.adoption import adopt
    from rectune.tools.baseline import check_sampler, run_baseline, study_name
    from rectune.tools.ledger import storage_url
    from rectune.tools.runner import TrialRunner
    from rectune.tools.study import StudyContext
    from rectune.tools.tracking import Tracker

    try:
        check_sampler(sampler)
        context = StudyContext(dataset_name, groups_spec, group, pipeline, objective, seed, budget, sampler, max_latency_ms)
        # Settings first, then the tracking store, then the data: no study is written before all pass.
        context.check()
        tracker = Tracker(tracking_uri)
        tracker.client  # opens the store now, a server's /health included
        runner = TrialRunner.open(dataset_name, groups_spec, data_dir=data_dir, cache_dir=cache_dir,
                                  max_latency_ms=max_latency_ms, progress=False)
        runner.users(group)  # fail now, not after the first trial, on an unknown group
        url = storage_url(storage)
        finished = run_baseline(context, runner, url, study or study_name(context), tracker, progress)
    except RectuneError as error:
        fail(error)
    top = finished.best()
    if top is None or not top.feasible:
        why = (f"no trial met --max-latency-ms {max_latency_ms:g}; raise it or tune for speed (`rectune space` lists what "
               "changes latency)") if max_latency_ms is not None else "no trial finished; the failed trials' errors are in the study"
        say(f"study {finished.name} in {url}: {why}")
        raise typer.Exit(1)
    say(f"study {finished.name} in {url}: best {objective} = {top.objective:.4f} (trial {top.number}, {top.tuner}) "
        f"with {json.dumps(top.params)}")
    adoption = adopt(finished.history(), runner.space.defaults(pipeline), seed)
    gain = "" if adoption.gain is None else f" ({adoption.gain.text()} over the default on validation)"
    say(f"adopted: {'the default' if adoption.kept_default else f'trial {adoption.record.number}'} — {adoption.reason}{gain}")


@app.command("worker")
def worker(
    study: str = typer.Option(..., help="Name of an existing study (created by `rectune baseline` or the agent)."),
    storage: Optional[str] = StorageOption,
    sample: bool = typer.Option(True, help="When the queue is empty, run the proposals of the study's tuner up to its budget (not for the LLM agent's studies: its proposals come from its session)."),
    max_trials: Optional[int] = typer.Option(None, min=1, help="Stop after this many trials."),
    tracking_uri: Optional[str] = TrackingOption,
    data_dir: Optional[Path] = DataDirOption,
    cache_dir: Optional[Path] = CacheDirOption,
) -> None:
    """Execute the queued trials of a study; several workers (on several machines, with a shared PostgreSQL storage) work on one study in parallel."""
    from rectune.tools.baseline import work
    from rectune.tools.ledger import storage_url
    from rectune.tools.tracking import Tracker

    try:
        done = work(storage_url(storage), study, data_dir=data_dir, cache_dir=cache_dir, tracker=Tracker(tracking_uri),
                    sample=sample, max_trials=max_trials, progress=False)
    except RectuneError as error:
        fail(error)
    typer.echo(f"worker {os.getpid()}: ran {done} trial(s) of {study}")


LLMBaseUrlOption = typer.Option(None, "--llm-base-url", help="Any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp, DeepSeek…) (env RECTUNE_LLM_BASE_URL, or llm_base_url in rectune.toml); default: DeepSeek if DEEPSEEK_API_KEY is set, else OpenAI if OPENAI_API_KEY is set, else the embedded local model (`embedded` forces it). Its API key comes from RECTUNE_LLM_API_KEY (not sent to an endpoint named by ./rectune.toml, which may come with a cloned repository): DEEPSEEK_API_KEY and OPENAI_API_KEY are only ever sent to api.deepseek.com and api.openai.com.")
LLMModelOption = typer.Option(None, "--llm-model", help="Model name at that endpoint (env RECTUNE_LLM_MODEL, or llm_model in rectune.toml). Each call waits RECTUNE_LLM_TIMEOUT seconds (default 120; 900 for the embedded model), saying so every 30 s; blips are retried for about a minute.")
CheckpointOption = typer.Option("rectune-sessions.db", "--checkpoint", help="LangGraph checkpoint: a SQLite file, or a postgresql:// URL for a shared deployment.")


def ask_terminal(payload: dict) -> dict | None:
    """Show a proposal and read approve / edit / reject from the terminal (None at end of input)."""
    typer.echo(f"\n[approve] group {payload['group']} ({payload['pipeline']}), trial {payload['trial']}; "
               f"best so far: trial {payload['best']['trial']} = {payload['best']['objective']:.5f}")
    for name, (old, new) in payload["diff"].items():
        typer.echo(f"  {name}: {old} → {new}")
    typer.echo(f"  rationale: {payload['rationale']}")
    if payload.get("error"):
        typer.secho(f"  {payload['error']}", fg=typer.colors.RED)
    while True:
        try:
            line = input("approve [a], edit [e NAME=VALUE ...], reject [r COMMENT]: ").strip()
        except EOFError:
            return None
        word, _, rest = line.partition(" ")
        if word in ("a", "approve", "y", "yes"):
            return {"action": "approve"}
        if word in ("r", "reject", "n", "no"):
            return {"action": "reject", "comment": rest.strip()}
        if word in ("e", "edit"):
            try:
                return {"action": "edit", "changes": parse_assignments(rest.split())}
            except typer.BadParameter as error:
                typer.echo(f"  {error.message}")
                continue
        typer.echo("  answer a, e NAME=VALUE ..., or r COMMENT")


def _finish(values: dict, tracking_uri: str) -> None:
    if values.get("report"):
        typer.echo(f"report: {values['report']}")
        say(f"MLflow: {tracking_uri} (run {values.get('mlflow_run_id')}); browse it with `rectune ui --tracking-uri {tracking_uri}`")


@app.command("tune")
def tune(
    dataset_name: str = DatasetOption,
    groups_spec: str = typer.Option("activity", "--groups", help="User-group spec (see `rectune evaluate --help`)."),
    budget: int = typer.Option(10, min=2, help="Trials per group, the default configuration (trial 0) included."),
    approve: str = typer.Option("ask", help="ask: a person approves, edits or rejects each proposal; auto: run every valid proposal."),
    objective: str = typer.Option("ndcg@20", help="Validation metric to maximise."),
    seed: int = typer.Option(0, help="Seed of every model."),
    session: Optional[str] = typer.Option(None, help="Session name (default: dataset-groups-time)."),
    max_llm_calls: Optional[int] = typer.Option(None, min=1, help="LLM calls per group before tuning it stops: one a trial, and one more for each proposal a person rejects (default 3 × budget)."),
    max_minutes: Optional[float] = typer.Option(None, min=0.0, help="Wall-clock minutes for tuning, counted from the end of model selection (a stopped session's downtime counts too); past it, each remaining group keeps its best trial so far. 0 skips tuning."),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="Per-user recommendation latency budget; slower trials are recorded as infeasible in the ledger."),
    may_finish: bool = typer.Option(True, "--may-finish/--full-budget", help="Let the LLM stop a group before its budget (--full-budget: it must use every trial)."),
    llm_base_url: Optional[str] = LLMBaseUrlOption,
    llm_model: Optional[str] = LLMModelOption,
    storage: Optional[str] = StorageOption,
    tracking_uri: Optional[str] = TrackingOption,
    data_dir: Optional[Path] = DataDirOption,
    cache_dir: Optional[Path] = CacheDirOption,
    checkpoint: str = CheckpointOption,
    trace_llm: bool = typer.Option(True, help="Trace the LLM calls into the MLflow experiment (mlflow.langchain.autolog)."),
) -> None:
    """Let the LLM pick a pipeline per user group, then tune each group's pipeline trial by trial."""
    from rectune.agent.context import Settings
    from rectune.agent.session import run
    from rectune.models.config import tracking_uri as resolve_tracking_uri
    from rectune.models.loaders import dataset_label
    from rectune.tools.ledger import storage_url
    from rectune.tools.tracking import Tracker

    if approve not in ("ask", "auto"):
        raise typer.BadParameter(f"must be ask or auto, but got {approve!r}", param_hint="--approve")
    try:
        uri = resolve_tracking_uri(tracking_uri)
        settings = Settings.named(
            session, dataset_label(dataset_name), dataset=dataset_name, groups=groups_spec, objective=objective, budget=budget,
            seed=seed, approve=approve, max_llm_calls=max_llm_calls or 0, max_minutes=max_minutes, may_finish=may_finish,
            max_latency_ms=max_latency_ms, storage=storage_url(storage), tracking_uri=uri, data_dir=str(data_dir) if data_dir else None,
            cache_dir=str(cache_dir) if cache_dir else None, llm_base_url=llm_base_url, llm_model=llm_model)
        typer.echo(f"session {settings.session}")
        values = run(settings, ask_terminal if approve == "ask" else None, say, checkpoint, tracker=Tracker(uri), trace=trace_llm)
    except RectuneError as error:
        fail(error)
    _finish(values, uri)


@app.command("compare")
def compare_command(
    dataset_name: str = DatasetOption,
    groups_spec: str = typer.Option("activity", "--groups", help="User-group spec."),
    budget: int = typer.Option(10, min=2, help="Trials per group and tuner, the default configuration included."),
    seeds: int = typer.Option(5, min=1, help="Seeds 0..N-1; every tuner runs every seed (paired)."),
    objective: str = typer.Option("ndcg@20", help="Validation metric to maximise; the same metric is reported on test."),
    reach: float = typer.Option(0.05, help="Report the trials each tuner needs to beat the default by this share."),
    name: Optional[str] = typer.Option(None, help="Name of the comparison (re-use it to continue an interrupted one)."),
    agent_may_finish: bool = typer.Option(False, "--agent-may-finish/--agent-full-budget", help="Let the agent stop a group early; by default it runs every trial, like the baselines."),
    tuners: str = typer.Option("llm,menu,tpe,random", help="Comma-separated registered tuners, each run on every group and seed: llm, menu (the LLM's candidate menu, first candidate taken: the agent without the LLM), tpe, random, tpe-warm (TPE that first runs its best configurations of the groups tuned before: the control of the menu's cross-group transfer), local."),
    pipeline: Optional[str] = typer.Option(None, help="Tune this pipeline on every group instead of the agent's pick (heuristic, heuristic+deepfm, two_tower, two_tower+deepfm): e.g. one whose default is far from its optimum."),
    llm_base_url: Optional[str] = LLMBaseUrlOption,
    llm_model: Optional[str] = LLMModelOption,
    storage: Optional[str] = StorageOption,
    tracking_uri: Optional[str] = TrackingOption,
    data_dir: Optional[Path] = DataDirOption,
    cache_dir: Optional[Path] = CacheDirOption,
    checkpoint: str = CheckpointOption,
    report_dir: Path = typer.Option(Path("reports"), help="Where the markdown report and its plots go."),
) -> None:
    """Run tuners (by default the LLM agent, its candidate menu without the LLM, Optuna TPE and random search) on the same budget, space, seeds and first trial, and report."""
    from rectune.agent.compare import Comparison, compare
    from rectune.agent.context import Settings
    from rectune.models.config import tracking_uri as resolve_tracking_uri
    from rectune.models.loaders import dataset_label
    from rectune.tools.ledger import storage_url
    from rectune.tools.tracking import Tracker

    try:
        uri = resolve_tracking_uri(tracking_uri)
        settings = Settings(
            name or f"compare-{dataset_label(dataset_name)}-{groups_spec.replace(':', '')}{f'-{pipeline}' if pipeline else ''}-b{budget}",
            dataset_name, groups_spec,
            objective, budget, approve="auto", may_finish=agent_may_finish, storage=storage_url(storage), tracking_uri=uri,
            data_dir=str(data_dir) if data_dir else None, cache_dir=str(cache_dir) if cache_dir else None,
            llm_base_url=llm_base_url, llm_model=llm_model)
        spec = Comparison(settings, tuple(range(seeds)), tuple(t.strip() for t in tuners.split(",") if t.strip()), reach, checkpoint,
                          pipeline)
        path = compare(spec, say, report_dir, Tracker(uri))
    except RectuneError as error:
        fail(error)
    say(f"report: {path}\nMLflow: {uri}")


@app.command("resume")
def resume(
    session: str = typer.Argument(..., help="A session name (see `rectune sessions`)."),
    checkpoint: str = CheckpointOption,
    trace_llm: bool = typer.Option(True, help="Trace the LLM calls into the MLflow experiment (mlflow.langchain.autolog)."),
    llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url", help="Continue on this endpoint instead of the session's own (it moved after a crash); for this run only: the session keeps its settings. Keys as for `rectune tune`."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="Continue with this model name instead of the session's own (for this run only)."),
) -> None:
    """Continue a session after a crash, or answer the approval it is waiting for."""
    from rectune.agent.session import load_settings, run
    from rectune.tools.tracking import Tracker

    try:
        settings = load_settings(session, checkpoint)
        values = run(settings, ask_terminal if settings["approve"] == "ask" else None, say, checkpoint,
                     resume=True, tracker=Tracker(settings["tracking_uri"]), trace=trace_llm,
                     llm_base_url=llm_base_url, llm_model=llm_model)
    except RectuneError as error:
        fail(error)
    _finish(values, settings["tracking_uri"])


@app.command("sessions")
def sessions(checkpoint: str = CheckpointOption) -> None:
    """List the tuning sessions in a checkpoint store, newest state of each."""
    from rectune.agent.session import list_sessions

    try:
        found = list_sessions(checkpoint)
    except RectuneError as error:
        fail(error)
    if not found:
        say(f"no sessions in {checkpoint}")
        return
    # Columns as wide as their longest entry: statuses run from "done" to a sentence.
    widths = {key: max(len(str(item[key] or "?")) for item in found) for key in ("session", "dataset", "status")}
    for item in found:
        trials = ", ".join(f"{g} {n}" for g, n in item["trials"].items()) or "-"
        typer.echo(f"{item['session']:<{widths['session']}}  {item['dataset'] or '?':<{widths['dataset']}}  "
                   f"{item['status']:<{widths['status']}}  trials: {trials}" + (f"  report: {item['report']}" if item["report"] else ""))


@app.command("ui")
def ui(
    tracking_uri: Optional[str] = TrackingOption,
    port: int = typer.Option(5000, min=0, max=65535, help="Port on 127.0.0.1 (0: any free port)."),
) -> None:
    """Browse sessions and trials in the MLflow UI: starts `mlflow server` on 127.0.0.1 against the tracking store and prints the URL of each experiment's runs; Ctrl-C stops it."""
    import signal

    from rectune.models.config import tracking_uri as resolve_tracking_uri
    from rectune.tools.mlflow_ui import experiment_pages, ui_server

    # A service manager stops with SIGTERM, a closed terminal sends SIGHUP: leave through the
    # same path as Ctrl-C, so the server's process group is stopped rather than orphaned.
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, signal.default_int_handler)
    try:
        uri = resolve_tracking_uri(tracking_uri)
        with ui_server(uri, port) as server:
            say(f"MLflow UI for {uri}: {server.url}  (log {server.log_path}; Ctrl-C stops it)")
            pages = experiment_pages(uri, server.url)
            for name, url in pages:
                typer.echo(f"  {name}: {url}")
            if not pages:
                typer.echo("  (no runs yet)")
            server.wait()
    except KeyboardInterrupt:
        typer.echo("MLflow UI stopped")
    except RectuneError as error:
        fail(error)


if __name__ == "__main__":
    app()
