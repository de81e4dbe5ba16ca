"""Which endpoint, model and key the agent uses, and how it behaves when the endpoint fails.

The precedence table and the key rule are checked without network (building a ChatOpenAI
client sends nothing); the rest talks to the scripted server on 127.0.0.1 only.
"""

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

import models.config
from tools.loopback import pick_free_port
from agent.llm import DEEPSEEK_BASE_URL, EMBEDDED_MODEL, OPENAI_BASE_URL, LLMSettings, chat_model, resolve_llm
from models.errors import ConfigError
from scripted_llm import ScriptedLLM, call, status
from test_agent import assert_exactly_the_budget, settings

DEEPSEEK_KEY = "sk-deepseek-0123456789-secret"
OPENAI_KEY = "sk-openai-0123456789-secret"
CUSTOM_KEY = "rk-custom-0123456789-secret"
KEYS = {"DEEPSEEK_API_KEY": DEEPSEEK_KEY, "OPENAI_API_KEY": OPENAI_KEY, "RECTUNE_LLM_API_KEY": CUSTOM_KEY}
ENVS = (*KEYS, "RECTUNE_LLM_BASE_URL", "RECTUNE_LLM_MODEL", "OPENAI_BASE_URL", "OPENAI_API_BASE", "MLFLOW_TRACKING_URI")
CHOOSE_ALL = call("choose_pipelines", choices=[{"group": "all", "pipeline": "heuristic", "reason": "fast"}])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No key, endpoint or config file of the machine running the tests takes part."""
    for name in ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(models.config, "CONFIG_FILES", (tmp_path / "rectune.toml",))
    return tmp_path / "rectune.toml"


def session_settings(tmp_path, data_dir, base_url, cache: str, **options) -> dict:
    return {**settings(tmp_path, data_dir, base_url, approve="auto", groups="all", budget=2, **options), "cache_dir": cache}


@pytest.fixture
def fast_retries(monkeypatch):
    """One retry, short timeouts: a failing endpoint costs the test about a second."""
    monkeypatch.setattr("agent.session.resolve_llm", lambda *a, **k: resolve_llm(*a, **k, max_retries=1, timeout_s=10))


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
    monkeypatch.setattr(models.config, "CONFIG_FILES", (Path("rectune.toml"), tmp_path / "user-config.toml"))
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
    from agent.session import run

    script = [CHOOSE_ALL, status(429), call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    with ScriptedLLM(script) as llm:
        config = session_settings(tmp_path, baby_format_dir, llm.base_url, shared_cache)
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    assert len(llm.requests) == 3 and llm.requests[2]["messages"] == llm.requests[1]["messages"]  # the same call, again
    assert values["phase"] == "done"
    assert values["llm_calls"]["all"] == 1 and not values["invalid_calls"].get("all")  # the graph never saw the 429
    trials = assert_exactly_the_budget(config["storage"], "s1-all", 2)
    assert trials[1].params["neighbors"] == 20


def test_a_dead_endpoint_stops_resumably_and_resume_can_move_it(tmp_path, baby_format_dir, fast_retries, shared_cache, monkeypatch):
    from agent.cli import app
    from agent.session import list_sessions, load_settings

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

    with ScriptedLLM([CHOOSE_ALL, call("propose_change", changes={"neighbors": 20}, rationale="denser")]) as llm:
        resumed = cli.invoke(app, ["resume", "moved", "--llm-base-url", llm.base_url, *common])
    assert resumed.exit_code == 0, resumed.output
    assert f"LLM: scripted at {llm.base_url}" in resumed.output and "report:" in resumed.output
    assert len(llm.requests) == 2
    assert_exactly_the_budget(storage, "moved-all", 2)
    # The override was for that run: the session's own settings are unchanged.
    assert load_settings("moved", checkpoint)["llm_base_url"] == dead


def test_mlflow_traces_and_stores_hold_no_key(tmp_path, baby_format_dir, monkeypatch, shared_cache):
    import mlflow
    from mlflow import MlflowClient

    from agent.session import run
    from tools.tracking import Tracker

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
    script = [CHOOSE_ALL, call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    try:
        with ScriptedLLM(script) as llm:
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
    assert "choose_pipelines" in traced  # the scan reads the LLM calls' content
    files = [path for path in Path(tmp_path).rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in files)
    for secret in KEYS.values():
        assert secret not in traced
        leaks = [str(path) for path in files if secret.encode() in path.read_bytes()]
        assert not leaks, f"{secret} found in {leaks}"
