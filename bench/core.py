"""Benchmark of the recommender core: the four default pipelines on a real dataset, beside
EASE and popularity, with and without item content, under two protocols.

Train on train, select on validation, report on test (full ranking, train + val masked).
The default pipeline is the simplest of those within noise of the best on validation
(`simplest_within_noise`).
Every test Recall@20 / NDCG@20 has a 95% bootstrap interval over the test users, and its
difference to EASE paired over the same users (tools/noise.py).
Protocols: `ours` scores test users from their train + val history; `mmrec` (MMRec's,
under which the published anchors were measured) from their train history only. EASE's
λ is chosen on validation NDCG@20. "Without content" strips item text, categories and
content graphs (features fall back to collaborative SVD factors); the heuristic is also
run on each content modality alone, and the two-tower without its content smoothing and
without the heuristic's scores. Prints tables and writes JSON to
bench/results/core_<dataset>.json (dashes become underscores).

    python bench/core.py --dataset baby --groups prefix --data-dir ../shared/data
    python bench/core.py --dataset ml-100k --groups age --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from dataclasses import replace

from rectune.models.base import FitContext
from rectune.models.dataset import Dataset
from rectune.models.ease import EaseRecall, PopularityRecall
from rectune.models.features import attach_item_features
from rectune.models.groups import make_groups
from rectune.models.loaders import load_dataset
from rectune.models.pipeline import PIPELINES, Pipeline, PipelineConfig, Recommendations, score_lists
from rectune.tools.noise import Interval, paired_interval

# Amazon Baby, Recall@20 / NDCG@20 on MMRec's split (our split is LATTICE's 8:1:1 of the same data).
ANCHORS = {"BPR": (0.0575, 0.0249), "LightGCN": (0.0754, 0.0328), "VBPR": (0.0663, 0.0284),
           "FREEDOM": (0.0992, 0.0424), "DANCE (best seen)": (0.1061, 0.0465)}


EASE_LAMBDAS = (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)
SWEEP_K = (100, 500, 1000, 2000)
INTERVAL_METRICS = ("recall@20", "ndcg@20")
TEST_PROTOCOLS = ("ours", "mmrec")
SERVING_PASSES = 3
"""Timed passes of the serving benchmark; the median is reported (shared machines are noisy)."""


def reset_peak_memory() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux), so each pipeline gets its own peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def matmul_gflops() -> float:
    """The machine's float32 matrix-multiply rate (median of 5), the floor's denominator."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / float(np.median(times)) / 1e9


def deepfm_flops_per_pair(config: PipelineConfig, n_fields: int) -> tuple[float, float]:
    """FLOPs to score one candidate: the plain forward, and our factorised form."""
    d, hidden = config.ranker_dim, config.hidden
    rest = sum(2 * a * b for a, b in zip(hidden[:-1], hidden[1:])) + 2 * hidden[-1]
    plain = 2 * n_fields * d * hidden[0] + rest + 4 * n_fields * d
    factorised = 3 * hidden[0] + rest + 6 * d
    return plain, factorised


def pick(metrics: dict, names: list[str]) -> dict:
    return {n: round(metrics[n], 4) for n in names if n in metrics}


def without_content(dataset: Dataset) -> Dataset:
    """The dataset as if it had no item content: no text, categories or graphs, so item
    features fall back to collaborative SVD factors of the train split."""
    return attach_item_features(replace(dataset, item_text=None, item_categories=None, item_features=None, content=None))


def mmrec_lists(pipeline: Pipeline, dataset: Dataset, users: np.ndarray, length: int) -> Recommendations:
    """Test lists under MMRec's protocol: scored from train history (the lists `val` is
    served with), then validation items removed (MMRec masks them too) and cut to `length`."""
    extra = int(np.diff(dataset.val.indptr).max(initial=0))
    served = pipeline.recommend(dataset, users, "val", length=length + extra)
    lists = np.full((len(users), length), -1, dtype=np.int64)
    for row, user in enumerate(users):
        seen = dataset.val.indices[dataset.val.indptr[user]:dataset.val.indptr[user + 1]]
        kept = served.items[row][(served.items[row] >= 0) & ~np.isin(served.items[row], seen)][:length]
        lists[row, :len(kept)] = kept
    return Recommendations(users, lists, None, served.seconds)


def protocols(pipeline: Pipeline, dataset: Dataset, groups, cutoffs: tuple[int, ...]) -> dict:
    """val (train history), test `ours` (train + val history) and test `mmrec` metrics."""
    users = np.arange(dataset.n_users)
    val = pipeline.evaluate(dataset, "val", cutoffs=cutoffs)
    ours = pipeline.evaluate(dataset, "test", groups, cutoffs=cutoffs)
    mmrec = score_lists(dataset, "test", mmrec_lists(pipeline, dataset, users, max(cutoffs)), (20, *cutoffs))
    return {"val": val, "ours": ours, "mmrec": mmrec}


def prefitted(recall, dataset: Dataset) -> Pipeline:
    """A ranker-less pipeline around a recall stage that is not one of the four (a baseline)."""
    started = time.perf_counter()
    recall.fit(dataset, FitContext())
    recall.fit_seconds = time.perf_counter() - started
    return Pipeline(PipelineConfig(), recall=recall)


def choose_ease(dataset: Dataset) -> tuple[Pipeline, dict]:
    """EASE with the λ of EASE_LAMBDAS that gives the best validation NDCG@20."""
    scores, best = {}, None
    for lam in EASE_LAMBDAS:
        pipeline = prefitted(EaseRecall(lam), dataset)
        scores[lam] = pipeline.evaluate(dataset, "val").metrics.overall["ndcg@20"]
        if best is None or scores[lam] > scores[best[0]]:
            best = (lam, pipeline)
        print(f"  EASE λ={lam:<6g} val NDCG@20 {scores[lam]:.4f}", flush=True)
    return best[1], {"chosen_lambda": best[0], "val_ndcg@20_by_lambda": {str(k): round(v, 4) for k, v in scores.items()}}


def per_user(measured: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per-user Recall@20 and NDCG@20 on test under both protocols, and on validation (the same
    users in every row)."""
    evaluations = {"ours": measured["ours"].metrics, "mmrec": measured["mmrec"], "val": measured["val"].metrics}
    return {protocol: {name: result.per_user[name] for name in INTERVAL_METRICS} for protocol, result in evaluations.items()}


def intervals(values: dict[str, dict[str, np.ndarray]], references: dict[str, dict]) -> dict:
    """Per test protocol and metric: the mean's 95% bootstrap interval over the test users, and
    the difference to each reference row (`vs_ease`, `vs_heuristic`) paired over the same users."""
    out = {}
    for protocol in TEST_PROTOCOLS:
        for name, mine in values[protocol].items():
            mean = paired_interval(mine, np.zeros_like(mine))
            entry = {"mean": round(mean.diff, 5), "low": round(mean.low, 5), "high": round(mean.high, 5)}
            for other, reference in references.items():
                versus = paired_interval(mine, reference[protocol][name])
                entry[f"vs_{other}"] = {k: round(v, 5) for k, v in versus.to_json().items()}
            out.setdefault(protocol, {})[name] = entry
    return out


def row(pipeline: Pipeline, dataset: Dataset, groups, cutoffs: tuple[int, ...], keys: list[str],
        references: dict[str, dict] | None = None) -> tuple[dict, dict]:
    """The row's numbers, and its per-user test values (for pairing later rows with this one)."""
    reset_peak_memory()
    measured = protocols(pipeline, dataset, groups, cutoffs)
    users = per_user(measured)
    return {
        "fit_seconds": {k: round(v, 2) for k, v in pipeline.fit_seconds.items()},
        "peak_memory_mb": peak_memory_mb(),
        "val": pick(measured["val"].metrics.overall, keys),
        "test_ours": pick(measured["ours"].metrics.overall, keys),
        "test_ours_groups": {g: pick(m, keys) for g, m in measured["ours"].metrics.groups.items()},
        "test_mmrec": pick(measured["mmrec"].overall, keys),
        "test_intervals": intervals(users, references or {}),
        "val_seconds_per_1k_users": {k: v * 1000 / dataset.n_users for k, v in measured["val"].seconds.items()},
    }, users


def print_row(name: str, entry: dict) -> None:
    v, o, m = entry["val"], entry["test_ours"], entry["test_mmrec"]
    ndcg = entry["test_intervals"]["ours"]["ndcg@20"]
    versus = "".join(f" vs {other} {Interval.from_json(ndcg[f'vs_{other}']).text()}" for other in ("ease", "heuristic")
                     if f"vs_{other}" in ndcg)
    print(f"  {name:<34} val {v['recall@20']:.4f}/{v['ndcg@20']:.4f}  test ours {o['recall@20']:.4f}/{o['ndcg@20']:.4f} "
          f"[{ndcg['low']:.4f}, {ndcg['high']:.4f}]{versus}  mmrec {m['recall@20']:.4f}/{m['ndcg@20']:.4f}  "
          f"fit {sum(entry['fit_seconds'].values()):.1f}s", flush=True)


def accuracy_rows(datasets: dict[str, Dataset], groups, pipelines: list[str]) -> tuple[dict, dict, dict]:
    """Every row of the accuracy table: baselines, pipelines with and without content, and
    the heuristic per modality; the fitted pipelines with content, for serving."""
    full = datasets["with content"]
    cutoffs, keys = (20, 50), ["recall@20", "ndcg@20", "recall@50", "ndcg@50", "precision@20"]
    rows, fitted, extra, validation = {}, {}, {}, {}
    ease, extra["ease"] = choose_ease(full)
    label = f"EASE (λ={extra['ease']['chosen_lambda']:g}, chosen on val)"
    rows[label], ease_users = row(ease, full, groups, cutoffs, keys)
    print_row("EASE", rows[label])
    # Every later row is paired with EASE, and once it is in, with the heuristic with content:
    # the two recalls the learned one must beat.
    references = {"ease": ease_users}
    rows["popularity"], _ = row(prefitted(PopularityRecall(), full), full, groups, cutoffs, keys, references)
    print_row("popularity", rows["popularity"])
    for name in pipelines:
        config = PipelineConfig.from_dict({"pipeline": name})
        for variant, dataset in datasets.items():
            pipeline = Pipeline(config).fit(dataset)
            label = f"{name} ({variant})"
            entry, users = row(pipeline, dataset, groups, (*cutoffs, config.top_n), keys, dict(references))
            rows[label] = {"config": config.to_dict(), **entry}
            if label == "heuristic (with content)":
                references["heuristic"] = users
            note = getattr(pipeline.recall, "content_note", "")
            if note:
                rows[label]["content_note"] = note
            print_row(label, rows[label])
            if variant == "with content":
                fitted[name] = pipeline
                validation[name] = users["val"]["ndcg@20"]
    extra["default_pipeline"] = simplest_within_noise({name: rows[f"{name} (with content)"] for name in validation}, validation)
    if "two_tower" in pipelines:
        # What each part of the two-tower recall adds: the content smoothing, then the heuristic's scores.
        for label, parts in (("two_tower alone, unsmoothed", {"content_layers": 0, "heuristic_weight": 0.0}),
                             ("two_tower alone, smoothed", {"heuristic_weight": 0.0})):
            rows[label] = row(Pipeline(PipelineConfig.from_dict({"pipeline": "two_tower", **parts})).fit(full), full, groups,
                              cutoffs, keys, references)[0]
            print_row(label, rows[label])
    if full.content is not None and len(full.content.modalities) > 1:
        config = PipelineConfig.from_dict({"pipeline": "heuristic"})
        for modality in full.content.modalities:
            single = replace(full, content=full.content.only((modality,)))
            label = f"heuristic ({modality} only)"
            rows[label] = row(Pipeline(config).fit(single), single, groups, cutoffs, keys, references)[0]
            print_row(label, rows[label])
    return rows, fitted, extra


def simplest_within_noise(rows: dict[str, dict], validation: dict[str, np.ndarray]) -> dict:
    """The default pipeline: the best on validation NDCG@20 or, where simpler pipelines are
    within noise of it (their difference to it, paired over the validation users, has a 95%
    interval containing 0), the simplest of those: fewest stages, then the cheapest fit (a
    ranker's counting its recall stage). The one-standard-error rule (Breiman et al. 1984,
    CART; Hastie et al. 2009, ESL §7.10) with a paired interval in place of the standard error —
    a difference validation cannot tell from noise buys no extra stage or training time."""
    best = max(rows, key=lambda name: rows[name]["val"]["ndcg@20"])
    versus = {name: paired_interval(validation[name], validation[best]) for name in rows if name != best}
    tied = [best] + [name for name, interval in versus.items() if interval.within_noise]

    def cost(name: str) -> tuple[int, float]:
        recall, ranker = PIPELINES[name]
        seconds = sum(rows[name]["fit_seconds"].values())
        if ranker != "none" and recall in rows:  # fitted after its recall pipeline, whose stage it reused
            seconds += sum(rows[recall]["fit_seconds"].values())
        return int(ranker != "none") + 1, seconds

    chosen = min(tied, key=cost)
    return {"rule": "the simplest (fewest stages, then cheapest fit) within noise of the best on validation NDCG@20",
            "best_on_val": best, "chosen": chosen, "fit_seconds": {name: round(cost(name)[1], 1) for name in rows},
            "val_ndcg@20_vs_best": {name: {k: round(v, 5) for k, v in interval.to_json().items()} for name, interval in versus.items()},
            "within_noise_of_best": tied}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="baby")
    parser.add_argument("--groups", default="prefix")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--no-serving", action="store_true", help="skip the serving and reproducibility checks")
    args = parser.parse_args()
    unknown = [name for name in args.pipelines.split(",") if name not in PIPELINES]
    if unknown:
        parser.error(f"--pipelines: {unknown} are not pipelines; choose from {list(PIPELINES)}")

    started = time.perf_counter()
    dataset = load_dataset(args.dataset, args.data_dir)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    dataset = attach_item_features(dataset)
    feature_seconds = time.perf_counter() - started
    groups = make_groups(dataset, args.groups)
    gflops = matmul_gflops()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items, features {dataset.item_features.source}; "
          f"content {dataset.summary()['content_modalities'] or 'none'}; groups {args.groups} {groups.sizes()}; "
          f"matmul {gflops:.0f} GFLOP/s; load average {' '.join(load)}")
    datasets = {"with content": dataset, "without content": without_content(dataset)}
    rows, fitted, extra = accuracy_rows(datasets, groups, args.pipelines.split(","))
    sweep = k_sweep(fitted, dataset)
    serving, reproducible = ({}, None) if args.no_serving else serving_and_reproducibility(fitted, dataset, groups, gflops, rows)

    default = extra["default_pipeline"]
    report = {
        "dataset": dataset.summary(), "groups": {"spec": args.groups, "sizes": groups.sizes(), "descriptions": groups.descriptions},
        "machine": {"platform": platform.platform(), "matmul_gflops": round(gflops, 1), "load_average_at_start": load},
        "protocols": {"ours": "test users scored from train + val history; train + val masked",
                      "mmrec": "test users scored from train history only; train + val masked (MMRec's evaluation)"},
        "load_seconds": round(load_seconds, 2), "feature_seconds": round(feature_seconds, 2),
        "rows": rows, **extra, "deepfm_k_sweep_test_ours": sweep, "serving_k1000_top50": serving,
        "reproducible_same_seed": reproducible, "anchors_recall20_ndcg20": ANCHORS if dataset.name == "baby" else {},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"core_{dataset.name.replace('-', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_tables(report, gflops, dataset.n_users)
    versus = "; ".join(f"{name} {Interval.from_json(interval).text()}" for name, interval in default["val_ndcg@20_vs_best"].items())
    print(f"\nbest on validation NDCG@20: {default['best_on_val']} (the others against it, paired: {versus}); "
          f"default pipeline, {default['rule']}: {default['chosen']}; same seed reproduces metrics: {reproducible}; wrote {out}")


def serving_and_reproducibility(fitted: dict, dataset: Dataset, groups, gflops: float, rows: dict) -> tuple[dict, bool]:
    """Serving K=1000 → TopN=50 for every user; and the same seed again gives the same metrics."""
    serving = {}
    users = np.arange(dataset.n_users)
    for name, pipeline in fitted.items():
        passes = []
        for _ in range(1 + SERVING_PASSES):  # the first pass warms caches and is not counted
            started = time.perf_counter()
            served = pipeline.recommend(dataset, users, "test", length=50, k=1000)
            passes.append((time.perf_counter() - started, served.seconds))
        total, seconds = sorted(passes[1:], key=lambda p: p[0])[SERVING_PASSES // 2]  # the median pass
        entry = {"seconds": round(total, 3), "passes_seconds": [round(t, 3) for t, _ in passes[1:]],
                 **{k: round(v, 3) for k, v in seconds.items()}}
        if pipeline.ranker is not None:
            n_fields = pipeline.ranker.net.n_user_fields + pipeline.ranker.net.n_item_fields + 1
            plain, factorised = deepfm_flops_per_pair(pipeline.config, n_fields)
            pairs = dataset.n_users * 1000
            entry.update({"pairs": pairs, "floor_plain_seconds": round(pairs * plain / gflops / 1e9, 3),
                          "floor_factorised_seconds": round(pairs * factorised / gflops / 1e9, 3)})
        serving[name] = entry
    name = "two_tower+deepfm" if "two_tower+deepfm" in fitted else next(iter(fitted))
    again = Pipeline(PipelineConfig.from_dict({"pipeline": name})).fit(dataset).evaluate(dataset, "test", groups, cutoffs=(50,))
    first = rows[f"{name} (with content)"]["test_ours"]
    return serving, pick(again.metrics.overall, list(first)) == first


def k_sweep(fitted: dict, dataset: Dataset) -> dict:
    """Test (ours) Recall@20/@50 of each DeepFM pipeline as K grows, beside candidate recall@K:
    whether items from deeper in the recall list reach the top."""
    users = np.arange(dataset.n_users)
    sweep = {}
    for name, pipeline in fitted.items():
        if pipeline.ranker is None:
            continue
        sweep[name] = {}
        for k in SWEEP_K:
            served = pipeline.recommend(dataset, users, "test", length=50, k=k)
            metrics = score_lists(dataset, "test", served, (20, 50)).overall
            found = f"candidate_recall@{served.candidates.shape[1]}"  # K is capped by the catalogue
            sweep[name][k] = {**pick(metrics, ["recall@20", "ndcg@20", "recall@50"]), "candidate_recall@k": round(metrics[found], 4)}
            print(f"  {name:<18} K={k:<5} R@20 {metrics['recall@20']:.4f} R@50 {metrics['recall@50']:.4f} "
                  f"{found} {metrics[found]:.4f}", flush=True)
    return sweep


def print_tables(report: dict, gflops: float, n_users: int) -> None:
    rows = report["rows"]
    print(f"\n{'test, full ranking':<40} {'ours R@20':>9} {'N@20':>7} {'N@20 − EASE, paired [95%]':>27} "
          f"{'N@20 − heuristic, paired':>27} {'R@50':>7} {'mmrec R@20':>10} {'N@20':>7} {'val N@20':>8} {'fit s':>6} {'peak MB':>8}")
    for name, entry in rows.items():
        o, m = entry["test_ours"], entry["test_mmrec"]
        ndcg = entry.get("test_intervals", {}).get("ours", {}).get("ndcg@20", {})
        ease, heuristic = (Interval.from_json(ndcg[key]).text() if key in ndcg else "-" for key in ("vs_ease", "vs_heuristic"))
        print(f"{name:<40} {o['recall@20']:>9.4f} {o['ndcg@20']:>7.4f} {ease:>27} {heuristic:>27} {o['recall@50']:>7.4f} {m['recall@20']:>10.4f} "
              f"{m['ndcg@20']:>7.4f} {entry['val']['ndcg@20']:>8.4f} {sum(entry['fit_seconds'].values()):>6.1f} {entry['peak_memory_mb']:>8.0f}")
    for anchor, (r, n) in report["anchors_recall20_ndcg20"].items():
        print(f"{'  ' + anchor:<40} {'':>9} {'':>7} {'':>27} {'':>27} {'':>7} {r:>10.4f} {n:>7.4f}   (published, MMRec's split and protocol)")
    print("\nper group, test (ours) Recall@20 / NDCG@20:")
    for name, entry in rows.items():
        cells = "  ".join(f"{g} {m['recall@20']:.4f}/{m['ndcg@20']:.4f}" for g, m in entry["test_ours_groups"].items())
        print(f"  {name:<40} {cells}")
    serving = report["serving_k1000_top50"]
    if serving:
        print(f"\nserving K=1000 → TopN=50, all {n_users} users (median of {SERVING_PASSES} passes after a warm-up):")
    for name, entry in serving.items():
        floor = f"  floor {entry['floor_factorised_seconds']}s factorised / {entry['floor_plain_seconds']}s plain at {gflops:.0f} GFLOP/s" if "pairs" in entry else ""
        passes = ", ".join(f"{t:.2f}" for t in entry["passes_seconds"])
        print(f"  {name:<18} {entry['seconds']:.2f}s (candidates {entry['candidates']:.2f}s, rank {entry['rank']:.2f}s; passes {passes}){floor}")


if __name__ == "__main__":
    main()
