"""Benchmark of serving and of training on a shared CPU.

1. Exact top-k search on Baby shapes (19,445 users, 7,050 items, 64-d unit vectors, each
   user's Baby train + validation items masked): FAISS `IndexFlatIP` against a blocked torch
   matmul + top-k (models.two_tower's two searches), at k = 20, 50, 500, 1000; then for
   2,048 users on catalogues 5, 10 and 20 times Baby's, where FAISS takes over.
2. Serving a ranker-less pipeline (two-tower, one epoch) to every Baby user on test: its
   direct top-50, the K=1000 search it replaced (K candidates, keep 50), and the floor: the
   user vectors plus a bare blocked matmul + top-50 over them (no masking, no copies); with
   the heuristic blended in (the default), also its own product, history × item-item matrix.
3. A one-epoch two-tower fit on Baby in a fresh process, alone and beside two busy loops
   (one per core; other people's work on a shared machine comes on top of both):
   with OpenMP's defaults (torch loaded before rectune, so nothing is set), with rectune's
   settings (passive waiting, one thread per usable core), and with one thread.

Prints a table and writes JSON to bench/results/serving.json.

    python bench/serving.py --data-dir ../shared/data
"""

from __future__ import annotations

import rectune.models  # noqa: F401  (before numpy and torch: it sets OpenMP's wait policy and threads)

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PASSES = 3
"""Timed passes per measurement after one warm-up; the median is reported."""


def median_seconds(work, passes: int = PASSES) -> float:
    work()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def exact_search(seen, ks: tuple[int, ...], n_users: int, scale: int = 1, dim: int = 64) -> list[dict]:
    """Both exact searches on random unit vectors: `n_users` of Baby's users (their seen items
    masked) against Baby's catalogue repeated `scale` times."""
    import scipy.sparse as sp

    from rectune.models.two_tower import blocked_top_k, faiss_top_k

    rng = np.random.default_rng(0)

    def unit(n):
        vectors = rng.normal(size=(n, dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    seen = sp.hstack([seen[:n_users]] * scale).tocsr()
    users, items = unit(n_users), unit(seen.shape[1])
    rows = []
    for k in ks:
        faiss_s = median_seconds(lambda: faiss_top_k(users, items, k, seen))
        torch_s = median_seconds(lambda: blocked_top_k(users, items, k, seen))
        rows.append({"users": n_users, "items": items.shape[0], "k": k, "faiss_s": round(faiss_s, 3), "blocked_s": round(torch_s, 3)})
        print(f"  {n_users:>6} users x {items.shape[0]:>6} items  k={k:<5} FAISS {faiss_s:6.2f}s  blocked matmul+top-k "
              f"{torch_s:6.2f}s  (FAISS / blocked {faiss_s / torch_s:.2f})", flush=True)
    return rows


def serving(dataset) -> dict:
    import torch

    from rectune.models.pipeline import Pipeline, PipelineConfig
    from rectune.models.base import rows_per_block

    pipeline = Pipeline(PipelineConfig.from_dict({"pipeline": "two_tower", "epochs": 1, "k": 1000, "top_n": 50})).fit(dataset)
    users = np.arange(dataset.n_users)
    history = dataset.seen("test")
    vectors = torch.from_numpy(pipeline.recall.user_vectors(users, history))
    items = torch.from_numpy(pipeline.recall.item_vectors).T.contiguous()
    step = rows_per_block(items.shape[1])

    def floor(top: int | None):
        for start in range(0, len(users), step):
            scores = vectors[start:start + step] @ items
            if top:
                torch.topk(scores, top, dim=1)

    def heuristic_part():
        # The blended two-tower's second product: history × the heuristic's item-item matrix.
        for start in range(0, len(users), step):
            pipeline.recall.heuristic.scores(history[start:start + step])

    blended = pipeline.recall.heuristic is not None
    result = {
        "direct_top50_s": median_seconds(lambda: pipeline.recommend(dataset, users, "test", length=50)),
        "k1000_then_top50_s": median_seconds(lambda: pipeline.recommend(dataset, users, "test", length=50, candidate_recall=True)),
        "user_vectors_s": median_seconds(lambda: pipeline.recall.user_vectors(users, history)),
        "matmul_s": median_seconds(lambda: floor(None)),
        "matmul_top50_s": median_seconds(lambda: floor(50)),
        **({"heuristic_product_s": median_seconds(heuristic_part)} if blended else {}),
    }
    floor_s = result["user_vectors_s"] + result["matmul_top50_s"]
    both_s = floor_s + result.get("heuristic_product_s", 0.0)
    print(f"  direct top-50 {result['direct_top50_s']:.2f}s, K=1000 then top-50 {result['k1000_then_top50_s']:.2f}s; "
          f"floor: user vectors {result['user_vectors_s']:.2f}s + blocked matmul {result['matmul_s']:.2f}s "
          f"(+ top-50: {result['matmul_top50_s']:.2f}s); direct / floor {result['direct_top50_s'] / floor_s:.2f}x"
          + (f"; the heuristic's product {result['heuristic_product_s']:.2f}s, direct / both products "
             f"{result['direct_top50_s'] / both_s:.2f}x" if blended else ""))
    return {**{name: round(value, 3) for name, value in result.items()}, "direct_over_floor": round(result["direct_top50_s"] / floor_s, 2),
            **({"direct_over_both_products": round(result["direct_top50_s"] / both_s, 2)} if blended else {})}


EPOCH = """
{first}
import json, time
import torch
from rectune.models.features import attach_item_features
from rectune.models.loaders import load_dataset
from rectune.models.pipeline import PipelineConfig, fit_recall
dataset = attach_item_features(load_dataset("baby", {data_dir!r}))
wall, cpu = time.perf_counter(), time.process_time()
fit_recall(PipelineConfig.from_dict({{"pipeline": "two_tower", "epochs": 1}}), dataset)
print(json.dumps({{"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "threads": torch.get_num_threads()}}))
"""

SETTINGS = {
    "OpenMP defaults": ("import torch", {}),
    "rectune (passive)": ("import rectune.models", {}),
    "one thread": ("import rectune.models", {"OMP_NUM_THREADS": "1"}),
}


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def shared_cpu(data_dir: str | None, loops: int) -> list[dict]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "OPENBLAS_"))}
    rows = []
    for load in (0, loops):
        for name, (first, extra) in SETTINGS.items():
            script = EPOCH.format(first=first, data_dir=data_dir)
            others = busy_loops(load)
            try:
                done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env={**clean, **extra},
                                      capture_output=True, text=True, timeout=1800)
            finally:
                for process in others:
                    process.kill()
                    process.wait()
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"setting": name, "busy_loops": load, **{k: round(v, 2) for k, v in measured.items()}})
            print(f"  {name:<18} beside {load} busy loop(s): {measured['wall_s']:6.1f}s wall, {measured['cpu_s']:6.1f}s CPU, "
                  f"{measured['threads']} thread(s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    parser.add_argument("--busy-loops", type=int, default=2, help="Busy processes beside the training run (default 2: both cores).")
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: search, serving, shared.")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from rectune.models.features import attach_item_features
    from rectune.models.loaders import load_dataset

    dataset = attach_item_features(load_dataset("baby", args.data_dir))
    report = {"machine": {"platform": platform.platform(), "usable_cpus": len(os.sched_getaffinity(0)),
                          "load_average_at_start": os.getloadavg()}, "date": time.strftime("%Y-%m-%d")}
    if "search" not in skip:
        print("exact search (median of 3 passes):")
        seen = dataset.seen("test")
        report["exact_search"] = (exact_search(seen, (20, 50, 500, 1000), seen.shape[0])
                                  + [row for scale in (5, 10, 20) for row in exact_search(seen, (50, 1000), 2048, scale)])
    if "serving" not in skip:
        print("serving two-tower to every Baby user on test:")
        report["serving_top50"] = serving(dataset)
    if "shared" not in skip:
        print(f"one two-tower epoch on Baby, fresh process, alone and beside {args.busy_loops} busy loop(s):")
        report["two_tower_epoch"] = shared_cpu(args.data_dir, args.busy_loops)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
