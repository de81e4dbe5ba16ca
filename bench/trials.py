"""Benchmark of the trial machinery on Amazon Baby, one user group.

1. What a trial costs: a full trial (fit recall + ranker, evaluate), a K-only change
   (cached models, new candidates and DeepFM ranking) and a TopN-only change (cached
   ranking), each beside its floor — the FLOPs of scoring the candidates at the
   machine's measured matrix-multiply rate.
2. The tuners that need no LLM (`--tuners`, default TPE, random, local search and the menu), `--budget`
   trials × `--seeds` seeds, each starting from the default configuration (trial 0), each
   through the one study loop: best-so-far validation objective per trial.

Prints a table, writes bench/results/trials_<dataset>.json and a PNG plot.

    python bench/trials.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from core import deepfm_flops_per_pair, matmul_gflops  # noqa: E402

from rectune.tools.baseline import run_baseline  # noqa: E402
from rectune.tools.cache import ModelCache  # noqa: E402
from rectune.tools.plots import best_so_far  # noqa: E402
from rectune.tools.runner import TrialRunner  # noqa: E402
from rectune.tools.study import StudyContext  # noqa: E402
from rectune.tools.trial import TrialSpec  # noqa: E402


def timed(runner: TrialRunner, spec: TrialSpec) -> tuple[float, object]:
    start = time.perf_counter()
    result = runner.run(spec)
    return time.perf_counter() - start, result


def scoring_floor_seconds(runner: TrialRunner, config, n_users: int, k: int, gflops: float) -> float:
    """Scoring every item for the recall stage plus k candidates through DeepFM, per user."""
    recall = n_users * runner.dataset.n_items * 2 * config.embedding_dim
    ranker = 0.0
    if config.ranker != "none":
        n_fields = 3 + 2 + (runner.dataset.item_categories is not None) + (runner.dataset.item_features is not None) + 2
        ranker = n_users * k * deepfm_flops_per_pair(config, n_fields)[1]
    return (recall + ranker) / gflops / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="baby")
    parser.add_argument("--groups", default="prefix")
    parser.add_argument("--group", default="A1")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--timing-pipeline", default="two_tower+deepfm")
    parser.add_argument("--tuning-pipeline", default="heuristic")
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--objective", default="ndcg@20")
    parser.add_argument("--tuners", default="tpe,random,local,menu", help="Registered tuners, comma-separated.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rectune-bench-"))
    runner = TrialRunner.open(args.dataset, args.groups, data_dir=args.data_dir, cache_dir=work)
    runner.cache = ModelCache(work / "models")  # empty: the first trial really trains
    gflops = matmul_gflops()
    n_users = len(runner.users(args.group))
    print(f"{args.dataset} group {args.group}: {n_users} users; matmul {gflops:.0f} GFLOP/s")

    def spec(params: dict) -> TrialSpec:
        return TrialSpec(args.dataset, args.groups, args.group, args.timing_pipeline, params, 0, args.objective)

    timings = {}
    for label, params in (("full trial (fit recall + ranker)", {}), ("K=1000 (cached models)", {"k": 1000}),
                          ("TopN=50 (cached ranking)", {"k": 1000, "top_n": 50})):
        seconds, result = timed(runner, spec(params))
        config = runner.space.to_config(args.timing_pipeline, runner.space.validate(args.timing_pipeline, params))
        floor = scoring_floor_seconds(runner, config, n_users, config.k, gflops) if result.cache != "ranking" else 0.0
        timings[label] = {"seconds": round(seconds, 3), "cache": result.cache, "train_seconds": round(result.train_seconds, 3),
                          "eval_seconds": round(result.eval_seconds, 3), "floor_seconds": round(floor, 4),
                          "objective": result.objective, "latency_ms_per_user": round(result.latency_ms_per_user, 4)}
        print(f"  {label:<34} {seconds:7.2f}s  (cache {result.cache}; scoring floor {floor:.3f}s)")

    tuners = args.tuners.split(",")
    curves: dict[str, list[list[float]]] = {tuner: [] for tuner in tuners}
    wall: dict[str, list[float]] = {tuner: [] for tuner in tuners}
    for seed in range(args.seeds):
        for tuner in tuners:
            context = StudyContext(args.dataset, args.groups, args.group, args.tuning_pipeline, args.objective, seed, args.budget, tuner)
            start = time.perf_counter()
            study = run_baseline(context, runner, f"sqlite:///{work / 'optuna.db'}", f"{tuner}-{seed}", progress=False)
            wall[tuner].append(time.perf_counter() - start)
            values = [r.objective for r in study.history() if r.state == "complete"]
            curves[tuner].append(np.maximum.accumulate(values).tolist())
            print(f"  seed {seed} {tuner:<6} best {max(values):.4f} after {len(values)} trials ({wall[tuner][-1]:.0f}s)", flush=True)

    final = {s: [c[-1] for c in curves[s]] for s in curves}
    summary = {s: {"median_best": float(np.median(final[s])), "best_per_seed": final[s],
                   "median_wall_seconds": float(np.median(wall[s]))} for s in curves}
    report = {"dataset": args.dataset, "groups": args.groups, "group": args.group, "users": n_users,
              "matmul_gflops": round(gflops, 1), "timing_pipeline": args.timing_pipeline, "timings": timings,
              "tuning_pipeline": args.tuning_pipeline, "objective": args.objective, "budget": args.budget,
              "seeds": args.seeds, "best_so_far": curves, "summary": summary, "date": time.strftime("%Y-%m-%d")}
    out = Path(__file__).parent / "results" / f"trials_{args.dataset.replace('-', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    plot = best_so_far(curves, out.with_suffix(".png"), f"{args.dataset}, group {args.group}, pipeline {args.tuning_pipeline}",
                       f"best validation {args.objective} so far")

    print(f"\n{'tuner':<8} {'median best':>12} {'per seed':>30} {'median wall s':>14}")
    for tuner, row in summary.items():
        print(f"{tuner:<8} {row['median_best']:>12.4f} {', '.join(f'{v:.4f}' for v in row['best_per_seed']):>30} {row['median_wall_seconds']:>14.0f}")
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main()
