"""The agent end to end: the real ChatOpenAI client over HTTP against a scripted server on
127.0.0.1, the real trial runner, Optuna ledger (SQLite), MLflow (SQLite) and SqliteSaver.

On the fixture data the heuristic beats every other pipeline beyond noise under ndcg@20, so
the sessions with that objective make no pick request: every request is a tuning call.
Under TIES several pipelines are within noise of the best in some groups, and the pick is
asked for those groups only."""

import json
import re
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from rectune.agent.session import list_sessions, run
from scripted_llm import ScriptedLLM, call, calls, is_pick, is_warm_up, raw, text
from rectune.tools.study import Study
from rectune.tools.tracking import Tracker

TIES = {"groups": "activity:4", "objective": "ndcg@5"}
"""Settings under which the fixture's groups differ: in some several pipelines tie with the best, in one the best is alone."""
NOT_USED = re.compile(r"Note: your previous reply was not used \((.*)\); (?:candidate ([A-D])|a person's edit) ran instead\.")
CHOSEN_BY = {"llm": "LLM", "rule": "rule: alone within noise", "fallback": "fallback"}
"""selection[g]["chosen_by"] → how selection.md and the report say it."""


@pytest.fixture(autouse=True)
def no_real_keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "DEEPSEEK_API_KEY", "RECTUNE_LLM_API_KEY", "RECTUNE_LLM_BASE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def settings(tmp_path, data_dir, base_url, approve="ask", budget=3, groups="activity:2", session="s1"):
    return {"session": session, "dataset": "baby", "groups": groups, "objective": "ndcg@20", "budget": budget, "seed": 0,
            "approve": approve, "max_llm_calls": 12, "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "data_dir": str(data_dir), "cache_dir": str(tmp_path / "cache"),
            "llm_base_url": base_url, "llm_model": "scripted"}


def complete(storage: str, study: str) -> list:
    return [t for t in optuna.load_study(study_name=study, storage=storage).get_trials() if t.state == TrialState.COMPLETE]


def ledger(storage: str, study: str) -> dict[int, dict]:
    """Trial number → user attributes (params, tuner, rationale, meta), rejected proposals included."""
    return {t.number: t.user_attrs for t in optuna.load_study(study_name=study, storage=storage).get_trials()}


def children(client, run_id: str, **tags) -> list:
    """The nested runs of a parent run that carry every tag in `tags`."""
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def tuning(llm) -> list[dict]:
    """The tuning requests in order (all but the pick's, which offer choose_pipelines, and warm-ups)."""
    return [body for body in llm.requests if not is_pick(body) and not is_warm_up(body)]


def picks(llm) -> list[dict]:
    return [body for body in llm.requests if is_pick(body)]


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


def offered(body: dict) -> list[str]:
    return [tool["function"]["name"] for tool in body["tools"]]


def history_rows(body: dict) -> str:
    """The head of a tuning request's user message: the group's trials so far, as a table."""
    return user_text(body).split("\n\n", 1)[0]


def menu_of(body: dict) -> dict[str, str]:
    """Letter → candidate of a tuning request's menu ("A. <changes>", " (TPE sample)" after a sample's)."""
    listed = user_text(body).split("\nMenu:\n", 1)[1]
    return {line[0]: line[3:] for line in listed.splitlines() if re.match(r"[A-D]\. ", line)}


def note(body: dict) -> re.Match | None:
    """What a tuning request says of the previous reply when it could not be used."""
    return NOT_USED.search(user_text(body))


def bands(body: dict) -> dict[str, list[str]]:
    """Group → the pipelines a pick request offers it (its tool's enum)."""
    [tool] = [t["function"] for t in body["tools"] if t["function"]["name"] == "choose_pipelines"]
    return {group: spec["properties"]["pipeline"]["enum"] for group, spec in tool["parameters"]["properties"].items()}


def within_noise(rows: dict) -> list[str]:
    """A group's pipelines whose paired interval to the group's best holds 0, best first, read from the table."""
    order = sorted(rows, key=lambda p: -rows[p]["objective"])
    return [p for p in order if rows[p]["vs_best"]["low"] <= 0.0 <= rows[p]["vs_best"]["high"]]


def assert_ran_its_candidate(body: dict, trials: dict[int, dict], number: int) -> None:
    """Trial `number` ran exactly the menu candidate of `body` that its meta names, and says which kind it was."""
    from rectune.tools.proposers.menu import Candidate

    attrs = trials[number]
    meta, params = attrs["meta"], attrs["params"]
    assert meta["source"] in ("tpe", "neighbour")
    # Every change is listed against the best trial the request names.
    base = trials[int(re.search(r"Best: trial (\d+),", user_text(body)).group(1))]["params"]
    changes = {name: [base.get(name), value] for name, value in params.items() if base.get(name) != value}
    assert menu_of(body)[meta["candidate"]] == Candidate(params, meta["source"], changes).describe(), (number, user_text(body))


def assert_cacheable_prefixes(bodies: list[dict]) -> int:
    """Consecutive tuning requests of one pipeline send the same system message and tools, byte
    for byte (the prefix an endpoint's KV cache keeps), and within a group each user message
    starts with the previous one's history rows. Returns how many pairs were compared."""
    def pipeline(body):
        return re.search(r'pipeline "([^"]+)"', body["messages"][0]["content"]).group(1)

    def group(body):
        return re.match(r'Group "([^"]+)"', user_text(body)).group(1)

    pairs = 0
    for before, after in zip(bodies, bodies[1:]):
        if pipeline(before) != pipeline(after):
            continue
        pairs += 1
        assert [m["role"] for m in after["messages"]] == ["system", "user"]
        assert json.dumps(after["messages"][0]) == json.dumps(before["messages"][0])
        assert json.dumps(after["tools"]) == json.dumps(before["tools"])
        if group(before) == group(after):
            # One more row (a trial or a rejection) and the rest of the message after it.
            assert user_text(after).startswith(history_rows(before) + "\n| "), (user_text(before), user_text(after))
    return pairs


def assert_no_repeats(storage: str, study: str) -> dict[int, dict]:
    """No two trials of the study, rejected proposals included, hold the same configuration."""
    from rectune.tools.trial import canonical

    trials = ledger(storage, study)
    keys = [canonical(attrs["params"]) for attrs in trials.values()]
    assert len(set(keys)) == len(keys), keys
    return trials


def assert_paper_check(values: dict, client, tmp_path) -> None:
    """Per group: the band (the pipelines whose interval to the best holds 0), the argmax of the
    objective and of F1@TopN, recomputed from the selection table, against what the session
    recorded in its state, selection.md, its report and its MLflow parent run."""
    run_id = values["mlflow_run_id"]
    selection_md = Path(client.download_artifacts(run_id, "selection.md", str(tmp_path))).read_text()
    report = Path(values["report"]).read_text()
    tags = client.get_run(run_id).data.tags
    for group, pipelines in values["table"].items():
        f1 = {p: next(v for name, v in metrics.items() if name.startswith("f1@")) for p, metrics in pipelines.items()}
        objective_argmax = max(pipelines, key=lambda p: pipelines[p]["objective"])
        f1_argmax = max(f1, key=f1.get)
        choice, band = values["selection"][group], within_noise(pipelines)
        agrees, f1_agrees = choice["pipeline"] == objective_argmax, choice["pipeline"] == f1_argmax
        assert (choice["band"], choice["argmax"], choice["agrees"], choice["f1_argmax"], choice["f1_agrees"]) == \
            (band, objective_argmax, agrees, f1_argmax, f1_agrees)
        # The rule decides alone exactly when one pipeline is within noise; no pick ever leaves the band.
        assert (choice["chosen_by"] == "rule") == (len(band) == 1) and choice["in_band"] and choice["pipeline"] in band
        assert choice["llm"] == (choice["chosen_by"] == "llm")
        if choice["chosen_by"] != "llm":
            assert choice["pipeline"] == objective_argmax
        row = (f"| {group} | {choice['pipeline']} | {CHOSEN_BY[choice['chosen_by']]} | {objective_argmax} | "
               f"{'yes' if agrees else 'no'} | {f1_argmax} | {'yes' if f1_agrees else 'no'} |")
        assert row in selection_md and row in report, row
        assert {name: tags[f"select/{group}/{name}"] for name in ("pipeline", "objective_argmax", "agrees_objective",
                                                                 "f1_argmax", "agrees_f1", "chosen_by", "within_noise")} == {
            "pipeline": choice["pipeline"], "objective_argmax": objective_argmax, "agrees_objective": str(agrees),
            "f1_argmax": f1_argmax, "agrees_f1": str(f1_agrees), "chosen_by": choice["chosen_by"], "within_noise": ",".join(band)}


def test_session_select_tune_approve_edit_reject_report(tmp_path, baby_format_dir):
    script = [
        call("propose_change", changes={"neighbors": 20}, rationale="denser similarity graph"),  # approved
        call("propose_change", changes={"k": 5}, rationale="fewer candidates"),  # out of range: candidate A runs, edited
        call("choose", candidate="C", rationale="a menu candidate"),  # approved; cold's budget is spent
        call("propose_change", changes={"neighbors": 100}, rationale="much denser"),  # rejected
        call("propose_change", changes={"neighbors": 100}, rationale="denser still"),  # the rejected one again: candidate A
    ]  # then the script's finish
    answers = iter([{"action": "approve"}, {"action": "edit", "changes": {"neighbors": 40}}, {"action": "approve"},
                    {"action": "reject", "comment": "keep the graph sparse"}, {"action": "approve"}])
    shown = []

    def answer(payload):
        shown.append(payload)
        time.sleep(0.2)  # a person reading the proposal: not the LLM's time, nor the machine's
        return next(answers)

    with ScriptedLLM(script) as llm:
        config = settings(tmp_path, baby_format_dir, llm.base_url, budget=4)
        values = run(config, answer, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"),
                     tracker=Tracker(config["tracking_uri"]), report_dir=tmp_path / "reports")

    assert values["phase"] == "done"
    # The heuristic is alone within noise in both groups: the rule picks it and no pick request is made.
    assert {g: (s["pipeline"], s["chosen_by"]) for g, s in values["selection"].items()} == {
        "cold": ("heuristic", "rule"), "heavy": ("heuristic", "rule")}
    assert picks(llm) == [] and len(llm.requests) == 6  # one call per proposal, the finish included
    assert values["waited"] >= 0.2 * len(shown) and "since model selection began, waits for a person excluded)" in \
        Path(values["report"]).read_text()
    # Approval payloads carry the diff against the current best and the rationale.
    assert shown[0]["diff"] == {"neighbors": [50, 20]} and shown[0]["rationale"] == "denser similarity graph"
    # The out-of-range call cost no extra call: candidate A was proposed instead, and the next turn says why.
    assert shown[1]["rationale"].startswith("fallback to candidate A (") and "k=5 is out of range [50, 3000]" in shown[1]["rationale"]
    bodies = tuning(llm)
    # Without a ranker k cannot move ndcg@20: propose_change does not offer it, and still checks a k it is sent.
    [change] = [tool["function"] for tool in bodies[0]["tools"] if tool["function"]["name"] == "propose_change"]
    assert "neighbors" in change["parameters"]["properties"]["changes"]["properties"]
    assert not {"k", "top_n"} & set(change["parameters"]["properties"]["changes"]["properties"])
    told = note(bodies[2]).group(1)
    assert "k=5 is out of range [50, 3000]" in told and "; k cannot move ndcg@20 here (tunable: " in told
    assert note(bodies[1]) is None
    assert "A person rejected your proposal neighbors=100: keep the graph sparse" in user_text(bodies[4])
    assert "| llm (own) | neighbors=100 | rejected by a person: keep the graph sparse |" in user_text(bodies[4])
    assert "that configuration was already rejected by a person (keep the graph sparse)" in note(bodies[5]).group(1)

    # The checkpointed state keeps no per-user values (the ledger has them, and the report pairs them from there).
    assert all(row["result"] is None or row["result"]["per_user"] is None for rows in values["history"].values() for row in rows)
    assert Study.open(config["storage"], "s1-cold").history()[0].result.per_user["n"] > 0
    assert "## Validation ndcg@20: default vs best, paired over the group's users" in Path(values["report"]).read_text()
    cold = assert_no_repeats(config["storage"], "s1-cold")
    assert [cold[n]["tuner"] for n in cold] == ["default", "llm", "llm", "llm"]
    assert [cold[n]["params"]["neighbors"] for n in (0, 1, 2)] == [50, 20, 40]  # the person's edit ran, not candidate A
    assert "edited by a person" in cold[2]["rationale"] and "candidate" not in cold[2]["meta"]
    assert note(bodies[2]).group(2) is None and cold[2]["meta"]["source"] == "person"  # "a person's edit ran instead"
    assert (cold[1]["meta"]["source"], cold[2]["meta"]["refused"]) == ("own", 1)
    assert_ran_its_candidate(bodies[2], cold, 3)
    heavy = assert_no_repeats(config["storage"], "s1-heavy")
    assert [heavy[n]["tuner"] for n in heavy] == ["default", "llm", "llm"] and heavy[1]["rejected"]
    assert heavy[1]["params"]["neighbors"] == 100 and heavy[1]["comment"] == "keep the graph sparse"
    assert_ran_its_candidate(bodies[4], heavy, 2)
    assert values["finished"] == {"cold": "budget", "heavy": "finish: script exhausted"}
    assert values["llm_calls"] == {"select": 0, "cold": 3, "heavy": 3}
    assert values["invalid_calls"] == {"select": 0, "cold": 1, "heavy": 1}
    # Both groups tune the heuristic: every request shares its system message and tools.
    assert assert_cacheable_prefixes(bodies) == 5

    report = (tmp_path / "reports" / "s1.md").read_text()
    assert "Test split: default vs adopted" in report and "| cold | heuristic | ndcg@20 |" in report
    assert "LLM: 6 calls, 2 refused (67% valid)" in report
    client = MlflowClient(config["tracking_uri"])
    parent = client.get_run(values["mlflow_run_id"])
    nested = children(client, parent.info.run_id)
    trials = [r for r in nested if "phase" not in r.data.tags]  # the ledger's trials; select runs carry a phase
    assert sorted(r.data.tags["tuner"] for r in trials) == ["default", "default", "llm", "llm", "llm", "llm"]
    assert len(nested) == len(trials) + 2 * 4  # and every pipeline's default on each group
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "selection.md"} <= artifacts
    assert_paper_check(values, client, tmp_path)
    llm_child = next(r for r in trials if r.data.tags["tuner"] == "llm" and r.data.params.get("neighbors") == "20")
    assert client.download_artifacts(llm_child.info.run_id, "rationale.md", str(tmp_path)) and \
        (tmp_path / "rationale.md").read_text() == "denser similarity graph"
    assert list_sessions(str(tmp_path / "sessions.db"))[0]["phase"] == "done"


def test_a_reply_that_cannot_be_used_runs_candidate_a_at_no_extra_call(tmp_path, baby_format_dir, shared_cache):
    long_text = "I think we should consider many things. " * 2500
    bad = [  # (reply, what the next prompt says of it)
        # Trial 0 is still the best here, so this edit of it is the default configuration again.
        (call("propose_change", changes={"neighbors": 50}, rationale="same as default"), "that configuration was already tried as trial 0"),
        (raw("propose_change", '{"changes": {"neighbors": 20}, "rationale": "unterminated'), "are not valid JSON"),
        (call("get_history"), "there is no tool 'get_history' on this turn; the tools are choose, propose_change, finish"),
        (call("choose", candidate="E", rationale="the fifth"), "but got 'E'"),
        (call("propose_change", changes={"neighbors": 5000}, rationale="huge"), "neighbors=5000 is out of range [10, 500]"),
        (text("Let me think about the best value for K."), "the reply was text ('Let me think about the best value for K.')"),
        (call("finish"), "finish needs a reason"),
        (text(long_text), "the reply was text ('I think we should consider many things. I think"),
        (call("propose_change", changes="neighbors=20", rationale="a string"), "changes must be a non-empty object"),
        (call("propose_change", changes={"neighbors": 20}), "rationale must be a non-empty string"),
        (raw("choose", "[1, 2]"), "its arguments are valid JSON but not an object ([1, 2], in tool call 1)"),
        ({"calls": [("choose", '{"candidate": "B", "rationale": "b"}'), ("finish", "5")]}, "(5, in tool call 2)"),
        (raw("finish", "true"), "(true, in tool call 1)"),
        (call("choose", candidate="B"), "rationale must be a non-empty string"),
    ]
    own = call("propose_change", changes={"neighbors": 20, "cf_weight": 0.5}, rationale="denser, less EASE")
    script = [reply for reply, _ in bad] + [
        own, own,  # the second edits the same best (or the first, if it became the best) into the same configuration
        calls(("propose_change", {"changes": {"neighbors": 25}, "rationale": "ok"}), ("finish", {"reason": "also"})),
        lambda body: call("choose", candidate=max(menu_of(body)), rationale="the last candidate"),  # past a tried-out neighbourhood the menu may be short
        call("finish", reason="done"),
    ]
    lines = []
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=20),
                  "max_llm_calls": 30, "cache_dir": shared_cache}
        values = run(config, None, echo=lines.append, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    assert values["phase"] == "done" and values["finished"] == {"all": "finish: done"}
    # Exactly one request per trial (the finish's included): no bad reply was asked again.
    bodies = tuning(llm)
    assert len(llm.requests) == len(bodies) == len(script) == 19
    trials = assert_no_repeats(config["storage"], "s1-all")
    assert len(complete(config["storage"], "s1-all")) == len(trials) == 19
    for number, (reply, why) in enumerate(bad, start=1):
        # Reply `number` decided trial `number`; the request after it says why it was not used.
        told = note(bodies[number])
        assert told is not None and why in told.group(1) and told.group(2) == "A", (number, user_text(bodies[number])[-800:])
        meta = trials[number]["meta"]
        assert (meta["fallback"], meta["candidate"], meta["calls"], meta["refused"]) == (told.group(1), "A", 1, 1)
        assert trials[number]["rationale"].startswith("fallback to candidate A (")
        assert_ran_its_candidate(bodies[number - 1], trials, number)
    long = next(i for i, (reply, _) in enumerate(bad, start=1) if reply.get("text") == long_text)
    # A 100 kB reply is not fed back whole.
    assert len(note(bodies[long]).group(1)) <= 500 and len(user_text(bodies[long])) < 5000 and trials[long]["meta"]["in_text"]
    # The proposer's own change ran; the same change again was a repeat, so candidate A ran instead.
    assert (trials[15]["meta"]["source"], trials[15]["params"]["cf_weight"]) == ("own", 0.5) and note(bodies[15]) is None
    assert "that configuration was already tried as trial 15" in note(bodies[16]).group(1)
    assert trials[16]["meta"]["candidate"] == "A"
    # Of several calls the first is read, and the trial says so.
    assert trials[17]["params"]["neighbors"] == 25 and trials[17]["meta"]["note"].startswith("2 calls were made; only the first")
    assert note(bodies[17]) is None and trials[18]["meta"]["refused"] == 0
    assert_ran_its_candidate(bodies[17], trials, 18)
    assert trials[18]["meta"]["candidate"] == max(menu_of(bodies[17])) > "A" and note(bodies[18]) is None
    # Each call's tokens are kept with its trial; but for a reply the client itself refuses to build
    # (arguments that are JSON but not an object) the usage is lost with the rest of the reply.
    unbuilt = {n for n in range(1, 19) if "valid JSON but not an object" in trials[n]["meta"].get("fallback", "")}
    assert len(unbuilt) == 3 and all((trials[n]["meta"]["input_tokens"], trials[n]["meta"]["output_tokens"]) == (10, 5)
                                     for n in range(1, 19) if n not in unbuilt)
    assert values["llm_calls"] == {"select": 0, "all": 19} and values["invalid_calls"] == {"select": 0, "all": 15}
    assert "LLM: 19 calls, 15 refused (21% valid)" in Path(values["report"]).read_text()
    assert len([line for line in lines if line.startswith("[tune] all: the LLM's reply was not used (")]) == 15
    assert assert_cacheable_prefixes(bodies) == 18


def test_a_pair_of_candidates_costs_one_call_and_a_person_can_break_it(tmp_path, baby_format_dir, shared_cache):
    script = [
        call("choose", candidate="B", then="C", rationale="two directions"),  # trials 1 and 2
        call("choose", candidate="A", then="A", rationale="A twice"),  # a bad second: only A runs (trial 3)
        call("choose", candidate="A", then="B", rationale="another pair"),  # its first rejected: B does not run
        call("choose", candidate="B", rationale="after the rejection"),  # trial 4
    ]
    answers = iter([{"action": "approve"}] * 3 + [{"action": "reject", "comment": "not now"}, {"action": "approve"}])
    shown = []

    def answer(payload):
        shown.append(payload)
        return next(answers)

    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, groups="all", budget=5), "cache_dir": shared_cache}
        values = run(config, answer, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    assert values["phase"] == "done" and values["finished"] == {"all": "budget"}
    bodies = tuning(llm)
    # Four trials and a rejected proposal from four calls: the pair's second asked nothing.
    assert len(bodies) == len(llm.requests) == 4 and values["llm_calls"] == {"select": 0, "all": 4}
    trials = assert_no_repeats(config["storage"], "s1-all")
    assert_ran_its_candidate(bodies[0], trials, 1)
    assert_ran_its_candidate(bodies[0], trials, 2)
    assert (trials[1]["meta"]["candidate"], trials[2]["meta"]["candidate"]) == ("B", "C")
    assert (trials[2]["meta"]["calls"], trials[2]["meta"]["paired_with"]) == (0, 1)
    assert shown[1]["rationale"] == "second of the pair chosen with trial 1: two directions"
    assert "then must be another of ['A', 'B', 'C', 'D'], but got 'A': only A runs." in trials[3]["meta"]["note"]
    assert "then" not in trials[3]["meta"] and trials[3]["meta"]["candidate"] == "A"
    # The person rejected the pair's first: the LLM was asked again, told so, and its second never ran.
    assert trials[4]["rejected"] and trials[4]["comment"] == "not now"
    assert "A person rejected your proposal" in user_text(bodies[3])
    assert_ran_its_candidate(bodies[3], trials, 5)
    assert sum(1 for t in trials.values() if not t.get("rejected")) == 5
    assert assert_cacheable_prefixes(bodies) == 3


def test_a_crash_between_the_two_trials_of_a_pair_resumes_with_the_second_and_no_call(tmp_path, baby_format_dir, monkeypatch,
                                                                                      shared_cache):
    from rectune.tools.runner import TrialRunner

    original, tuning_runs = TrialRunner.run, []

    def dies_before_the_pairs_second(self, spec, *args, **kwargs):
        if tuning(llm):  # the pair has been chosen: these are its trials
            tuning_runs.append(spec)
            if len(tuning_runs) == 2:
                raise RuntimeError("killed between the two trials of a pair")
        return original(self, spec, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", dies_before_the_pairs_second)
    with ScriptedLLM([call("choose", candidate="B", then="C", rationale="two directions")]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3),
                  "cache_dir": shared_cache}
        options = {"echo": lambda line: None, "checkpoint": str(tmp_path / "sessions.db"), "report_dir": tmp_path / "r"}
        with pytest.raises(RuntimeError, match="killed between the two trials of a pair"):
            run(config, None, **options)
        assert len(complete(config["storage"], "s1-all")) == 2  # the default and the pair's first
        values = run(config, None, resume=True, **options)

    assert values["phase"] == "done" and values["finished"] == {"all": "budget"}
    # The history alone said what ran next: the pair's second, without asking the LLM again.
    assert len(llm.requests) == 1 and values["llm_calls"] == {"select": 0, "all": 1}
    default, first, second = complete(config["storage"], "s1-all")
    assert (first.user_attrs["meta"]["candidate"], second.user_attrs["meta"]["candidate"]) == ("B", "C")
    assert (second.user_attrs["meta"]["calls"], second.user_attrs["meta"]["paired_with"]) == (0, 1)
    # The trial the crash cut short is kept as failed, holding the same proposal the resumed run completed.
    failed = [t for t in optuna.load_study(study_name="s1-all", storage=config["storage"]).get_trials() if t.state == TrialState.FAIL]
    assert [t.user_attrs["proposal_id"] for t in failed] == [second.user_attrs["proposal_id"]] == ["all-2"]
    assert second.user_attrs["params"] == first.user_attrs["meta"]["then"]["params"] != default.user_attrs["params"]


def test_model_selection_warms_the_prompt_prefix_of_the_first_tuning_call(tmp_path, baby_format_dir, shared_cache, monkeypatch):
    from rectune.agent import session as session_module

    # The embedded model's sessions warm; a scripted endpoint stands in for it here.
    original = session_module.Resources
    monkeypatch.setattr(session_module, "Resources", lambda *a, **k: original(*a, **{**k, "warm_prompt_cache": True}))
    lines = []
    with ScriptedLLM([call("choose", candidate="A", then="B", rationale="two neighbours")]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3), "cache_dir": shared_cache}
        values = run(config, None, echo=lines.append, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    assert values["phase"] == "done"
    warm_ups = [body for body in llm.requests if is_warm_up(body)]
    [first] = tuning(llm)
    assert warm_ups and llm.requests.index(warm_ups[0]) < llm.requests.index(first)
    pipeline = values["selection"]["all"]["pipeline"]
    # The last warm-up was for the pipeline that is tuned: its system message and tools are the first call's, byte for byte.
    last = warm_ups[-1]
    assert json.dumps(last["messages"][0]) == json.dumps(first["messages"][0]) and json.dumps(last["tools"]) == json.dumps(first["tools"])
    assert f'pipeline "{pipeline}"' in first["messages"][0]["content"]
    assert len([line for line in lines if "tuning prompt prefix cached during model selection" in line]) == len(warm_ups)
    # The ranker-less pipelines are scored first, and the first warm-up waits for both: it is for the better of them.
    assert [line.split()[1].rstrip(":") for line in lines if line.startswith("[select]")] == [
        "heuristic", "two_tower", "heuristic+deepfm", "two_tower+deepfm"]
    rows = values["table"]["all"]
    assert f'pipeline "{max(("heuristic", "two_tower"), key=lambda p: rows[p]["objective"])}"' in warm_ups[0]["messages"][0]["content"]
    assert values["llm_calls"] == {"select": 0, "all": 1}  # a warm-up decides nothing and is no call of the budget


def test_each_group_is_offered_the_best_configurations_of_the_groups_tuned_before_it(tmp_path, baby_format_dir, shared_cache,
                                                                                     monkeypatch):
    from rectune.agent.proposer import LLMProposer
    from rectune.tools.adoption import best_record
    from rectune.tools.trial import canonical

    seen, original = {}, LLMProposer.propose

    def recording(self, history, context):
        seen.setdefault(context.study.group, context.transfers)
        return original(self, history, context)

    monkeypatch.setattr(LLMProposer, "propose", recording)
    script = [call("choose", candidate="A", then="B", rationale="two neighbours")] * 2
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", budget=3), "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    first, second = values["history"]  # in the order tuned
    assert values["selection"][first]["pipeline"] == values["selection"][second]["pipeline"]
    history = Study.open(config["storage"], f"s1-{first}").history()
    best = best_record(history)
    assert seen == {first: (), second: ((first, best.params),)}
    # The second group's first menu offers it exactly when it is untried there: only the default (trial 0) has run.
    offered = f"(best of group {first})" in user_text(tuning(llm)[1])
    assert offered == (canonical(best.params) != canonical(history[0].params))


def test_the_llm_runs_another_groups_best_when_it_chooses_it_from_the_menu():
    from rectune.agent.llm import LLMSettings, chat_model
    from rectune.agent.proposer import LLMProposer
    from rectune.tools.proposer import ProposerContext
    from rectune.tools.space import SearchSpace
    from rectune.tools.study import StudyContext
    from rectune.tools.trial import TrialRecord, TrialResult, canonical

    space, study = SearchSpace.load(), StudyContext("baby", "activity:2", "heavy", "heuristic", budget=5, tuner="llm")
    defaults = space.defaults("heuristic")
    cold_best = {**defaults, "cf_weight": 0.5}
    result = TrialResult(study.spec(defaults), 0.04, {"heavy": {"ndcg@20": 0.04, "recall@20": 0.1}}, 0.5, 1.0, 1.0, "none")
    history = [TrialRecord(0, "default", "complete", defaults, result=result)]

    def choose_the_transfer(body):
        [letter] = [line[0] for line in user_text(body).split("Menu:")[1].splitlines() if line.endswith("(best of group cold)")]
        return call("choose", candidate=letter, rationale="cold's best, cf_weight 0.5")

    with ScriptedLLM([choose_the_transfer]) as llm:
        proposer = LLMProposer(0, llm=chat_model(LLMSettings(llm.base_url, "scripted", None)))
        proposal = proposer.propose(history, ProposerContext(study, space, study.budget, (("cold", cold_best),)))
    assert canonical(proposal.params) == canonical(cold_best)
    assert (proposal.meta["source"], proposal.rationale) == ("transfer", "cold's best, cf_weight 0.5")
    assert "cf_weight 0.85→0.5 (best of group cold)" in user_text(llm.requests[0])
    # No latency budget: the LLM does not read measured latencies (0.5 ms here), which differ from
    # run to run and would make the same seed take another path.
    assert "latency" not in user_text(llm.requests[0]) and "0.500" not in user_text(llm.requests[0])


def test_a_model_stuck_on_one_change_never_repeats_a_trial(tmp_path, baby_format_dir, shared_cache):
    """The 1.5B model's commonest failure (250 of 456 calls in the README's comparison): the same
    proposal again and again. Each repeat is replaced by a new candidate at no extra call, a
    rejected proposal counts as tried, and no configuration runs twice."""
    stuck = call("propose_change", changes={"neighbors": 20}, rationale="denser")
    answers = iter([{"action": "approve"}, {"action": "reject", "comment": "not that one"}])

    with ScriptedLLM([stuck] * 8) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, groups="all", budget=6), "cache_dir": shared_cache}
        values = run(config, lambda payload: next(answers, {"action": "approve"}), echo=lambda line: None,
                     checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    trials = assert_no_repeats(config["storage"], "s1-all")
    bodies = tuning(llm)
    # Request n made the proposal of trial n (run or rejected): one call each, none asked again.
    assert sorted(trials) == list(range(len(bodies) + 1)) and values["finished"] == {"all": "budget"}
    assert trials[2]["rejected"] and len(complete(config["storage"], "s1-all")) == 6
    assert (trials[1]["params"]["neighbors"], trials[1]["meta"]["source"]) == (20, "own")
    repeats = 0
    for number in range(2, len(bodies) + 1):
        meta = trials[number]["meta"]
        if "fallback" in meta:  # the best, edited so, is a configuration some trial holds
            repeats += 1
            assert re.fullmatch(r"propose_change was not used: that configuration was already tried as trial \d+", meta["fallback"])
            assert meta["candidate"] == "A"
        else:  # a candidate became the best, and neighbors=20 on it was new: it ran
            assert meta["source"] == "own" and trials[number]["params"]["neighbors"] == 20
        if number < len(bodies) and trials[number].get("rejected"):  # the next turn hears of the rejection instead
            assert "A person rejected your proposal " in user_text(bodies[number]) and note(bodies[number]) is None
        elif number < len(bodies):
            assert (note(bodies[number]) is not None) == ("fallback" in meta)
    assert repeats >= 2 and values["invalid_calls"]["all"] == repeats


def test_a_full_budget_session_offers_no_finish_and_uses_every_trial(tmp_path, baby_format_dir, shared_cache):
    script = [call("finish", reason="the default is good enough"), call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    with ScriptedLLM(script) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=3), "may_finish": False,
                  "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    bodies = tuning(llm)
    assert [offered(body) for body in bodies] == [["choose", "propose_change"]] * 2
    assert "Every group gets its whole budget of trials: there is no finish tool." in bodies[0]["messages"][0]["content"]
    # A finish it was not offered is a reply that cannot be used: candidate A ran, and the next turn says why.
    assert "there is no tool 'finish' on this turn; the tools are choose, propose_change" in note(bodies[1]).group(1)
    trials = assert_no_repeats(config["storage"], "s1-all")
    assert trials[1]["meta"]["candidate"] == "A" and trials[2]["params"]["neighbors"] == 20
    assert values["finished"]["all"] == "budget" and len(complete(config["storage"], "s1-all")) == 3 and len(llm.requests) == 2


def test_only_pipelines_within_noise_of_the_best_may_be_picked(tmp_path, baby_format_dir, shared_cache):
    from rectune.models.pipeline import PIPELINES

    refused = {}

    def outside_the_band(body):
        """For the open group with the narrowest band, a real pipeline outside it, sent as a raw
        call (past any grammar an endpoint would enforce); the others' first choice."""
        offers = bands(body)
        group = min(offers, key=lambda g: len(offers[g]))
        choice = {g: {"because": "best objective", "pipeline": band[0]} for g, band in offers.items()}
        choice[group] = {"because": "best objective", "pipeline": next(p for p in PIPELINES if p not in offers[group])}
        refused.update(group=group, pipeline=choice[group]["pipeline"], band=offers[group])
        return raw("choose_pipelines", json.dumps(choice))

    def the_simplest_of_each_band(body):
        return call("choose_pipelines", **{g: {"because": "fewest stages", "pipeline": band[-1]} for g, band in bands(body).items()})

    with ScriptedLLM([], picks=[outside_the_band, the_simplest_of_each_band]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", budget=1), **TIES, "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"),
                     tracker=Tracker(config["tracking_uri"]), report_dir=tmp_path / "r")

    table, selection = values["table"], values["selection"]
    expected = {group: within_noise(rows) for group, rows in table.items()}
    ties = {group: band for group, band in expected.items() if len(band) > 1}
    # The fixture gives both kinds of group (else this test would prove nothing of one of them).
    assert ties and len(ties) < len(expected) and any(len(band) < len(PIPELINES) for band in ties.values())
    # One request per attempt, each offering exactly the tied pipelines of exactly the open groups: the
    # second only the refused group's (the others' valid picks are kept); budget 1: no tuning call.
    assert len(picks(llm)) == len(llm.requests) == 2
    for body, open_groups in zip(picks(llm), (ties, {refused["group"]: ties[refused["group"]]})):
        assert bands(body) == open_groups and offered(body) == ["choose_pipelines"]
        assert body["tool_choice"] == {"type": "function", "function": {"name": "choose_pipelines"}}
    first, second = (user_text(body) for body in picks(llm))
    assert f"For each of the groups {', '.join(ties)}, choose what decides" in first
    assert f"For each of the groups {refused['group']}, choose" in second and "Your previous answer was refused: " in second
    # The prompt's tables hold only the pipelines the pick may choose, best first.
    for group, band in ties.items():
        rows = first.split(f"Group {group}:\n")[1].split("\n\n")[0].splitlines()[2:]
        assert [row.split(" | ")[0].lstrip("| ") for row in rows] == band
    assert f"group {refused['group']!r}: {refused['pipeline']!r} is not within noise of the best; choose one of {refused['band']}" in second
    for group, band in expected.items():
        choice = selection[group]
        if group == refused["group"]:
            # The criterion decides: the band's first pipeline without a ranker (the one named if it is one).
            simplest = [p for p in band if "+" not in p] or band
            expected_pipeline = band[-1] if band[-1] in simplest else simplest[0]
            assert (choice["pipeline"], choice["chosen_by"], choice["because"]) == (expected_pipeline, "llm", "fewest stages")
            assert choice["reason"].startswith(f"the simplest (fewest stages) of the {len(band)} within noise: ")
        elif group in ties:
            assert (choice["pipeline"], choice["chosen_by"], choice["because"]) == (band[0], "llm", "best objective")
            assert choice["reason"].startswith(f"the best objective of the {len(band)} within noise: {table[group][band[0]]['objective']:.5f} against ")
        else:
            assert (choice["pipeline"], choice["chosen_by"]) == (band[0], "rule")
            assert choice["reason"].startswith("the only pipeline within noise of the best (next: ")
        # The group is tuned on the pipeline chosen for it.
        assert Study.open(config["storage"], f"s1-{group}").context.pipeline == choice["pipeline"]
    assert values["llm_calls"]["select"] == 2 and values["invalid_calls"]["select"] == 1
    assert_paper_check(values, MlflowClient(config["tracking_uri"]), tmp_path)


def test_three_refused_picks_fall_back_to_the_best_then_each_group_keeps_its_call_budget(tmp_path, baby_format_dir, shared_cache):
    bad_picks = [
        raw("choose_pipelines", '[{"group": "cold", "pipeline": "heuristic"}]'),  # JSON, but not an object
        call("choose_pipelines", cold={"because": "best objective", "pipeline": ["heuristic"]}),  # and nothing for the other groups
        text("The heuristic everywhere."),
    ]
    with ScriptedLLM([call("choose", candidate="B", rationale="the second")] * 4, picks=bad_picks) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", budget=3), **TIES, "max_llm_calls": 1,
                  "cache_dir": shared_cache}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"),
                     tracker=Tracker(config["tracking_uri"]), report_dir=tmp_path / "reports")

    asked = [user_text(body) for body in picks(llm)]
    assert len(asked) == 3
    assert "Your previous answer was refused: Your reply was not used: its arguments are valid JSON but not an object" in asked[1]
    assert "group 'cold': \"['heuristic']\" is not within noise of the best" in asked[2] and "no choice for group" in asked[2]
    table, selection = values["table"], values["selection"]
    for group, choice in selection.items():
        band = within_noise(table[group])
        assert choice["pipeline"] == band[0] and choice["chosen_by"] == ("rule" if len(band) == 1 else "fallback")
        if len(band) > 1:
            assert "fallback to the best objective: the LLM failed (Call choose_pipelines with a choice for every group; " \
                   "you answered 'The heuristic everywhere.'.)" in choice["reason"]
    assert {s["chosen_by"] for s in selection.values()} == {"rule", "fallback"}
    assert_paper_check(values, MlflowClient(config["tracking_uri"]), tmp_path)
    assert values["llm_calls"]["select"] == values["invalid_calls"]["select"] == 3
    # One LLM call per group (its budget): one trial after the default, then the group stops.
    assert values["finished"] == {group: "llm-call budget" for group in selection}
    bodies = tuning(llm)
    assert len(bodies) == len(selection) == 4
    for index, group in enumerate(selection):
        trials = assert_no_repeats(config["storage"], f"s1-{group}")
        assert [trials[n]["tuner"] for n in trials] == ["default", "llm"] and trials[1]["meta"]["candidate"] == "B"
        assert_ran_its_candidate(bodies[index], trials, 1)
    # Each group tunes its band's best; consecutive groups on one pipeline share the system message and tools.
    tuned = [choice["pipeline"] for choice in selection.values()]
    shared = sum(before == after for before, after in zip(tuned, tuned[1:]))
    assert shared >= 1 and assert_cacheable_prefixes(bodies) == shared, tuned


def test_select_runs_are_nested_mlflow_runs_logged_once_across_a_crash(tmp_path, baby_format_dir, monkeypatch, shared_cache):
    from rectune.models.pipeline import PIPELINES
    from rectune.tools.runner import TrialRunner
    from rectune.tools.space import SearchSpace

    original, seen = TrialRunner.run, []

    def dies_on_the_third_run(self, spec, *args, **kwargs):
        seen.append(spec.pipeline)
        if len(seen) == 3:
            raise RuntimeError("killed during model selection")
        return original(self, spec, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", dies_on_the_third_run)
    with ScriptedLLM([]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=1), "cache_dir": shared_cache}
        options = {"echo": lambda line: None, "checkpoint": str(tmp_path / "sessions.db"),
                   "tracker": Tracker(config["tracking_uri"]), "report_dir": tmp_path / "r"}
        with pytest.raises(RuntimeError, match="killed during model selection"):
            run(config, None, **options)
        values = run(config, None, resume=True, **options)

    assert values["phase"] == "done"
    runs = children(MlflowClient(config["tracking_uri"]), values["mlflow_run_id"], phase="select")
    # The two runs logged before the crash were found again, not logged twice.
    assert sorted(r.data.tags["pipeline"] for r in runs) == sorted(PIPELINES)
    space = SearchSpace.load()
    for selected in runs:
        pipeline = selected.data.tags["pipeline"]
        assert (selected.info.run_name, selected.data.tags["tuner"], selected.data.tags["group"]) == (f"select-all-{pipeline}", "default", "all")
        assert {name: selected.data.params[name] for name in space.defaults(pipeline)} == {
            name: str(value) for name, value in space.defaults(pipeline).items()}
        assert selected.data.metrics["objective"] == pytest.approx(values["table"]["all"][pipeline]["objective"], abs=1e-5)


def test_approval_asks_again_after_a_bad_edit_or_an_unknown_answer(tmp_path, baby_format_dir, shared_cache):
    answers = iter([{"action": "edit", "changes": {"neighbors": 5000}}, {"action": "maybe"}, {"action": "edit", "changes": {}},
                    {"action": "edit", "changes": {"neighbors": 50}}, {"action": "edit", "changes": {"neighbors": 30}}])
    shown = []

    def answer(payload):
        shown.append(payload)
        return next(answers)

    with ScriptedLLM([call("propose_change", changes={"neighbors": 20}, rationale="denser")]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="ask", groups="all", budget=2), "cache_dir": shared_cache}
        run(config, answer, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")

    errors = [payload["error"] for payload in shown]
    assert errors[0] == "" and "the edit was refused" in errors[1] and "neighbors=5000 is out of range [10, 500]" in errors[1]
    assert errors[2] == "answer with approve, edit or reject, not {'action': 'maybe'}"
    assert errors[3] == "an edit needs at least one NAME=VALUE"
    assert errors[4] == "the edited configuration was already tried as trial 0"  # a person cannot repeat a trial either
    assert all(payload["changes"] == {"neighbors": 20} for payload in shown)  # the same proposal, asked again
    assert len(llm.requests) == 1  # asking the person again costs no LLM call
    assert [t.params["neighbors"] for t in complete(config["storage"], "s1-all")] == [50, 30]


def test_the_terminal_reads_approve_edit_and_reject(monkeypatch, capsys):
    from rectune.agent.cli import ask_terminal

    payload = {"group": "all", "pipeline": "heuristic", "trial": "2/3", "best": {"trial": 0, "objective": 0.1},
               "diff": {"neighbors": [50, 20]}, "rationale": "denser", "error": ""}

    def typed(*lines):
        replies = iter(lines)

        def read(prompt=""):
            try:
                return next(replies)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", read)

    typed("e neighbors=30 k=100")
    assert ask_terminal(payload) == {"action": "edit", "changes": {"neighbors": 30, "k": 100}}
    typed("r  keep k small ")
    assert ask_terminal(payload) == {"action": "reject", "comment": "keep k small"}
    typed("e neighbors", "maybe", "a")
    assert ask_terminal(payload) == {"action": "approve"}
    out = capsys.readouterr().out
    assert "neighbors: 50 → 20" in out and "expected KEY=VALUE, but got 'neighbors'" in out
    assert "answer a, e NAME=VALUE ..., or r COMMENT" in out
    typed()
    assert ask_terminal(payload) is None  # end of input: the session waits at this approval


def cli(tmp_path, data_dir, base_url, *args, postgres: str | None = None):
    """A `rectune` command line; with `postgres`, the ledger and the checkpoints live on that database."""
    import sys

    checkpoint = postgres or str(tmp_path / "sessions.db")
    storage = postgres or f"sqlite:///{tmp_path / 'optuna.db'}"
    return [sys.executable, "-m", "rectune.agent.cli", *args, "--checkpoint", checkpoint] + ([] if args[0] != "tune" else [
        "--dataset", "baby", "--groups", "all", "--objective", TWO_TOWER_TIES, "--budget", "3", "--llm-base-url", base_url,
        "--llm-model", "scripted",
        "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")])


TWO_TOWER_TIES = "precision@1"
"""An objective under which two_tower is within noise of the best on all users of the fixture, so
the pick may choose it: its trials train long enough to be seen running."""


def two_tower_llm() -> ScriptedLLM:
    return ScriptedLLM([call("propose_change", changes={"embedding_dim": 32, "epochs": 4}, rationale="smaller"),
                        call("propose_change", changes={"embedding_dim": 48, "epochs": 4}, rationale="in between")],
                       picks=[call("choose_pipelines", all={"because": "fewest stages", "pipeline": "two_tower"})])


def start(command, tmp_path, **options):
    import os
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECTUNE_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.Popen(command, cwd=tmp_path, env=env, text=True, start_new_session=True, **options)


def kill(process) -> None:
    import os
    import signal

    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def assert_exactly_the_budget(storage: str, study: str, budget: int) -> list:
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == budget
    ids = [t.user_attrs["proposal_id"] for t in done]
    assert len(set(ids)) == len(ids), f"a proposal ran twice: {ids}"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_sigkill_during_a_trial_then_resume(tmp_path, baby_format_dir, backend, request):
    import subprocess
    import time

    postgres = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    storage = postgres or f"sqlite:///{tmp_path / 'optuna.db'}"
    with two_tower_llm() as llm:
        with open(tmp_path / "tune.log", "w") as log:  # the child keeps its own copy of the descriptor
            process = start(cli(tmp_path, baby_format_dir, llm.base_url, "tune", "--approve", "auto", "--session", "k1", postgres=postgres),
                            tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        # One storage for every poll: each poll is then a query, not a new connection pool (a
        # trial on the fixture lasts about a second; PostgreSQL refuses its 101st connection).
        polled, study, running = optuna.storages.RDBStorage(storage), None, []
        while time.monotonic() < deadline and process.poll() is None:
            try:
                study = study or optuna.load_study(study_name="k1-all", storage=polled)
                running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                           if t.user_attrs.get("tuner") == "llm"]
            except Exception:  # the study is not created yet, or SQLite is busy with the session's write
                running = []
            if running:
                break
            time.sleep(0.02)
        assert running, f"no LLM trial was seen running (the session exited with {process.poll()}): {(tmp_path / 'tune.log').read_text()[-3000:]}"
        kill(process)
        listed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "sessions", postgres=postgres), cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert "k1" in listed.stdout, listed.stdout + listed.stderr
        resumed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "resume", "k1", postgres=postgres), cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "report:" in resumed.stdout
    from rectune.tools.study import Study

    assert Study.open(storage, "k1-all").context.pipeline == "two_tower"  # the pick, made before the kill, held
    trials = assert_exactly_the_budget(storage, "k1-all", 3)
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and any(t.user_attrs.get("retry_of") == killed[0].number for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    traces = client.search_traces(locations=[client.get_experiment_by_name("baby").experiment_id])
    # mlflow.langchain.autolog traces each graph run, its LLM calls as CHAT_MODEL spans; the
    # resumed run made the last proposal call.
    assert any(span.span_type == "CHAT_MODEL" for trace in traces for span in trace.data.spans)
    # MLflow holds each finished trial of the ledger once, the killed one not at all.
    experiment = client.get_experiment_by_name("baby").experiment_id
    logged = [int(r.data.tags["trial_number"]) for r in client.search_runs([experiment], "tags.optuna_study = 'k1-all'")
              if "trial_number" in r.data.tags]
    assert sorted(logged) == sorted(t.number for t in trials if t.state == TrialState.COMPLETE)


def test_sigkill_at_an_approval_then_resume(tmp_path, baby_format_dir):
    import subprocess
    import threading
    import time

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    lines: list[str] = []
    with two_tower_llm() as llm:
        process = start(cli(tmp_path, baby_format_dir, llm.base_url, "tune", "--approve", "ask", "--session", "k2"), tmp_path,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(line.startswith("[approve]") for line in lines):
            time.sleep(0.05)
        assert any(line.startswith("[approve]") for line in lines), lines
        kill(process)
        before = len(llm.requests)
        listed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "sessions"), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert "waiting for approval" in listed.stdout
        resumed = subprocess.run(cli(tmp_path, baby_format_dir, llm.base_url, "resume", "k2"), cwd=tmp_path, input="a\na\n",
                                 capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("[approve]") == 2  # the waiting approval is asked again, then the next one
    # Neither the pick nor the waiting proposal is asked for again; one more proposal fills the budget.
    assert len(picks(llm)) == 1 and len(llm.requests) == before + 1
    assert_exactly_the_budget(storage, "k2-all", 3)


def test_an_llm_outage_stops_cleanly_and_resumes(tmp_path, baby_format_dir, monkeypatch):
    import rectune.agent.llm
    from rectune.agent.llm import LLMUnavailable
    from scripted_llm import status

    original = rectune.agent.llm.resolve_llm
    monkeypatch.setattr("rectune.agent.session.resolve_llm", lambda *a, **k: original(*a, **k, max_retries=1, timeout_s=10))
    script = [status(503), status(503),  # the first try and its one retry
              call("propose_change", changes={"neighbors": 20}, rationale="denser")]
    with ScriptedLLM(script) as llm:
        config = settings(tmp_path, baby_format_dir, llm.base_url, approve="auto", groups="all", budget=2)
        checkpoint = str(tmp_path / "sessions.db")
        with pytest.raises(LLMUnavailable, match="InternalServerError|APIStatusError|503"):
            run(config, None, echo=lambda line: None, checkpoint=checkpoint, report_dir=tmp_path / "r")
        values = run(config, None, echo=lambda line: None, checkpoint=checkpoint, resume=True, report_dir=tmp_path / "r")
    assert values["phase"] == "done"
    # An outage is not a reply that cannot be used: no candidate ran in its place, the resumed call's change did.
    assert_exactly_the_budget(config["storage"], "s1-all", 2)
    assert len(llm.requests) == 3 and complete(config["storage"], "s1-all")[1].params["neighbors"] == 20


def comparison(tmp_path, data_dir, base_url, seeds, tuners, groups="activity:2", may_finish=False, objective="ndcg@20"):
    from rectune.agent.compare import Comparison
    from rectune.agent.context import Settings

    base = Settings("cmp", "baby", groups, objective, budget=3, approve="auto", may_finish=may_finish, storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"),
                    llm_base_url=base_url, llm_model="scripted")
    return Comparison(base, seeds, tuners, checkpoint=str(tmp_path / "sessions.db"))


TUNERS = ("llm", "menu", "tpe", "random", "local")


def test_compare_any_list_of_tuners_fairly_from_the_ledger(tmp_path, baby_format_dir):
    from rectune.agent.compare import compare

    tune = [call("propose_change", changes={"neighbors": 20}, rationale="denser"),
            call("propose_change", changes={"popularity_weight": 1.0}, rationale="more popular items")]
    # In seed 1 the agent gives up on cold after one change: its curve must still be reported.
    early = [tune[0], call("finish", reason="good enough")]
    with ScriptedLLM([*tune, *tune, *early, *tune]) as llm:
        spec = comparison(tmp_path, baby_format_dir, llm.base_url, (0, 1), TUNERS, may_finish=True)
        path = compare(spec, echo=lambda line: None, report_dir=tmp_path / "reports", tracker=Tracker(spec.settings.tracking_uri))
        asked, lines = len(llm.requests), []
        again = compare(spec, echo=lines.append, report_dir=tmp_path / "reports")
        # Each tuning call decided one trial or a finish; a seed whose pipelines tie asked for its pick once.
        assert len(tuning(llm)) == 8 and len(picks(llm)) <= len(spec.seeds)
        assert len(llm.requests) == asked  # the second call found every study done: no new LLM call
        assert not [line for line in lines if line.startswith("LLM:")]  # nor an LLM client (the embedded one starts a server)
    text = path.read_text()
    assert again == path
    for tuner in TUNERS:
        assert f"| cold | {tuner} |" in text and f"| heavy | {tuner} |" in text
    assert "| tpe | cold |" in text and "| local | all groups |" in text
    assert "the agent could stop a group before its budget" in text
    assert " | 3, 2 | " in next(line for line in text.splitlines() if line.startswith("| cold | llm |"))
    assert "permutation test of the between-group variance" in text
    distinguishable = [line for line in text.splitlines() if line.startswith(("- activity:2: ", "- prefix (user-id letters): "))]
    assert len(distinguishable) == 2 and all(" p = " in line for line in distinguishable)
    assert (tmp_path / "reports" / "cmp-cold.png").stat().st_size > 1000
    for group in ("cold", "heavy"):
        for seed in (0, 1):
            first = None
            for tuner in TUNERS:
                trials = complete(spec.settings.storage, f"cmp-{tuner}-{group}-seed{seed}")
                assert len(trials) == (2 if (tuner, group, seed) == ("llm", "cold", 1) else 3)
                assert trials[0].user_attrs["tuner"] == "default" and {t.user_attrs["tuner"] for t in trials[1:]} == {tuner}
                # Every tuner starts from the same first trial, on the pipeline the agent picked for the seed.
                first = first or trials[0].value
                assert trials[0].value == first
    local = complete(spec.settings.storage, "cmp-local-cold-seed0")
    assert all(t.user_attrs["rationale"].startswith("neighbour of trial") for t in local[1:])
    # The agent's menu without the LLM: its first candidate, every time.
    menu = complete(spec.settings.storage, "cmp-menu-cold-seed0")
    assert all(t.user_attrs["rationale"].startswith("first of ") for t in menu[1:])


def test_compare_tunes_a_fixed_pipeline_without_model_selection(tmp_path, baby_format_dir, monkeypatch):
    from dataclasses import replace

    from rectune.agent.compare import compare
    from rectune.tools.adoption import best_record
    from rectune.tools.runner import TrialRunner
    from rectune.tools.study import Study

    original, pipelines = TrialRunner.run, []

    def recording(self, spec, *args, **kwargs):
        pipelines.append(spec.pipeline)
        return original(self, spec, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", recording)
    with ScriptedLLM([]) as llm:
        spec = replace(comparison(tmp_path, baby_format_dir, llm.base_url, (0,), ("menu", "tpe", "tpe-warm")), pipeline="two_tower")
        path = compare(spec, echo=lambda line: None, report_dir=tmp_path / "reports")
    assert not llm.requests  # no pick to ask for
    assert set(pipelines) == {"two_tower"}  # no other pipeline was evaluated, not even for a selection table
    for tuner in ("menu", "tpe", "tpe-warm"):
        for group in ("cold", "heavy"):
            study = Study.open(spec.settings.storage, f"cmp-{tuner}-{group}-seed0")
            assert study.context.pipeline == "two_tower" and study.spent() == 3
    # tpe-warm starts the second group from its best of the first, unless that was the default (tried there as trial 0).
    cold, heavy = (Study.open(spec.settings.storage, f"cmp-tpe-warm-{group}-seed0").history() for group in ("cold", "heavy"))
    best = best_record(cold)
    warm_started = heavy[1].rationale == "warm start: the best of group cold"
    assert warm_started == (best.number != 0) and warm_started == (heavy[1].params == best.params)
    text = path.read_text()
    assert "pipeline two_tower on every group (fixed by --pipeline: no model selection)" in text
    assert "Model selection (RQ1)" not in text
    # One seed gives no interval over the seeds: the report says so rather than printing NaN.
    assert "| tpe | all groups | " in text and "one seed: none" in text and "+nan" not in text


def test_compare_counts_over_the_seeds_how_the_picks_agree_with_each_argmax():
    from types import SimpleNamespace

    from rectune.agent.compare import _selection

    def choice(pipeline, argmax, f1_argmax, in_band=True):
        return {"pipeline": pipeline, "argmax": argmax, "f1_argmax": f1_argmax, "in_band": in_band, "chosen_by": "llm"}

    table = {"all": {"heuristic": {"objective": 0.05}, "two_tower": {"objective": 0.049}}}
    selections = [{"all": choice("heuristic", "heuristic", "two_tower")},
                  {"all": choice("two_tower", "heuristic", "two_tower")},
                  {"all": choice("heuristic", "heuristic", "two_tower")},
                  {"all": choice("two_tower", "heuristic", "heuristic", in_band=False)}]
    lines = _selection(SimpleNamespace(seeds=(0, 1, 2, 3)), (table, selections), None, ["all"])
    header = next(line for line in lines if line.startswith("| group |"))
    row = next(line for line in lines if line.startswith("| all |"))
    cells = dict(zip(header.split(" | ")[-3:], row.split(" | ")[-3:]))
    assert cells == {"pick within the argmax's noise band": "3/4", "pick = argmax": "2/4", "pick = F1@TopN argmax |": "1/4 |"}
    assert "heuristic ×2, two_tower ×2 (LLM 4)" in row


def test_compare_refuses_an_unknown_pipeline_before_writing_anything(tmp_path):
    from typer.testing import CliRunner

    from rectune.agent.cli import app

    result = CliRunner().invoke(app, ["compare", "--pipeline", "two_towers", "--tuners", "tpe", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--checkpoint", str(tmp_path / "s.db")])
    assert result.exit_code == 2
    assert "--pipeline must be one of ['heuristic', 'heuristic+deepfm', 'two_tower', 'two_tower+deepfm'], but got 'two_towers'" \
        in result.output
    assert not (tmp_path / "o.db").exists()


class Killed(Exception):
    """Stands in for a kill in the middle of a trial."""


def test_an_interrupted_comparison_continues_where_it_stopped(tmp_path, baby_format_dir, monkeypatch):
    from rectune.agent.compare import compare
    from rectune.tools.runner import TrialRunner

    original, runs = TrialRunner.run, []

    def dies_in_the_second_tpe_trial(self, spec, *args, **kwargs):
        runs.append(spec)
        # Model selection runs every pipeline's default (4 runs), then tpe's trials 0 and 1.
        if len(runs) == 6:
            raise Killed
        return original(self, spec, *args, **kwargs)

    # Pipelines tie on all users under this objective: the pick asks (pick_first answers: the best).
    with ScriptedLLM([]) as llm:
        spec = comparison(tmp_path, baby_format_dir, llm.base_url, (0,), ("tpe", "local"), groups="all", objective=TWO_TOWER_TIES)
        with monkeypatch.context() as patch:
            patch.setattr(TrialRunner, "run", dies_in_the_second_tpe_trial)
            with pytest.raises(Killed):
                compare(spec, echo=lambda line: None, report_dir=tmp_path / "reports")
        assert len(complete(spec.settings.storage, "cmp-tpe-all-seed0")) == 1
        path = compare(spec, echo=lambda line: None, report_dir=tmp_path / "reports")
    assert len(picks(llm)) == len(llm.requests) == 1  # the pick was checkpointed: not asked again
    for tuner in ("tpe", "local"):
        trials = assert_exactly_the_budget(spec.settings.storage, f"cmp-{tuner}-all-seed0", 3)
        params = [str(sorted(t.user_attrs["params"].items())) for t in trials if t.state == TrialState.COMPLETE]
        assert len(set(params)) == 3
    killed = [t for t in optuna.load_study(study_name="cmp-tpe-all-seed0", storage=spec.settings.storage).get_trials()
              if t.state == TrialState.FAIL]
    assert len(killed) == 1  # the interrupted trial, queued again and run by the continued comparison
    assert "| all | tpe |" in path.read_text() and "| all | local |" in path.read_text()


def test_trials_to_reach_and_the_curve_read_from_the_ledger():
    from rectune.agent.compare import curve_of, trials_to_reach
    from rectune.tools.trial import TrialRecord, TrialResult, TrialSpec

    assert trials_to_reach([0.1, 0.1, 0.104, 0.106], 0.05) == 3
    assert trials_to_reach([0.1, 0.104], 0.05) is None
    assert trials_to_reach([0.1, 0.2], 0.0) == 0  # the default itself meets a zero margin

    def record(number, state, objective=None):
        result = None if objective is None else TrialResult(TrialSpec("baby", "all", "all", "heuristic"), objective, {}, 1.0, 0.0, 0.0, "none")
        return TrialRecord(number, "tpe", state, {"k": number}, result=result)

    history = [record(0, "complete", 0.1), record(1, "rejected"), record(2, "failed"), record(3, "complete", 0.09),
               record(4, "complete", 0.12)]
    # A rejected proposal is not a trial; a failed one is, and keeps the best where it was.
    assert curve_of(history) == [0.1, 0.1, 0.1, 0.12]


def test_group_difference_test_sees_real_and_random_partitions():
    import numpy as np

    from rectune.agent.compare import group_difference_test

    rng = np.random.default_rng(0)
    values = rng.normal(size=2000)
    random_codes = rng.integers(0, 4, size=2000)
    assert group_difference_test(values, random_codes)[1] > 0.05
    shifted = values + (random_codes == 0) * 0.5
    assert group_difference_test(shifted, random_codes)[1] < 0.01


def test_paired_statistics_respect_seeds_and_small_samples():
    import numpy as np

    from rectune.agent.compare import bootstrap_interval, sign_flip_p

    # Five seeds all in favour: the smallest p an exact sign-flip test on 5 pairs can give.
    assert sign_flip_p(np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == pytest.approx(2 / 32)
    assert sign_flip_p(np.array([0.1, -0.1, 0.2, -0.2])) == pytest.approx(1.0)
    # 4 groups × 5 seeds where each seed moves all its groups together: 5 clusters, not 20 pairs.
    seeds = np.repeat(np.arange(5), 4)
    differences = np.repeat([0.3, 0.2, 0.1, 0.2, -0.05], 4) + np.tile([0.0, 0.001, -0.001, 0.0], 5)
    assert sign_flip_p(differences, seeds) == pytest.approx(sign_flip_p(np.array([0.3, 0.2, 0.1, 0.2, -0.05])))
    assert sign_flip_p(differences, seeds) > 0.06
    assert sign_flip_p(differences) < 0.01  # treating the 20 pairs as independent overstates the evidence
    clustered, naive = bootstrap_interval(differences, clusters=seeds), bootstrap_interval(differences)
    assert clustered[1] - clustered[0] > 1.5 * (naive[1] - naive[0])
    assert clustered[0] < differences.mean() < clustered[1]


def test_prompts_readme_lists_every_prompt_file():
    folder = Path(__file__).resolve().parents[1] / "prompts"
    readme = (folder / "README.md").read_text()
    unlisted = [path.name for path in folder.glob("*.md") if path.name != "README.md" and f"`{path.name}`" not in readme]
    assert not unlisted


def test_wall_time_budget_stops_tuning(tmp_path, baby_format_dir):
    with ScriptedLLM([]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto"), "max_minutes": 1e-6}
        values = run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"), report_dir=tmp_path / "r")
    assert values["finished"] == {"cold": "wall-time budget", "heavy": "wall-time budget"}
    assert llm.requests == []  # no pick (nothing ties here), and no tuning turn after the budget ran out
    assert values["phase"] == "done" and all(len(h) == 1 for h in values["history"].values())
    from rectune.models.errors import ConfigError

    with pytest.raises(ConfigError, match="session 's1' already exists"):
        run(config, None, echo=lambda line: None, checkpoint=str(tmp_path / "sessions.db"))


@pytest.mark.parametrize("bad, message", [({"objective": "ndcg@0"}, "at least 1"),
                                          ({"max_latency_ms": 0.0}, "--max-latency-ms must be above 0")])
def test_bad_settings_are_refused_before_the_llm_is_called_or_a_checkpoint_written(tmp_path, baby_format_dir, bad, message):
    from rectune.models.errors import ConfigError

    lines = []
    checkpoint = str(tmp_path / "sessions.db")
    with ScriptedLLM([]) as llm:
        config = {**settings(tmp_path, baby_format_dir, llm.base_url, approve="auto"), **bad}
        with pytest.raises(ConfigError, match=message):
            run(config, None, echo=lines.append, checkpoint=checkpoint, report_dir=tmp_path / "r")
    assert llm.requests == [] and not any(line.startswith("LLM:") for line in lines)
    # Checkpointed, they would stop every `rectune resume` of the session the same way.
    assert list_sessions(checkpoint) == []


def test_the_best_trial_is_the_best_that_met_the_latency_budget():
    from rectune.tools.adoption import best_record
    from rectune.tools.trial import TrialRecord, TrialResult, TrialSpec

    def record(number: int, objective: float, feasible: bool, state: str = "complete") -> TrialRecord:
        result = TrialResult(TrialSpec("baby", "all", "all", "heuristic"), objective, {}, 1.0, 0.0, 0.0, "none", feasible)
        return TrialRecord(number, "llm", state, {"k": number}, result=None if state != "complete" else result)

    fast, slow, faster = record(0, 0.03, True), record(1, 0.05, False), record(2, 0.04, True)
    rejected = record(3, 0.0, True, state="rejected")
    assert best_record([fast, slow]) is fast
    assert best_record([fast, slow, faster, rejected]) is faster
    assert best_record([slow, rejected]) is slow  # none met it: still the best there is
    assert best_record([rejected]) is None


def test_checkpoints_from_before_the_study_loop_are_refused_by_name_unless_finished():
    from rectune.agent.state import checked
    from rectune.models.errors import ConfigError

    old_row = {"trial": 0, "tuner": "default", "params": {"k": 500}, "objective": 0.1, "recall@20": 0.2, "latency_ms": 1.0}
    new_row = {"number": 0, "tuner": "default", "state": "complete", "params": {"k": 500}}
    with pytest.raises(ConfigError, match="session 'old' was saved by a rectune from before the study loop.*'old-<group>'"):
        checked({"phase": "tune", "history": {"all": [old_row]}}, "old")
    finished = {"phase": "done", "history": {"all": [old_row]}}
    assert checked(finished, "old") is finished  # listed by `rectune sessions`, never run again
    for values in ({}, {"phase": "select"}, {"phase": "tune", "history": {"all": [new_row]}}):
        assert checked(values, "new") is values


def test_compare_refuses_a_tuner_that_is_not_registered(tmp_path):
    from typer.testing import CliRunner

    from rectune.agent.cli import app

    result = CliRunner().invoke(app, ["compare", "--tuners", "llm,tpe,annealing", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--checkpoint", str(tmp_path / "s.db")])
    assert result.exit_code == 2
    assert "--tuners must name registered tuners ['default', 'llm', 'local', 'menu', 'random', 'tpe', 'tpe-warm'], but got ['llm', 'tpe', 'annealing']" \
        in result.output
    assert not (tmp_path / "o.db").exists()  # refused before anything was written
