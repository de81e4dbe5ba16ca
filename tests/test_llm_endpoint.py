"""Which endpoint, model and key the agent uses, and how it behaves when the endpoint fails.

The precedence table and the key rule are checked without network (building a ChatOpenAI
client sends nothing); the rest talks to the scripted server on 127.0.0.1 only.
"""

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rectune.models.config
from rectune.tools.loopback import pick_free_port
from rectune.agent.llm import DEEPSEEK_BASE_URL, EMBEDDED_MODEL, OPENAI_BASE_URL, LLMSettings, chat_model, resolve_llm
from rectune.models.errors import ConfigError
from scripted_llm import ScriptedLLM, call, cut_off, delayed, is_pick, named_tool_only, pick_first, status, text
from test_agent import TWO_TOWER_TIES, assert_exactly_the_budget, settings

DEEPSEEK_KEY = "sk-deepseek-0123456789-secret"
OPENAI_KEY = "sk-openai-0123456789-secret"
CUSTOM_KEY = "rk-custom-0123456789-secret"
KEYS = {"DEEPSEEK_API_KEY": DEEPSEEK_KEY, "OPENAI_API_KEY": OPENAI_KEY, "RECTUNE_LLM_API_KEY": CUSTOM_KEY}
ENVS = (*KEYS, "RECTUNE_LLM_BASE_URL", "RECTUNE_LLM_MODEL", "RECTUNE_LLM_TIMEOUT", "OPENAI_BASE_URL", "OPENAI_API_BASE",
        "MLFLOW_TRACKING_URI")
DENSER = call("propose_change", changes={"neighbors": 20}, rationale="denser")
"""A tuning reply. The sessions here tune all users under ndcg@20, where the fixture's
heuristic beats every other pipeline beyond noise: the pick is the rule's, no request."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No key, endpoint or config file of the machine running the tests takes part."""
    for name in ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(rectune.models.config, "CONFIG_FILES", (tmp_path / "rectune.toml",))
    return tmp_path / "rectune.toml"


def session_settings(tmp_path, data_dir, base_url, cache: str, **options) -> dict:
    return {**settings(tmp_path, data_dir, base_url, approve="auto", groups="all", budget=2, **options), "cache_dir": cache}


@pytest.fixture
def fast_retries(monkeypatch):
    """One retry, short timeouts: a failing endpoint costs the test about a second."""
    monkeypatch.setattr("rectune.agent.session.resolve_llm", lambda *a, **k: resolve_llm(*a, **k, max_retries=1, timeout_s=10))


CFG, ENV, FLAG = "http://cfg.example:8000/v1", "http://env.example:8000/v1", "http://flag.example:8000/v1"
# (flag url, flag model, environment, rectune.toml) → (endpoint, model, key variable sent)
TABLE = {
    "nothing: embedded": (None, None, {}, {}, ("embedded", EMBEDDED_MODEL, None)),
    "custom key alone: still embedded": (None, None, {"RECTUNE_LLM_API_KEY"}, {}, ("embedded", EMBEDDED_MODEL, None)),
    "openai key": (None, None, {"OPENAI_API_KEY"}, {}, (OPENAI_BASE_URL, "gpt-4o-mini", "OPENAI_API_KEY")),
    "deepseek before openai": (None, None, {"OPENAI_API_KEY", "DEEPSEEK_API_KEY"}, {},
                               (DEEPSEEK_BASE_URL, "deepseek-chat", "DEEPSEEK_API_KEY")),
    "config model with a key": (None, None, {"OPENAI_API_KEY"}, {"llm_model": "gpt-4.1"}, (OPENAI_BASE_URL, "gpt-4.1", "OPENAI_API_KEY")),
    "config before keys, which stay home": (None, None, {"OPENAI_API_KEY", "DEEPSEEK_API_KEY"},
                                            {"llm_base_url": CFG, "llm_model": "cfg-model"}, (CFG, "cfg-model", None)),
    "env before config": (None, None, {"RECTUNE_LLM_BASE_URL", "RECTUNE_LLM_MODEL"},
                          {"llm_base_url": CFG, "llm_model": "cfg-model"}, (ENV, "env-model", None)),
    "flag before env": (FLAG, "flag-model", {"RECTUNE_LLM_BASE_URL", "RECTUNE_LLM_MODEL"}, {}, (FLAG, "flag-model", None)),
    "flag model, config endpoint": (None, "flag-model", {}, {"llm_base_url": CFG}, (CFG, "flag-model", None)),
    "custom key to an explicit endpoint": (FLAG, None, {"RECTUNE_LLM_API_KEY", "OPENAI_API_KEY", "DEEPSEEK_API_KEY"}, {},
                                           (FLAG, "default", "RECTUNE_LLM_API_KEY")),
    "custom key wins at deepseek too": (DEEPSEEK_BASE_URL, None, {"RECTUNE_LLM_API_KEY", "DEEPSEEK_API_KEY"}, {},
                                        (DEEPSEEK_BASE_URL, "deepseek-chat", "RECTUNE_LLM_API_KEY")),
    "deepseek key to deepseek by url": (DEEPSEEK_BASE_URL, None, {"OPENAI_API_KEY", "DEEPSEEK_API_KEY"}, {},
                                        (DEEPSEEK_BASE_URL, "deepseek-chat", "DEEPSEEK_API_KEY")),
    "openai key to openai by url": ("https://api.openai.com/v1", "gpt-4.1", {"OPENAI_API_KEY", "DEEPSEEK_API_KEY"}, {},
                                    ("https://api.openai.com/v1", "gpt-4.1", "OPENAI_API_KEY")),
    "no key over plain http": ("http://api.deepseek.com/v1", None, {"DEEPSEEK_API_KEY"}, {},
                               ("http://api.deepseek.com/v1", "deepseek-chat", None)),
    "no key to a look-alike host": ("https://api.deepseek.com.evil.example/v1", None, {"DEEPSEEK_API_KEY"}, {},
                                    ("https://api.deepseek.com.evil.example/v1", "default", None)),
    "no key through userinfo": ("https://api.openai.com@evil.example/v1", None, {"OPENAI_API_KEY"}, {},
                                ("https://api.openai.com@evil.example/v1", "default", None)),
    "no provider key to a local server": ("http://127.0.0.1:8080/v1", None, {"OPENAI_API_KEY", "DEEPSEEK_API_KEY"}, {},
                                          ("http://127.0.0.1:8080/v1", "default", None)),
    "embedded forced despite a key": ("embedded", None, {"OPENAI_API_KEY"}, {}, ("embedded", EMBEDDED_MODEL, None)),
}


@pytest.mark.parametrize("case", TABLE.values(), ids=TABLE.keys())
def test_resolution_precedence_and_where_each_key_goes(case, monkeypatch, clean_env):
    flag_url, flag_model, exported, config, (url, model, key_env) = case
    values = {**KEYS, "RECTUNE_LLM_BASE_URL": ENV, "RECTUNE_LLM_MODEL": "env-model"}
    for name in exported:
        monkeypatch.setenv(name, values[name])
    clean_env.write_text("".join(f'{key} = "{value}"\n' for key, value in config.items()))

    llm = resolve_llm(flag_url, flag_model)
    assert (llm.base_url, llm.model, llm.key_env) == (url, model, key_env)
    if llm.embedded:
        return
    client = chat_model(llm)
    sent = client.openai_api_key.get_secret_value()
    assert sent == (KEYS[key_env] if key_env else "not-needed")
    assert str(client.root_client.base_url).rstrip("/") == url


def test_an_endpoint_from_the_working_directory_config_gets_no_key(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rectune.models.config, "CONFIG_FILES", (Path("rectune.toml"), tmp_path / "user-config.toml"))
    Path("rectune.toml").write_text(f'llm_base_url = "{CFG}"\n')
    monkeypatch.setenv("RECTUNE_LLM_API_KEY", KEYS["RECTUNE_LLM_API_KEY"])
    llm = resolve_llm()
    assert (llm.base_url, llm.key_env) == (CFG, None)
    assert "RECTUNE_LLM_API_KEY is not sent to an endpoint named by ./rectune.toml" in llm.describe()
    assert chat_model(llm).openai_api_key.get_secret_value() == "not-needed"
    # The same endpoint named by the user (flag, environment or their own config) gets the key.
    assert resolve_llm(CFG).key_env == "RECTUNE_LLM_API_KEY"
    Path("rectune.toml").unlink()
    (tmp_path / "user-config.toml").write_text(f'llm_base_url = "{CFG}"\n')
    assert resolve_llm().key_env == "RECTUNE_LLM_API_KEY"


def test_a_withheld_key_is_named_in_the_llm_line(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    described = resolve_llm("https://llm.example/v1", "m").describe()
    assert "without an API key" in described and "OPENAI_API_KEY" in described and "RECTUNE_LLM_API_KEY" in described
    assert OPENAI_KEY not in described


def test_openai_base_url_in_the_environment_does_not_redirect_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "https://evil.example/v1")
    monkeypatch.setenv("OPENAI_API_BASE", "https://evil.example/v1")
    client = chat_model(resolve_llm())
    assert str(client.root_client.base_url).rstrip("/") == OPENAI_BASE_URL


def test_chat_model_refuses_a_provider_key_for_another_host(monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", DEEPSEEK_KEY)
    with pytest.raises(ConfigError, match="DEEPSEEK_API_KEY is only sent to api.deepseek.com, not to http://127.0.0.1:9/v1"):
        chat_model(LLMSettings(DEEPSEEK_BASE_URL, "deepseek-chat", "DEEPSEEK_API_KEY"), "http://127.0.0.1:9/v1")


@pytest.mark.parametrize("url", ["localhost:8080/v1", "ftp://llm.example/v1", "http:///v1"])
def test_a_bad_base_url_is_one_clear_line(url):
    with pytest.raises(ConfigError, match="is not an http\\(s\\) URL; expected e.g. http://localhost:8000/v1") as error:
        resolve_llm(url)
    assert "\n" not in str(error.value) and repr(url) in str(error.value)


@pytest.mark.parametrize("key", ["llm_base_url", "llm_model"])
def test_config_file_llm_keys_must_be_strings(key, clean_env):
    clean_env.write_text(f"{key} = 8080\n")
    with pytest.raises(ConfigError, match=f"'{key}' must be a string .*, but got 8080"):
        resolve_llm()


def test_over_the_wire_only_the_opted_in_key_reaches_a_custom_endpoint(monkeypatch):
    for name, secret in KEYS.items():
        monkeypatch.setenv(name, secret)
    with ScriptedLLM([{"text": "hi"}, {"text": "hi"}]) as llm:
        chat_model(resolve_llm(llm.base_url, "scripted")).invoke("hello")
        monkeypatch.delenv("RECTUNE_LLM_API_KEY")
        chat_model(resolve_llm(llm.base_url, "scripted")).invoke("hello")
    opted_in, without = ({k.lower(): v for k, v in headers.items()} for headers in llm.headers)
    assert opted_in["authorization"] == f"Bearer {CUSTOM_KEY}"
    assert without["authorization"] == "Bearer not-needed"
    for secret in (DEEPSEEK_KEY, OPENAI_KEY):
        assert secret not in json.dumps(llm.headers) + json.dumps(llm.requests)


def test_a_429_is_retried_transparently(tmp_path, baby_format_dir, fast_retries, shared_cache):
    from rectune.agent.session import run

    with ScriptedLLM([status(429), DENSER]) as llm:
        config = session_settings(tmp_path, baby_format_dir, llm.base_url, shared_cache)
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    assert len(llm.requests) == 2 and llm.requests[1]["messages"] == llm.requests[0]["messages"]  # the same call, again
    assert values["phase"] == "done"
    assert values["llm_calls"]["all"] == 1 and not values["invalid_calls"].get("all")  # the graph never saw the 429
    trials = assert_exactly_the_budget(config["storage"], "s1-all", 2)
    assert trials[1].params["neighbors"] == 20


def test_a_dead_endpoint_stops_resumably_and_resume_can_move_it(tmp_path, baby_format_dir, fast_retries, shared_cache, monkeypatch):
    from rectune.agent.cli import app
    from rectune.agent.session import list_sessions, load_settings

    monkeypatch.chdir(tmp_path)  # the session's report goes to ./reports

    dead = f"http://127.0.0.1:{pick_free_port()}/v1"
    checkpoint = str(tmp_path / "sessions.db")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--checkpoint", checkpoint, "--no-trace-llm"]
    cli = CliRunner()
    started = cli.invoke(app, ["tune", "--session", "moved", "--dataset", "baby", "--groups", "all", "--budget", "2",
                               "--approve", "auto", "--llm-base-url", dead, "--llm-model", "scripted", "--storage", storage,
                               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--data-dir", str(baby_format_dir),
                               "--cache-dir", shared_cache, *common])
    assert started.exit_code == 2, started.output
    errors = [line for line in started.stderr.splitlines() if line.startswith("error:")]  # MLflow logs to stderr too
    assert len(errors) == 1 and errors[0].startswith("error: the LLM endpoint failed after its retries (")
    assert "ConnectionError: Connection error." in errors[0]
    assert errors[0].endswith("`rectune resume moved` (with --llm-base-url URL if the endpoint moved)")
    assert [s["session"] for s in list_sessions(checkpoint)] == ["moved"]

    with ScriptedLLM([DENSER]) as llm:
        resumed = cli.invoke(app, ["resume", "moved", "--llm-base-url", llm.base_url, *common])
    assert resumed.exit_code == 0, resumed.output
    assert f"LLM: scripted at {llm.base_url}" in resumed.output and "report:" in resumed.output
    assert len(llm.requests) == 1
    assert_exactly_the_budget(storage, "moved-all", 2)
    # The override was for that run: the session's own settings are unchanged.
    assert load_settings("moved", checkpoint)["llm_base_url"] == dead


def test_mlflow_traces_and_stores_hold_no_key(tmp_path, baby_format_dir, monkeypatch, shared_cache):
    import mlflow
    from mlflow import MlflowClient

    from rectune.agent.session import run
    from rectune.tools.tracking import Tracker

    for name, secret in KEYS.items():
        monkeypatch.setenv(name, secret)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    # Absent, so the session's own default is what is tested; set first so that monkeypatch
    # also undoes that default afterwards (deleting an unset variable records nothing).
    monkeypatch.setenv("MLFLOW_MODEL_CATALOG_URI", "unset by the test")
    monkeypatch.delenv("MLFLOW_MODEL_CATALOG_URI")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    outside = []
    resolve = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            outside.append(host)
            raise OSError(f"test: no network beyond loopback ({host})")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    previous_uri = mlflow.get_tracking_uri()
    try:
        with ScriptedLLM([DENSER]) as llm:
            config = session_settings(tmp_path, baby_format_dir, llm.base_url, shared_cache)
            values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"),
                         tracker=Tracker(config["tracking_uri"]), report_dir=tmp_path / "r", trace=True)
    finally:
        mlflow.langchain.autolog(disable=True)
        mlflow.set_tracking_uri(previous_uri)
    assert values["phase"] == "done"
    # The custom endpoint did get its key: the secret was in play, not absent.
    assert {k.lower(): v for k, v in llm.headers[0].items()}["authorization"] == f"Bearer {CUSTOM_KEY}"
    # Tracing fetched nothing from the internet (MLflow's model catalog for cost estimates).
    # MLflow's usage telemetry starts with the first import of mlflow, tracing or not: not this test's subject.
    assert [host for host in outside if host != "config.mlflow-telemetry.io"] == [], outside

    client = MlflowClient(config["tracking_uri"])
    experiment = client.get_experiment_by_name("baby").experiment_id
    traces = client.search_traces(locations=[experiment])
    spans = [span for trace in traces for span in trace.data.spans]
    assert any(span.span_type == "CHAT_MODEL" for span in spans)
    traced = json.dumps([[span.inputs, span.outputs, span.attributes] for span in spans], default=str)
    assert '"neighbors": 20' in traced  # the scan reads the LLM calls' content
    files = [path for path in Path(tmp_path).rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in files)
    for secret in KEYS.values():
        assert secret not in traced
        leaks = [str(path) for path in files if secret.encode() in path.read_bytes()]
        assert not leaks, f"{secret} found in {leaks}"


# --- endpoint faults: what is retried, what stops, and what the stop says ---------------------

def cli_tune(tmp_path, data_dir, cache: str, session: str, base_url: str, *options: str, budget: int = 2):
    from rectune.agent.cli import app

    return CliRunner().invoke(app, [
        "tune", "--session", session, "--dataset", "baby", "--groups", "all", "--budget", str(budget), "--approve", "auto",
        "--llm-base-url", base_url, "--llm-model", "scripted", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--data-dir", str(data_dir), "--cache-dir", cache,
        "--checkpoint", str(tmp_path / "sessions.db"), *options])


def test_a_key_an_endpoint_echoes_in_its_error_is_in_no_file_the_run_writes(tmp_path, baby_format_dir, shared_cache, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # reports and MLflow's artifacts land under tmp_path, where the scan reads
    monkeypatch.setenv("RECTUNE_LLM_API_KEY", CUSTOM_KEY)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    previous_uri = mlflow.get_tracking_uri()
    # As many proxies answer: the rejected Authorization header, echoed in the message.
    refusal = status(401, "Incorrect API key provided: {authorization}. Find your key in the dashboard.")
    try:
        with ScriptedLLM([refusal]) as llm:
            result = cli_tune(tmp_path, baby_format_dir, shared_cache, "leak", llm.base_url)  # LLM calls traced
    finally:
        mlflow.langchain.autolog(disable=True)
        mlflow.set_tracking_uri(previous_uri)
    assert result.exit_code == 2, result.output
    assert {k.lower(): v for k, v in llm.headers[0].items()}["authorization"] == f"Bearer {CUSTOM_KEY}"
    assert len(llm.requests) == 1  # a refused key is not retried
    assert "Incorrect API key provided: Bearer ***" in result.stderr
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"sessions.db", "mlflow.db"} <= {path.name for path in files}
    # The refusal was recorded (checkpointed task error, trace span), only without the key.
    assert [path.name for path in files if b"Incorrect API key provided" in path.read_bytes()]
    leaks = [str(path) for path in files if CUSTOM_KEY.encode() in path.read_bytes()]
    assert not leaks, f"the key is in {leaks}"
    assert CUSTOM_KEY not in result.output


def test_a_cut_off_reply_is_retried_then_stops_resumably(tmp_path, baby_format_dir, fast_retries, shared_cache, monkeypatch):
    from rectune.agent.cli import app

    monkeypatch.chdir(tmp_path)
    with ScriptedLLM([cut_off(), cut_off()]) as llm:
        started = cli_tune(tmp_path, baby_format_dir, shared_cache, "cut", llm.base_url, "--no-trace-llm")
    assert started.exit_code == 2, started.output
    assert "Traceback" not in started.output and "JSONDecodeError" not in started.output
    errors = [line for line in started.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("`rectune resume cut` (with --llm-base-url URL if the endpoint moved)")
    assert len(llm.requests) == 2 and llm.requests[1]["messages"] == llm.requests[0]["messages"]  # the same turn, again
    with ScriptedLLM([DENSER]) as llm:
        resumed = CliRunner().invoke(app, ["resume", "cut", "--llm-base-url", llm.base_url, "--checkpoint",
                                           str(tmp_path / "sessions.db"), "--no-trace-llm"])
    assert resumed.exit_code == 0, resumed.output
    assert_exactly_the_budget(f"sqlite:///{tmp_path / 'optuna.db'}", "cut-all", 2)


def test_cut_off_replies_and_refused_keys_stop_with_what_to_do(monkeypatch):
    from rectune.agent.llm import LLMUnavailable, invoke

    lines = []
    with ScriptedLLM([cut_off(), text("whole")]) as llm:
        assert invoke(chat_model(resolve_llm(llm.base_url, "scripted"), echo=lines.append), "hello").content == "whole"
    assert [line for line in lines if "not complete JSON); retrying in 1 s (attempt 2 of 7)" in line], lines
    with ScriptedLLM([cut_off(), cut_off()]) as llm, pytest.raises(LLMUnavailable) as error:
        invoke(chat_model(resolve_llm(llm.base_url, "scripted", max_retries=1)), "hello")
    assert "the LLM endpoint's replies were cut off (a reply cut off after" in str(error.value)
    assert "on each of 2 attempts" in str(error.value) and "resume the session" in str(error.value)

    monkeypatch.setenv("RECTUNE_LLM_API_KEY", CUSTOM_KEY)
    with ScriptedLLM([status(401, "Incorrect API key provided: {authorization}")]) as llm, pytest.raises(LLMUnavailable) as error:
        invoke(chat_model(resolve_llm(llm.base_url, "scripted")), "hello")
    message = str(error.value)
    assert len(llm.requests) == 1
    assert "refused the request (" in message and "AuthenticationError: Error code: 401" in message
    assert "check the key (RECTUNE_LLM_API_KEY" in message
    assert "when it is back" not in message and "Bearer ***" in message
    assert CUSTOM_KEY not in message and CUSTOM_KEY not in str(error.value.__cause__)


def test_a_ten_second_blip_of_5xx_is_ridden_out():
    import time

    first: list[float] = []

    def blip(body):
        first.append(first[0] if first else time.monotonic())
        return status(503) if time.monotonic() - first[0] < 10 else text("back")

    lines = []
    with ScriptedLLM([blip] * 10) as llm:
        reply = chat_model(resolve_llm(llm.base_url, "scripted"), echo=lines.append).invoke("hello")
    assert reply.content == "back"
    retries = [line for line in lines if line.startswith("[llm] HTTP 503; retrying in ")]
    assert len(retries) == len(llm.requests) - 1 >= 4, lines


def test_a_slow_endpoint_is_reported_while_waiting_and_its_timeout_is_a_setting(monkeypatch):
    from dataclasses import replace

    from rectune.agent.llm import LLMUnavailable, invoke

    lines = []
    with ScriptedLLM([delayed(1.5, text("late"))]) as llm:
        settings = replace(resolve_llm(llm.base_url, "scripted"), progress_every_s=0.4)
        assert chat_model(settings, echo=lines.append).invoke("hello").content == "late"
    waiting = [line for line in lines if line.startswith("[llm] still waiting for the LLM endpoint: ")]
    assert len(waiting) >= 2 and waiting[0].endswith("s so far (gives up after 120 s)"), lines
    # A call nobody waits for (model selection's warm-up, in its own thread) says nothing while it runs.
    from rectune.agent.endpoint import unattended

    lines.clear()
    with ScriptedLLM([delayed(1.5, text("late"))]) as llm, unattended():
        quiet = replace(resolve_llm(llm.base_url, "scripted"), progress_every_s=0.4)
        assert chat_model(quiet, echo=lines.append).invoke("hello").content == "late"
    assert lines == []

    monkeypatch.setenv("RECTUNE_LLM_TIMEOUT", "0.5")
    with ScriptedLLM([delayed(3, text("too late")), delayed(3, text("too late"))]) as llm:
        settings = resolve_llm(llm.base_url, "scripted", max_retries=1)
        assert settings.timeout_s == 0.5
        with pytest.raises(LLMUnavailable, match="did not answer in time on any attempt.*set RECTUNE_LLM_TIMEOUT"):
            invoke(chat_model(settings), "hello")
    assert len(llm.requests) == 2


def test_llm_timeouts_default_by_kind_of_endpoint(monkeypatch):
    assert resolve_llm().timeout_s == 900 and resolve_llm("embedded").timeout_s == 900  # the local model on busy cores
    assert resolve_llm("http://llm.example/v1").timeout_s == 120
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    assert resolve_llm().timeout_s == 120
    monkeypatch.setenv("RECTUNE_LLM_TIMEOUT", "45")
    assert resolve_llm().timeout_s == resolve_llm("embedded").timeout_s == 45
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv("RECTUNE_LLM_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"RECTUNE_LLM_TIMEOUT={bad!r}: expected the seconds an LLM call may take"):
            resolve_llm()


def test_a_decision_is_asked_for_the_way_a_stock_llama_cpp_server_understands():
    from rectune.agent.llm import answered_in_text, bind_decision_tools, text_replies_stop
    from rectune.agent.llm_tools import Scope, tune_tools
    from rectune.agent.selection import pick_tool
    from rectune.tools.space import SearchSpace

    space = SearchSpace.load()
    # A tuning turn of a session that may finish, with no menu left: propose_change and finish.
    scope = Scope(space, "heuristic", "ndcg@20", space.defaults("heuristic"), {}, [], may_finish=True)
    with ScriptedLLM([named_tool_only(call("finish", reason="done"))], picks=[named_tool_only(pick_first)]) as llm:
        model = chat_model(resolve_llm(llm.base_url, "scripted"))
        picked = bind_decision_tools(model, [pick_tool({"all": ["heuristic", "two_tower"]})]).invoke("pick")
        tuned = bind_decision_tools(model, tune_tools(scope)).invoke("tune")
    # One tool: named, which such a server obeys. Several: "required", which it ignores (and says so in text).
    assert llm.requests[0]["tool_choice"] == {"type": "function", "function": {"name": "choose_pipelines"}}
    assert llm.requests[1]["tool_choice"] == "required"
    assert picked.tool_calls[0]["args"] == {"all": {"because": "best objective", "pipeline": "heuristic"}}
    assert not answered_in_text(picked) and answered_in_text(tuned)
    stop = str(text_replies_stop(3))
    assert stop.startswith("the LLM endpoint answered 3 turns in a row with text, not the tool call each one required")
    assert "resume the session" in stop and "\n" not in stop


def test_an_endpoint_that_answers_in_text_stops_resumably_instead_of_reporting_a_tuned_session(
        tmp_path, baby_format_dir, fast_retries, shared_cache, monkeypatch):
    import optuna

    from rectune.agent.cli import app

    monkeypatch.chdir(tmp_path)
    # As a stock llama-cpp-python server: the pick, whose tool_choice names its one tool, works
    # (under TWO_TOWER_TIES pipelines tie on all users, so the pick is asked); every tuning turn
    # ("required", several tools) comes back as text. A text reply cannot be used: candidate A
    # runs instead, until the third text reply in a row stops the session.
    prose = named_tool_only(call("finish", reason="never reached"))
    with ScriptedLLM([prose] * 4, picks=[named_tool_only(pick_first)]) as llm:
        stopped = cli_tune(tmp_path, baby_format_dir, shared_cache, "prose", llm.base_url, "--no-trace-llm",
                           "--objective", TWO_TOWER_TIES, budget=4)
    assert stopped.exit_code == 2, stopped.output
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "answered 3 turns in a row with text" in errors[0] and "rectune resume prose" in errors[0]
    # The pick and three tuning turns, then the stop: no fourth turn.
    assert [is_pick(body) for body in llm.requests] == [True, False, False, False]
    assert not (tmp_path / "reports" / "prose.md").exists()  # no report of a session that tuned nothing
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    ran = [t.user_attrs["meta"] for t in optuna.load_study(study_name="prose-all", storage=storage).get_trials()[1:]]
    assert [(m["in_text"], m["candidate"], m["calls"]) for m in ran] == [(True, "A", 1)] * 2
    assert all(m["fallback"].startswith("the reply was text") for m in ran)
    with ScriptedLLM([DENSER]) as llm:
        resumed = CliRunner().invoke(app, ["resume", "prose", "--llm-base-url", llm.base_url, "--checkpoint",
                                           str(tmp_path / "sessions.db"), "--no-trace-llm"])
    assert resumed.exit_code == 0, resumed.output
    assert len(llm.requests) == 1  # the pick is not asked again
    trials = assert_exactly_the_budget(storage, "prose-all", 4)
    assert trials[3].user_attrs["params"]["neighbors"] == 20
