"""Benchmark of the DeepFM ranker's settings: where its defaults come from.

Fits the recall stage once, then one ranker per variant (each a set of PipelineConfig fields
over the defaults: `negatives`, `ranker_epochs`, `ranker_lr`, `ranker_batch_size`,
`ranker_dim`, ...), and prints validation Recall@20 / NDCG@20 / Recall@50 at each K beside
the recall alone, and each variant's last training and validation loss (a validation loss
that rises while the training loss falls is the ranker memorising its lists). At the
pipeline's default K, each variant's NDCG@20 is compared with the recall alone's and with the
first variant's, paired over the users with a 95% bootstrap interval. Fit seconds are the
ranker's with its held-out recall stage; every variant after the first reuses that stage's
EASE part from memory, so compare the later ones with each other. Tuning
happens on validation, so this is the split its defaults were chosen on. Writes JSON to
bench/results/ranker_<dataset>_<pipeline>.json.

    python bench/ranker.py --data-dir ../shared/data --pipeline heuristic+deepfm \\
        --variants '{}' '{"negatives": 8}' '{"negatives": 128}' '{"ranker_lr": 0.001, "ranker_epochs": 10}'

The pointwise loss and the user / item id fields the listwise ranker replaced (models/deepfm.py)
are not settings any more; their rows in that docstring came from commit ceafff7's code (d2c9d49 made the ranker listwise).
"""

from __future__ import annotations

import rectune.models  # noqa: F401  (before numpy and torch: it sets OpenMP's wait policy and threads)

import argparse
import json
import os
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from rectune.models.errors import ConfigError
from rectune.models.features import attach_item_features
from rectune.models.loaders import load_dataset
from rectune.models.pipeline import PIPELINES, Pipeline, PipelineConfig, fit_ranker, score_lists
from rectune.tools.noise import paired_interval

SWEEP_K = (100, 500, 1000, 2000)
METRICS = ("recall@20", "ndcg@20", "recall@50")


def validation_metrics(pipeline: Pipeline, dataset, users: np.ndarray, k: int | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Validation metrics of `users`, and their per-user NDCG@20 (for paired comparisons)."""
    served = pipeline.recommend(dataset, users, "val", length=50, **({} if k is None else {"k": k}))
    scored = score_lists(dataset, "val", served, (20, 50))
    return {name: round(float(scored.overall[name]), 4) for name in METRICS}, scored.per_user["ndcg@20"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="baby")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--pipeline", default="heuristic+deepfm", choices=[p for p in PIPELINES if PIPELINES[p][1] != "none"])
    parser.add_argument("--variants", nargs="+", default=['{}', '{"negatives": 8}', '{"negatives": 128}',
                                                          '{"ranker_lr": 0.001}', '{"ranker_lr": 0.001, "ranker_epochs": 10}'],
                        help="JSON objects of PipelineConfig fields over the defaults, one ranker each ({} = the defaults)")
    parser.add_argument("--k", default=",".join(map(str, SWEEP_K)), help="recall sizes K to serve each ranker with")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    stages = {f.name: f.metadata["stage"] for f in fields(PipelineConfig)}
    variants = []
    for text in args.variants:
        try:
            variant = json.loads(text)
        except json.JSONDecodeError as error:
            parser.error(f"--variants: {text!r} is not JSON ({error.msg})")
        if not isinstance(variant, dict):
            parser.error(f"--variants: {text!r} is not a JSON object")
        # Every variant is served on the one recall stage fitted below, so only ranker settings may vary.
        recall_fields = [name for name in variant if stages.get(name) == "recall"]
        if recall_fields:
            parser.error(f"--variants: {text!r} sets recall parameters {recall_fields}; vary only ranker settings here")
        try:  # before any data is loaded or model fitted: a bad value should cost nothing
            PipelineConfig.from_dict({"pipeline": args.pipeline, **variant})
        except ConfigError as error:
            parser.error(f"--variants: {text!r}: {error}")
        variants.append(variant)
    ks = [int(k) for k in args.k.split(",")]

    dataset = attach_item_features(load_dataset(args.dataset, args.data_dir))
    users = np.flatnonzero(np.diff(dataset.val.indptr) > 0)
    load = os.getloadavg()[0]
    recall_config = PipelineConfig.from_dict({"pipeline": PIPELINES[args.pipeline][0]})
    started = time.perf_counter()
    recall = Pipeline(recall_config).fit(dataset)
    recall_seconds = time.perf_counter() - started
    alone, alone_ndcg = validation_metrics(recall, dataset, users)
    print(f"{dataset.name} validation, {len(users)} users, load average {load:.2f}; recall {recall_config.recall} fitted in "
          f"{recall_seconds:.1f} s, alone: " + " ".join(f"{name} {value:.4f}" for name, value in alone.items()), flush=True)
    import lightning.pytorch  # noqa: F401  (imported here, ~20 s, so the first variant's fit time is comparable)

    rows, first_ndcg = [], None
    for variant in variants:
        config = PipelineConfig.from_dict({"pipeline": args.pipeline, **variant})
        started = time.perf_counter()
        ranker = fit_ranker(config, dataset)
        seconds = time.perf_counter() - started
        ranked = Pipeline(config, recall=recall.recall, ranker=ranker)
        measured = {k: validation_metrics(ranked, dataset, users, k) for k in sorted({*ks, config.k})}
        at_k, ndcg = {k: measured[k][0] for k in ks}, measured[config.k][1]
        first_ndcg = ndcg if first_ndcg is None else first_ndcg
        versus = {"recall_alone": paired_interval(ndcg, alone_ndcg), "first_variant": paired_interval(ndcg, first_ndcg)}
        rows.append({"variant": variant, "fit_seconds": round(seconds, 1), "curve": ranker.curve, "at_k": at_k,
                     "ndcg@20_vs": {name: interval.to_json() for name, interval in versus.items()}})
        last = ranker.curve[-1] if ranker.curve else {}
        print(f"{json.dumps(variant):<48} fit {seconds:5.1f} s  loss train {last.get('train_loss')} val {last.get('val_loss')}"
              f"  NDCG@20 at K={config.k} − recall alone {versus['recall_alone'].text()}, − first {versus['first_variant'].text()}",
              flush=True)
        for k, metrics in at_k.items():
            print(f"    K={k:<5} " + " ".join(f"{name} {value:.4f} ({value - alone[name]:+.4f})" for name, value in metrics.items()),
                  flush=True)

    out = Path(args.out or Path(__file__).parent / "results" / f"ranker_{dataset.name}_{args.pipeline.replace('+', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": dataset.name, "pipeline": args.pipeline, "split": "val", "users": int(len(users)),
                               "load_average": round(load, 2), "recall_fit_seconds": round(recall_seconds, 1),
                               "recall_alone": alone, "variants": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
