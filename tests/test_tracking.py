"""MLflow tracking, read back through MlflowClient: a real sqlite store, a real `mlflow
server` on 127.0.0.1, and a scan of everything a run stores for secrets."""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from rectune.models import config  # noqa: E402
from rectune.models.errors import ConfigError  # noqa: E402
from rectune.tools.loopback import port_in_use  # noqa: E402
from rectune.tools.mlflow_ui import MlflowServer  # noqa: E402
from rectune.tools.tracking import Tracker, redact, scrub, trial_key  # noqa: E402
from rectune.tools.trial import TrialResult, TrialSpec  # noqa: E402

VAL = {
    "overall": {"ndcg@20": 0.0412345678901, "recall@20": 0.0921},
    "AE": {"ndcg@20": 0.05, "recall@20": 0.11},
    "AF": {"ndcg@20": 0.031, "recall@20": 0.07},
}
TEST = {"overall": {"ndcg@20": 0.0399, "recall@20": 0.088}, "AE": {"ndcg@20": 0.048, "recall@20": 0.1}}


def trial(k: int, test: bool = False, **params) -> TrialResult:
    spec = TrialSpec("baby", "prefix", "AE", "two_tower+deepfm", {"recall_k": k, "embed_dim": 64, **params}, seed=1)
    scaled = {group: {name: value * k / 100 for name, value in values.items()} for group, values in VAL.items()}
    return TrialResult(
        spec=spec,
        objective=scaled["AE"]["ndcg@20"],
        metrics=scaled,
        latency_ms_per_user=0.25 * k,
        train_seconds=3.5,
        eval_seconds=0.75,
        fit_seconds=12.0,
        cache="recall" if k > 100 else "none",
        feasible=k < 400,
        test_metrics=TEST if test else None,
    )


def children(client: MlflowClient, parent) -> list:
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return sorted(runs, key=lambda run: int(run.data.tags["trial_number"]))


def read_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst))).read_text()


def log(session, result: TrialResult, number: int, tuner: str, study: str, **options) -> str:
    """Log `result` as trial `number` of ledger study `study`."""
    return session.log_trial(result, tuner, trial_key(study, number), trial_number=number, study=study, **options)


def log_three(tracker: Tracker) -> str:
    with tracker.session("baby", "llm-session", "llm", tags={"llm": "deepseek-chat"}, params={"budget": 10}) as session:
        log(session, trial(100), 0, "llm", "baby-llm")
        log(session, trial(200, test=True), 1, "llm", "baby-llm")
        log(session, trial(300), 2, "llm", "baby-llm", rationale="Raise K: recall@20 is **capped** by K.")
        session.log_session_metrics({"best_objective": 0.15})
        session.log_session_artifact("| trial | ndcg |\n", "summary.md")
        return session.run_id


def test_session_logs_parent_and_nested_trials(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs.db'}")
    parent_id = log_three(tracker)

    client = MlflowClient(tracker.tracking_uri)
    experiment = client.get_experiment_by_name("baby")
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "baby").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.run_id for run in parents] == [parent_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"budget": "10"}
    assert parent.data.tags["tuner"] == "llm" and parent.data.tags["llm"] == "deepseek-chat"
    assert parent.data.metrics == {"best_objective": 0.15}
    assert [a.path for a in client.list_artifacts(parent_id)] == ["summary.md"]

    kids = children(client, parent)
    assert len(kids) == 3 == len(runs) - 1
    for number, (run, k) in enumerate(zip(kids, (100, 200, 300))):
        expected = trial(k, test=k == 200)
        assert run.info.status == "FINISHED"
        assert run.data.params == {
            "recall_k": str(k), "embed_dim": "64", "pipeline": "two_tower+deepfm", "seed": "1", "objective": "ndcg@20",
        }
        tags = {
            "mlflow.parentRunId": parent_id, "trial_number": str(number), "tuner": "llm", "group": "AE",
            "groups": "prefix", "pipeline": "two_tower+deepfm", "optuna_study": "baby-llm", "cache": expected.cache,
            "feasible": str(expected.feasible), "run_key": f"baby-llm/trial-{number}",
        }
        assert run.data.tags == tags | {"mlflow.runName": f"trial-{number}"}
        metrics = run.data.metrics
        assert metrics["objective"] == expected.objective
        assert metrics["latency_ms_per_user"] == 0.25 * k
        assert (metrics["train_seconds"], metrics["eval_seconds"], metrics["fit_seconds"]) == (3.5, 0.75, 12.0)
        for group, values in expected.metrics.items():
            for name, value in values.items():
                # TopN is 20 (the default) here: each @20 metric is also the @topn column.
                assert metrics[f"val/{group}/{name.replace('@', '_at_')}"] == value
                assert metrics[f"val/{group}/{name.replace('@20', '_at_topn')}"] == value
        test_keys = {key for key in metrics if key.startswith("test/")}
        assert test_keys == ({f"test/{g}/{m}_at_{n}" for g in TEST for m in ("ndcg", "recall") for n in ("20", "topn")}
                             if k == 200 else set())
        if k == 200:
            assert metrics["test/AE/recall_at_20"] == 0.1

        artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
        assert artifacts == (["metrics_by_group.md", "rationale.md"] if k == 300 else ["metrics_by_group.md"])
        table = read_artifact(client, run.info.run_id, "metrics_by_group.md", tmp_path / "dl" / str(k))
        assert "| group | ndcg@20 | recall@20 |" in table
        assert table.index("| overall |") < table.index("| AE |") < table.index("| AF |")
        assert f"| AE | {expected.metrics['AE']['ndcg@20']:.4f} |" in table
        assert ("## test" in table) == (k == 200)
    rationale = read_artifact(client, kids[2].info.run_id, "rationale.md", tmp_path / "dl" / "why")
    assert rationale == "Raise K: recall@20 is **capped** by K."

    stored = {p.name for p in (tmp_path / "mlartifacts" / "baby").rglob("*.md")}
    assert stored == {"metrics_by_group.md", "rationale.md", "summary.md"}
    assert list(cwd.iterdir()) == []


def test_resume_appends_to_the_same_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs.db'}")
    parent_id = log_three(tracker)

    resumed = Tracker(tracker.tracking_uri)  # as a new process would
    with resumed.session("baby", "ignored", "llm", params={"budget": 10, "extra": "x"}, run_id=parent_id) as session:
        assert session.run_id == parent_id
        log(session, trial(400), 3, "llm", "baby-llm")
        # A trial logged before (a process re-run after a crash) is found by its key, not logged twice.
        assert log(session, trial(300), 2, "llm", "baby-llm") == children(MlflowClient(tracker.tracking_uri),
                                                                          session.client.get_run(parent_id))[2].info.run_id

    client = MlflowClient(tracker.tracking_uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "llm-session"
    assert parent.data.params == {"budget": "10", "extra": "x"}
    kids = children(client, parent)
    assert [run.data.tags["trial_number"] for run in kids] == ["0", "1", "2", "3"]
    assert len(client.search_runs([parent.info.experiment_id])) == 5
    assert kids[3].data.tags["feasible"] == "False"

    with pytest.raises(ConfigError, match="other settings"):
        with resumed.session("baby", "x", "llm", params={"budget": 20}, run_id=parent_id):
            pass
    with pytest.raises(ConfigError, match="experiment 'baby'"):
        with resumed.session("clothing", "x", "llm", run_id=parent_id):
            pass
    with pytest.raises(RuntimeError):
        with resumed.session("baby", "x", "llm", run_id=parent_id):
            raise RuntimeError("trial crashed")
    assert client.get_run(parent_id).info.status == "FAILED"


def test_a_trial_run_shows_its_difference_to_the_best_before_it(tmp_path):
    from dataclasses import replace

    from rectune.tools.noise import per_user_vector

    tracker = Tracker(f"sqlite:///{tmp_path / 'runs.db'}")
    per_user = per_user_vector([0.0] * 400 + [0.5] * 100)
    clear = replace(trial(200), per_user=per_user, vs_best={"diff": 0.0021, "low": 0.0004, "high": 0.0039, "trial": 0})
    tied = replace(trial(300), per_user=per_user, vs_best={"diff": 0.0004, "low": -0.0011, "high": 0.0019, "trial": 1})
    ranked = replace(trial(400), ranker_curve=[{"epoch": 1, "train_loss": 0.41, "val_loss": 0.44},
                                               {"epoch": 2, "train_loss": 0.37, "val_loss": 0.45}])
    with tracker.session("baby", "s", "tpe") as session:
        for number, result in enumerate((trial(100), clear, tied, ranked)):
            log(session, result, number, "tpe", "baby-tpe")
        parent = session.client.get_run(session.run_id)
    client = MlflowClient(tracker.tracking_uri)
    first, second, third, fourth = children(client, parent)
    # A ranker's curve is a metric history over the epochs, which the MLflow UI plots.
    for name, values in (("ranker_train_loss", [0.41, 0.37]), ("ranker_val_loss", [0.44, 0.45])):
        assert [(m.step, m.value) for m in client.get_metric_history(fourth.info.run_id, name)] == list(zip((1, 2), values))
    assert not {"ranker_train_loss", "ranker_val_loss"} & set(third.data.metrics)
    assert not {"vs_best_diff", "vs_best_low", "vs_best_high"} & set(first.data.metrics)
    assert not {"within_noise", "vs_best_trial"} & set(first.data.tags)
    assert {k: second.data.metrics[f"vs_best_{k}"] for k in ("diff", "low", "high")} == {"diff": 0.0021, "low": 0.0004, "high": 0.0039}
    assert (second.data.tags["within_noise"], second.data.tags["vs_best_trial"]) == ("False", "0")
    assert (third.data.tags["within_noise"], third.data.tags["vs_best_trial"]) == ("True", "1")
    # Hundreds of per-user values are the ledger's, not the run's.
    assert len(third.data.metrics) == len(first.data.metrics) + 3 and len(third.data.params) == len(first.data.params)


OPENAI = "sk-proj-FAKEopenai0000aaaa1111bbbb2222"
DEEPSEEK = "sk-FAKEdeepseek3333cccc4444dddd5555"
LOCAL = "rk-local-FAKE-6666-eeee-7777"  # no recognisable shape: only its env var gives it away
PLAIN = "hunter2-FAKE-password-8888"


def test_no_secret_reaches_the_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI)
    monkeypatch.setenv("DEEPSEEK_API_KEY", DEEPSEEK)
    monkeypatch.setenv("RECTUNE_LLM_API_KEY", LOCAL)
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs.db'}")
    leaky_rationale = (
        f"Called the API with headers {{'Authorization': 'Bearer {DEEPSEEK}'}}.\n"
        f"Authorization: Bearer {OPENAI}\nkey={LOCAL}; password = {PLAIN}\n"
    )
    tags = {"llm_key": LOCAL, "note": f"endpoint https://api.deepseek.com?key={DEEPSEEK}", "http_auth": PLAIN}
    params = {
        "api_key": PLAIN, "OPENAI_API_KEY": OPENAI, "llm": {"model": "deepseek-chat", "token": PLAIN},
        "max_tokens": 512, "temperature": 0.2,
    }
    with tracker.session("baby", f"session {OPENAI}", "llm", tags=tags, params=params) as session:
        leaky = trial(100, llm_secret=LOCAL, note=DEEPSEEK)
        log(session, leaky, 0, "llm", f"study-{OPENAI}", rationale=leaky_rationale)
        session.log_session_artifact(f"env: OPENAI_API_KEY={OPENAI}\n{LOCAL}\n", "config.txt")

    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("baby").experiment_id])
    assert len(runs) == 2
    stored: list[str] = []
    for run in runs:
        stored += [run.info.run_name, *run.data.params, *run.data.params.values(), *run.data.tags]
        stored += [*run.data.tags.values(), *run.data.metrics]
        pending = client.list_artifacts(run.info.run_id)
        while pending:
            artifact = pending.pop()
            if artifact.is_dir:
                pending += client.list_artifacts(run.info.run_id, artifact.path)
            else:
                stored.append(read_artifact(client, run.info.run_id, artifact.path, tmp_path / "dl" / run.info.run_id))
    text = "\n".join(stored)
    raw = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    for secret in (OPENAI, DEEPSEEK, LOCAL, PLAIN):
        assert secret not in text
        assert secret.encode() not in raw
    parent, child = sorted(runs, key=lambda run: "mlflow.parentRunId" in run.data.tags)
    assert parent.data.params["max_tokens"] == "512" and parent.data.params["api_key"] == "***"
    assert "deepseek-chat" in parent.data.params["llm"]
    assert child.data.params["llm_secret"] == "***" and child.data.params["recall_k"] == "100"
    assert "Authorization: ***" in text


def test_redact_keeps_what_is_not_secret(monkeypatch):
    monkeypatch.setenv("RECTUNE_LLM_API_KEY", "EMPTY")  # a local server's placeholder, not a key
    kept = {"max_tokens": 7, "author": "me", "tokenizer": "bert", "model": "EMPTY-sk-1234", "llm": {"top_p": 0.9}}
    hidden = {"apiKey": "x", "X-Auth": "x", "access_token": "x", "Secret": "x"}
    assert redact(kept | hidden | {"llm2": {"password": "p"}}) == kept | dict.fromkeys(hidden, "***") | {
        "llm2": {"password": "***"}
    }
    assert scrub("task-scheduler uses 20 tokens: fine") == "task-scheduler uses 20 tokens: fine"
    assert scrub('{"api_key": "abc123", "x": 1}') == '{"api_key": "***", "x": 1}'
    assert scrub("curl -H 'Authorization: Basic dXNlcjpwYXNz' url") == "curl -H 'Authorization: ***' url"
    assert scrub("--storage postgresql://tuner:s3cr%40t@db:5432/rectune") == "--storage postgresql://tuner:***@db:5432/rectune"
    assert scrub("sqlite:///a:b/c.db and http://127.0.0.1:5000/#/x@y") == "sqlite:///a:b/c.db and http://127.0.0.1:5000/#/x@y"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "CONFIG_FILES", (Path("rectune.toml"),))
    for env in config.TRACKING_URI_ENVS:
        monkeypatch.delenv(env, raising=False)
    assert config.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "rectune.toml").write_text('tracking_uri = "sqlite:///from-toml.db"\n')
    assert config.tracking_uri() == "sqlite:///from-toml.db"
    monkeypatch.setenv("RECTUNE_TRACKING_URI", "postgresql://db/rectune")
    assert config.tracking_uri() == "postgresql://db/rectune"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert config.tracking_uri() == "http://127.0.0.1:5000"
    assert config.tracking_uri("sqlite:////srv/flag.db") == "sqlite:////srv/flag.db"

    refused_stores = {
        "./mlruns": "sqlite:///mlruns.db",
        "/srv/mlruns": "sqlite:////srv/mlruns.db",
        "file:///srv/mlruns": "sqlite:////srv/mlruns.db",
    }
    for refused, suggestion in refused_stores.items():
        with pytest.raises(ConfigError, match="MLflow 3 refuses") as error:
            config.tracking_uri(refused)
        assert suggestion in str(error.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///srv/mlruns")
    with pytest.raises(ConfigError):
        Tracker()


def test_real_mlflow_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Artifacts proxied over HTTP to tmp_path/art, like a remote server's.
    with MlflowServer(f"sqlite:///{tmp_path / 'srv.db'}", tmp_path / "server.log",
                      artifacts_destination=tmp_path / "art", cwd=tmp_path) as server:
        url, port = server.url, server.port
        tracker = Tracker(tracking_uri=url)
        with tracker.session("baby", "tpe-baseline", "tpe", params={"budget": 2}) as session:
            ids = [log(session, trial(k, test=k == 200), n, "tpe", "baby-tpe") for n, k in enumerate((100, 200))]

        client = MlflowClient(url)
        parent = client.get_run(session.run_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["tuner"] == "tpe"
        kids = children(client, parent)
        assert [run.info.run_id for run in kids] == ids
        assert kids[1].data.metrics["test/AE/ndcg_at_20"] == 0.048
        assert kids[0].data.metrics["val/AF/recall_at_20"] == VAL["AF"]["recall@20"]
        assert kids[0].info.artifact_uri.startswith("mlflow-artifacts:")
        table = read_artifact(client, ids[1], "metrics_by_group.md", tmp_path / "dl")
        assert "## test" in table
        assert len(list((tmp_path / "art").rglob("metrics_by_group.md"))) == 2
    assert not port_in_use(port)


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def read_line_with(process: subprocess.Popen, needle: str, seconds: float) -> str:
    """The first stdout line containing `needle`; fails with everything printed so far."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            seen.append(line)
            if needle in line:
                return line
            if not line and process.poll() is not None:
                break
    raise AssertionError(f"no line with {needle!r} in {seconds:.0f} s; output:\n{''.join(seen)}")


def test_rectune_ui_lists_the_session_and_its_nested_trials_in_chromium(tmp_path):
    """`rectune ui` as a user runs it; the runs table as a user sees it, in headless Chromium."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH: the README's test command installs Debian's (apt-get install chromium)")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_three(Tracker(tracking_uri=store))

    ui = subprocess.Popen([sys.executable, "-m", "rectune.agent.cli", "ui", "--tracking-uri", store, "--port", "0"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page_url = read_line_with(ui, "baby: http://127.0.0.1:", 120).split("baby: ", 1)[1].strip()
        assert page_url.endswith("/runs")
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(page_url)
            session_cell = page.get_by_role("gridcell").filter(has_text="llm-session")
            session_cell.wait_for(timeout=60_000)
            # Nested runs are collapsed under their parent until its expander is clicked.
            assert page.get_by_text("trial-1", exact=True).count() == 0
            session_cell.locator("button[data-component-id*='runnamecellrenderer']").click()
            for name in ("trial-0", "trial-1", "trial-2"):
                page.get_by_text(name, exact=True).wait_for(timeout=30_000)
            page.screenshot(path=ARTIFACTS / "mlflow-ui-session.png", full_page=True)
            browser.close()
        print(f"\nscreenshot: {ARTIFACTS / 'mlflow-ui-session.png'}")
    finally:
        ui.send_signal(signal.SIGTERM)
        try:
            output = ui.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            ui.kill()
            raise
    assert ui.returncode == 0 and "MLflow UI stopped" in output, output
    assert not port_in_use(int(page_url.split(":")[2].split("/")[0]))


def test_filter_values_are_quoted_for_mlflow_searches(tmp_path):
    from rectune.tools.tracking import filter_value

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    experiment = client.create_experiment("x")
    for name in ("plain", "it's"):
        client.create_run(experiment, tags={"optuna_study": name})
        [found] = client.search_runs([experiment], f"tags.optuna_study = {filter_value(name)}")
        assert found.data.tags["optuna_study"] == name
    with pytest.raises(ConfigError, match="may hold ' or \" but not both"):
        filter_value("""it's "quoted\"""")


def test_the_tracking_probe_sends_no_credentials_and_refuses_only_a_dead_server():
    import http.server
    import threading

    from rectune.tools.loopback import pick_free_port
    from rectune.tools.tracking import _reach_server

    paths = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        _reach_server(f"http://tuner:s3cret@127.0.0.1:{port}/prefix/")
    finally:
        server.shutdown()
        server.server_close()
    assert paths == [("/prefix/health", None)]
    with pytest.raises(ConfigError, match=r"cannot reach the MLflow tracking server http://tuner:\*\*\*@127\.0\.0\.1"):
        _reach_server(f"http://tuner:s3cret@127.0.0.1:{pick_free_port()}")
