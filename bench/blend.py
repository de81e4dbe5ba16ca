"""Benchmark of the two-tower's heuristic blend: where `heuristic_weight`'s default comes from.

Fits the default two-tower once in this (fresh) process — its fit seconds are the issue's
"fit of the best pipeline", EASE included — then serves it with each heuristic weight (the
trained towers do not depend on it) and prints validation and test (ours: train + val
history, train + val masked) Recall@20 / NDCG@20 per weight. Writes JSON to
bench/results/blend_<dataset>.json. Run it beside busy loops to time the fit under load.

    python bench/blend.py --dataset baby --data-dir ../shared/data --weights 0,0.1,0.15,0.2,0.3,0.5
"""

from __future__ import annotations

import rectune.models  # noqa: F401  (before numpy and torch: it sets OpenMP's wait policy and threads)

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rectune.models.base import FitContext
from rectune.models.features import attach_item_features
from rectune.models.loaders import load_dataset
from rectune.models.metrics import topn_metrics
from rectune.models.pipeline import PipelineConfig, build_recall


def measured(recall, dataset, split: str) -> dict[str, float]:
    history = dataset.train if split == "val" else (dataset.train + dataset.val).tocsr()
    truth = dataset.val if split == "val" else dataset.test
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    metrics = topn_metrics(recall.candidates(users, 20, history).items, truth[users], 20)
    return {"recall@20": round(float(np.nanmean(metrics["recall"])), 4), "ndcg@20": round(float(np.nanmean(metrics["ndcg"])), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="baby")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--weights", default="0,0.1,0.15,0.2,0.3,0.5")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:  # before the data loads and the towers train: a typo should cost nothing
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        parser.error(f"--weights: {args.weights!r} is not a comma-separated list of numbers")
    if any(w < 0 for w in weights):
        parser.error(f"--weights: {args.weights!r} has a negative weight; the blend adds the heuristic's scores at weight ≥ 0")

    dataset = attach_item_features(load_dataset(args.dataset, args.data_dir))
    config = PipelineConfig(recall="two_tower")
    load = os.getloadavg()
    started = time.perf_counter()
    recall = build_recall(config)
    recall.fit(dataset, FitContext(seed=config.seed))
    fit_seconds = time.perf_counter() - started
    print(f"{dataset.name}: default two-tower fit {fit_seconds:.1f} s (EASE included), load average {load[0]:.2f}; {recall.content_note}")
    rows = []
    for weight in weights:
        # The library's own fit at this weight: the towers come from its memory of trained towers (they
        # do not depend on the weight) and EASE from its cache, so this builds only the blend.
        blended = build_recall(replace(config, heuristic_weight=weight))
        blended.fit(dataset, FitContext(seed=config.seed))
        row = {"heuristic_weight": weight, "val": measured(blended, dataset, "val"), "test_ours": measured(blended, dataset, "test")}
        rows.append(row)
        print(f"  heuristic_weight {weight:<5g} val {row['val']['recall@20']:.4f} / {row['val']['ndcg@20']:.4f}   "
              f"test {row['test_ours']['recall@20']:.4f} / {row['test_ours']['ndcg@20']:.4f}", flush=True)
    best = max(rows, key=lambda r: r["val"]["ndcg@20"])
    print(f"best on validation NDCG@20: heuristic_weight {best['heuristic_weight']:g} (default {config.heuristic_weight:g})")
    out = Path(args.out or Path(__file__).parent / "results" / f"blend_{dataset.name.replace('-', '_')}.json")
    out.write_text(json.dumps({"dataset": dataset.name, "fit_seconds": round(fit_seconds, 1), "load_average_at_start": load,
                               "rows": rows, "date": time.strftime("%Y-%m-%d")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
