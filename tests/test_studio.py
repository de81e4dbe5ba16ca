"""LangGraph Studio: `langgraph.json` names a graph factory that builds without an LLM, and a
thread started from Studio's input runs to its first approval against a scripted endpoint."""

import importlib
import json
from pathlib import Path

import pytest

from scripted_llm import ScriptedLLM, call, is_pick
from test_agent import TWO_TOWER_TIES

ROOT = Path(__file__).resolve().parents[1]
NODES = {"select", "pick", "start_group", "decide", "approve", "run_trial", "next_group", "report"}
SCRIPT = [call("propose_change", changes={"neighbors": 20}, rationale="denser")]
PICK = call("choose_pipelines", all={"because": "fewest stages", "pipeline": "heuristic"})
"""Under TWO_TOWER_TIES several pipelines tie with the heuristic on all users: a thread asks the
LLM for the pick, then for its first proposal."""


@pytest.fixture(autouse=True)
def no_endpoint(monkeypatch):
    """Nothing in the environment names an LLM: the graph must build without one."""
    for name in ("OPENAI_API_KEY", "DEEPSEEK_API_KEY", "RECTUNE_LLM_API_KEY", "RECTUNE_LLM_BASE_URL", "RECTUNE_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)


def factory():
    """The graph factory langgraph.json names (a module path: the server runs from any directory)."""
    module, function = json.loads((ROOT / "langgraph.json").read_text())["graphs"]["rectune"].split(":")
    return getattr(importlib.import_module(module), function)


def studio_settings(tmp_path, data_dir, base_url, cache: str) -> dict:
    return {"session": "studio", "dataset": "baby", "groups": "all", "objective": TWO_TOWER_TIES, "budget": 2, "approve": "ask",
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "data_dir": str(data_dir), "cache_dir": cache, "llm_base_url": base_url, "llm_model": "scripted"}


def test_the_factory_draws_the_graph_without_an_llm_and_a_thread_stops_at_its_first_approval(tmp_path, baby_format_dir,
                                                                                             shared_cache):
    from langgraph.checkpoint.memory import InMemorySaver

    graph = factory()({"configurable": {}})  # what the server passes: no runner, no LLM, no settings
    drawn = graph.get_graph().draw_mermaid()
    assert all(f"\t{node}({node})" in drawn for node in NODES), drawn
    # The routes nodes take with Command are drawn from their return types.
    assert all(edge in drawn for edge in ("decide -.-> approve", "approve -.-> run_trial", "run_trial -.-> decide",
                                          "next_group -.-> report")), drawn
    assert graph.get_input_jsonschema()["required"] == ["settings"]

    # As the server runs a thread: its own checkpointer, the input from Studio's form, no context.
    graph = graph.copy(update={"checkpointer": InMemorySaver()})
    thread = {"configurable": {"thread_id": "t1"}}
    with ScriptedLLM(SCRIPT, picks=[PICK]) as llm:
        graph.invoke({"settings": studio_settings(tmp_path, baby_format_dir, llm.base_url, shared_cache)}, thread)
    state = graph.get_state(thread)
    assert state.next == ("approve",)
    [waiting] = state.interrupts
    assert waiting.value["changes"] == {"neighbors": 20} and waiting.value["rationale"] == "denser"
    assert [is_pick(body) for body in llm.requests] == [True, False]
    picked = state.values["selection"]["all"]
    assert (picked["pipeline"], picked["chosen_by"], picked["because"]) == ("heuristic", "llm", "fewest stages")
    assert picked["reason"].startswith("the simplest (fewest stages) of the ")


def test_a_thread_without_an_endpoint_says_how_to_give_one(tmp_path, baby_format_dir, shared_cache, monkeypatch):
    from langgraph.checkpoint.memory import InMemorySaver

    from rectune.models.errors import ConfigError

    # As on a machine without the local extra: the embedded model cannot start.
    monkeypatch.setitem(__import__("sys").modules, "rectune.agent.local_llm", None)
    graph = factory()(None).copy(update={"checkpointer": InMemorySaver()})
    settings = {**studio_settings(tmp_path, baby_format_dir, None, shared_cache), "llm_model": None, "session": "no-llm"}
    with pytest.raises(ConfigError, match=r"embedded model is not installed.*in LangGraph Studio: set llm_base_url"):
        graph.invoke({"settings": settings}, {"configurable": {"thread_id": "t2"}})


def test_langgraph_dev_serves_the_graph_and_runs_a_thread_to_its_first_approval(tmp_path, baby_format_dir, shared_cache):
    """The README's `langgraph dev`, as Studio uses it over HTTP: the graph view, then a thread."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    import httpx

    from rectune.tools.loopback import pick_free_port

    langgraph = shutil.which("langgraph", path=str(Path(sys.executable).parent))
    assert langgraph, "langgraph-cli[inmem] is a dev dependency (pyproject.toml)"
    port = pick_free_port()
    env = {**{k: v for k, v in os.environ.items() if "API_KEY" not in k and not k.startswith("RECTUNE_LLM")},
           "LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGSMITH_TRACING": "false", "NO_PROXY": "127.0.0.1,localhost"}
    with open(tmp_path / "server.log", "w") as log:
        # From another directory: the server must find the graph through langgraph.json alone.
        server = subprocess.Popen([langgraph, "dev", "--config", str(ROOT / "langgraph.json"), "--port", str(port), "--no-browser",
                                   "--no-reload"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=300)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if api.get("/ok").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        [assistant] = api.post("/assistants/search", json={"graph_id": "rectune"}).raise_for_status().json()
        drawn = api.get(f"/assistants/{assistant['assistant_id']}/graph").raise_for_status().json()
        assert NODES <= {node["id"] for node in drawn["nodes"]}
        schemas = api.get(f"/assistants/{assistant['assistant_id']}/schemas").raise_for_status().json()
        assert "settings" in schemas["input_schema"]["properties"]

        thread = api.post("/threads", json={}).raise_for_status().json()["thread_id"]
        with ScriptedLLM(SCRIPT, picks=[PICK]) as llm:
            settings = {**studio_settings(tmp_path, baby_format_dir, llm.base_url, shared_cache), "session": "served"}
            api.post(f"/threads/{thread}/runs/wait", json={"assistant_id": assistant["assistant_id"],
                                                           "input": {"settings": settings}}).raise_for_status()
        state = api.get(f"/threads/{thread}/state").raise_for_status().json()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    assert state["next"] == ["approve"], (state, (tmp_path / "server.log").read_text()[-3000:])
    [waiting] = state["interrupts"]
    assert waiting["value"]["changes"] == {"neighbors": 20} and [is_pick(body) for body in llm.requests] == [True, False]
    assert state["values"]["selection"]["all"]["chosen_by"] == "llm"
