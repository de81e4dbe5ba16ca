"""Shared plumbing for the trained stages (two-tower recall, DeepFM ranker): the OpenMP
settings torch runs under, batching, Lightning training."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def configure_threads() -> None:
    """Set OpenMP's wait policy and thread count for torch (and faiss, OpenBLAS) unless the
    environment already does; runs when `rectune.models` is first imported, which every
    entry point does before torch loads, and subprocesses inherit it.

    OpenMP reads these once, when its runtime loads. By default an idle OpenMP thread spins
    on its core waiting for work; beside other busy processes on a 2-core machine the
    spinning threads take the cores from the threads with work: a one-epoch two-tower fit
    on Baby beside two busy loops took 213 s, 55 s with passive waiting (bench/serving.py).
    One thread per usable core, not per core of the machine, for the same reason; a fixed
    count, not one that follows the load, because the thread count can change float sums
    and the same seed must give the same metrics."""
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        from rectune.models.errors import RectuneWarning

        warnings.warn(RectuneWarning("torch was imported before rectune, so OpenMP threads spin-wait (slow on a busy "
                                     "machine): import rectune first, or set OMP_WAIT_POLICY=PASSIVE"), stacklevel=3)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))


def history_bag(indptr, indices, rows):
    """The histories of `rows` (CSR arrays as tensors) flattened for `embedding_bag`:
    (item indices, offsets, lengths). Padding every row to the longest history cost
    ~100x the work on Amazon Baby (median 4 items, longest 101)."""
    import torch

    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    offsets = torch.cumsum(lengths, 0) - lengths
    positions = torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()), device=lengths.device)
    return indices[positions], offsets, lengths


def shuffled_batches(tensors: dict, batch_size: int, seed: int):
    """An iterable of dict batches over row-aligned tensors, reshuffled (seeded) every epoch.

    Slicing pre-built tensors avoids the per-row collate of a map-style DataLoader,
    which dominated step time for these small models.
    """
    import torch

    class Batches(torch.utils.data.IterableDataset):
        def __init__(self):
            self.epoch = 0
            self.n = len(next(iter(tensors.values())))

        def __len__(self):
            return (self.n + batch_size - 1) // batch_size

        def __iter__(self):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + self.epoch)
            self.epoch += 1
            order = torch.randperm(self.n, generator=generator)
            for start in range(0, self.n, batch_size):
                index = order[start:start + batch_size]
                yield {name: tensor[index] for name, tensor in tensors.items()}

    return torch.utils.data.DataLoader(Batches(), batch_size=None)


def batches_in_order(tensors: dict, batch_size: int):
    """Dict batches over row-aligned tensors in order, again on every pass (validation). Not a
    DataLoader: each pass over one draws from torch's global generator, which would move the next
    training epoch's dropout masks — validating must not change the model."""

    class InOrder:
        rows = len(next(iter(tensors.values())))

        def __len__(self):
            return (self.rows + batch_size - 1) // batch_size

        def __iter__(self):
            for start in range(0, self.rows, batch_size):
                yield {name: tensor[start:start + batch_size] for name, tensor in tensors.items()}

    return InOrder()


def fit_module(module, batches, epochs: int, seed: int, progress: bool, validation=None) -> None:
    """Train a LightningModule on CPU or, where present, an accelerator; quiet unless asked.
    `validation`: batches its validation_step sees after every epoch."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        # Lightning suggests DataLoader workers; our batches are slices of in-memory tensors.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        # A ranker on data without validation items has no validation lists: no curve, nothing wrong.
        warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")
        # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*treespec.*")
        trainer.fit(module, batches, validation)


def adam(parameters, lr: float, weight_decay: float = 0.0):
    """Adam with its fused kernel: one pass over all parameters instead of a dozen tensor ops
    each (a Baby two-tower epoch: 10.0 s -> 8.9 s on 2 cores); CPU and CUDA both have it."""
    import torch

    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=True)


def inference_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
