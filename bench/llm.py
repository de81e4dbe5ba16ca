"""Benchmark of the embedded LLM: where a tuning call's seconds go.

Starts the embedded server (agent/local_llm.py) as `rectune tune` does and measures, over
real HTTP with the agent's own client:

1. Rates: prompt evaluation (a ~1,000-token tuning prompt nothing is cached for, one
   token generated), generation with and without the tool-call grammar (the same prompt
   again, all of it cached, 48 tokens generated).
2. A tuning session as the main job runs one (`--budget 3`: two trials per group, four
   groups with the same pipeline), the LLM proposer choosing from the real menu (one call
   decides one trial, or two when the LLM names a second candidate); trial
   results are synthetic (the default's objective plus seeded noise), so no dataset is
   needed and only the LLM is timed. Per call: seconds, prompt tokens, tokens read from
   the prompt cache, completion tokens, and the seconds the two rates do not explain
   (client, HTTP, grammar set-up, sampling).

Prints a table and writes JSON to bench/results/llm.json.

    python bench/llm.py
"""

from __future__ import annotations

import rectune.models  # noqa: F401  (before numpy: it sets OpenMP's wait policy and threads)

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

GROUPS = ("cold", "light", "medium", "heavy")
PIPELINE = "heuristic"
DEFAULT_OBJECTIVE = 0.046
NOISE = 0.0008
"""Spread of the synthetic objectives around the default: Baby's heuristic trials differ by about this."""


def synthetic_result(spec, objective: float, rng: np.random.Generator, best=None):
    """A trial's result with per-user values averaging `objective`, and its difference to `best`
    (a TrialRecord) paired over the users, as the runner would give it."""
    from rectune.tools.noise import paired_interval, per_user_vector, vector
    from rectune.tools.trial import TrialResult

    users = np.where(rng.random(4000) < 0.1, rng.random(4000), 0.0)
    users *= objective / max(users.mean(), 1e-9)
    metrics = {spec.group: {"ndcg@20": objective, "recall@20": 2 * objective}}
    vs_best = None if best is None else {
        **paired_interval(users, vector(best.result.per_user)).to_json(), "trial": best.number}
    return TrialResult(spec, objective, metrics, 0.05, 0.0, 0.1, "none", per_user=per_user_vector(users), vs_best=vs_best)


def rates(client, messages, tools) -> dict:
    """Prompt-evaluation and generation rates of the server on one tuning prompt: the prompt
    with its tools evaluated from scratch (one token generated), then again, all of it cached,
    generating 48 tokens under the tool-call grammar; and the same without tools (free text)."""
    from rectune.agent.llm import bind_decision_tools

    # A prefix no earlier request had, so nothing of it is cached.
    fresh = [{"role": "system", "content": f"Session {time.time_ns()}.\n" + messages[0]["content"]}, *messages[1:]]
    out = {}
    for label, model in (("grammar", bind_decision_tools(client, tools)), ("free", client)):
        start = time.perf_counter()
        cold = model.bind(max_tokens=1).invoke(fresh)
        seconds = time.perf_counter() - start
        if label == "grammar":
            tokens = cold.usage_metadata["input_tokens"]
            out.update(prompt_tokens=tokens, prompt_seconds=seconds, prompt_tok_s=tokens / seconds)
        start = time.perf_counter()
        reply = model.bind(max_tokens=48).invoke(fresh)
        seconds = time.perf_counter() - start
        produced = reply.usage_metadata["output_tokens"]
        out[f"{label}_tokens"], out[f"{label}_seconds"], out[f"{label}_tok_s"] = produced, seconds, produced / seconds
    return out


def session(client, seed: int) -> list[dict]:
    """The main job's tuning calls on synthetic trial results, timed one by one."""
    from rectune.agent.proposer import LLMProposer
    from rectune.tools.adoption import best_record
    from rectune.tools.proposer import Proposal, ProposerContext
    from rectune.tools.space import SearchSpace
    from rectune.tools.study import StudyContext
    from rectune.tools.trial import TrialRecord, canonical

    space, rng, calls = SearchSpace.load(), np.random.default_rng(seed), []
    proposer = LLMProposer(llm=client, may_finish=False)
    for group in GROUPS:
        study = StudyContext("baby", "activity", group, PIPELINE, "ndcg@20", seed, 3, "llm")
        context = ProposerContext(study, space, 3)
        defaults = space.defaults(PIPELINE)
        history = [TrialRecord(0, "default", "complete", defaults,
                               result=synthetic_result(study.spec(defaults), DEFAULT_OBJECTIVE, rng))]
        while len(history) < 3:
            proposal = proposer.propose(history, context)
            assert isinstance(proposal, Proposal) and canonical(proposal.params) not in {canonical(r.params) for r in history}
            if proposer.last["calls"]:  # the second of a pair the LLM chose costs none
                calls.append({"group": group, "trial": len(history), "pair": "then" in proposal.meta, **{
                    k: proposer.last[k] for k in ("llm_seconds", "input_tokens", "cached_tokens", "output_tokens", "refused")}})
            objective = DEFAULT_OBJECTIVE + float(rng.normal(0, NOISE))
            result = synthetic_result(study.spec(proposal.params), objective, rng, best_record(history))
            history.append(TrialRecord(len(history), "llm", "complete", proposal.params, proposal.rationale, result=result,
                                       meta=proposal.meta))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="rectune's cache (the joined model lives there); default ~/.cache/rectune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm.json")
    args = parser.parse_args()

    from langchain_core.messages import convert_to_openai_messages

    from rectune.agent.llm import chat_model, resolve_llm
    from rectune.agent.llm_tools import LETTERS, Scope, tune_tools
    from rectune.agent.local_llm import EmbeddedServer, default_threads, ensure_model
    from rectune.agent.proposer import LLMProposer
    from rectune.tools.adoption import best_record
    from rectune.tools.proposer import ProposerContext
    from rectune.tools.proposers.menu import menu
    from rectune.tools.space import SearchSpace
    from rectune.tools.study import StudyContext
    from rectune.tools.trial import TrialRecord, tried

    load = os.getloadavg()[0]
    with EmbeddedServer(ensure_model(args.cache_dir)) as base_url:
        client = chat_model(resolve_llm("embedded"), base_url)
        space = SearchSpace.load()
        study = StudyContext("baby", "activity", "cold", PIPELINE, "ndcg@20", args.seed, 3, "llm")
        context = ProposerContext(study, space, 3)
        defaults = space.defaults(PIPELINE)
        history = [TrialRecord(0, "default", "complete", defaults,
                               result=synthetic_result(study.spec(defaults), DEFAULT_OBJECTIVE, np.random.default_rng(0)))]
        best, options = best_record(history), menu(history, context, 0)[:len(LETTERS)]
        tools = tune_tools(Scope(space, PIPELINE, "ndcg@20", best.params, tried(history), options, False))
        messages = convert_to_openai_messages(LLMProposer(llm=client, may_finish=False)._messages(history, context, best, options))
        measured = rates(client, messages, tools)
        calls = session(client, args.seed)

    prompt_rate, grammar_rate = measured["prompt_tok_s"], measured["grammar_tok_s"]
    for call in calls:
        explained = (call["input_tokens"] - call["cached_tokens"]) / prompt_rate + call["output_tokens"] / grammar_rate
        call["unexplained_seconds"] = call["llm_seconds"] - explained
    print(f"threads {default_threads()}, load {load:.1f} at start, {platform.processor() or platform.machine()}")
    print(f"prompt evaluation: {measured['prompt_tokens']} tokens in {measured['prompt_seconds']:.1f} s = {prompt_rate:.1f} tok/s")
    print(f"generation: {measured['free_tok_s']:.1f} tok/s free, {grammar_rate:.1f} tok/s with the tool-call grammar")
    print("\n| group | trial | decided two | seconds | prompt tokens | cached | completion | unexplained s |\n"
          "|---|---|---|---|---|---|---|---|")
    for c in calls:
        print(f"| {c['group']} | {c['trial']} | {'yes' if c['pair'] else 'no'} | {c['llm_seconds']:.1f} | {c['input_tokens']} | "
              f"{c['cached_tokens']} | {c['output_tokens']} | {c['unexplained_seconds']:.1f} |")
    total = sum(c["llm_seconds"] for c in calls)
    print(f"\n{len(calls)} calls for {2 * len(GROUPS)} trials, {total:.1f} s (median {np.median([c['llm_seconds'] for c in calls]):.1f} s a call), "
          f"{sum(c['refused'] for c in calls)} refused")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_at_start": load, "threads": default_threads(), "rates": measured, "calls": calls,
                                    "total_seconds": total}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
