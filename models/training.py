"""Shared Lightning plumbing for the trained stages (two-tower recall, DeepFM ranker)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp


def padded_history(matrix: sp.csr_matrix, pad: int) -> np.ndarray:
    """Each row's item indices, right-padded with `pad` (users × longest history)."""
    lengths = np.diff(matrix.indptr)
    width = max(int(lengths.max(initial=0)), 1)
    out = np.full((matrix.shape[0], width), pad, dtype=np.int64)
    rows = np.repeat(np.arange(matrix.shape[0]), lengths)
    cols = np.arange(matrix.nnz) - np.repeat(matrix.indptr[:-1], lengths)
    out[rows, cols] = matrix.indices
    return out


def contains(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether each (row, col) pair is a stored entry of `matrix` (vectorised, sorted keys)."""
    matrix = matrix.tocsr()
    matrix.sort_indices()
    keys = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr)) * matrix.shape[1] + matrix.indices
    if keys.size == 0:
        return np.zeros(len(rows), dtype=bool)
    queries = rows.astype(np.int64) * matrix.shape[1] + cols
    position = np.clip(np.searchsorted(keys, queries), 0, keys.size - 1)
    return keys[position] == queries


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


def fit_module(module, batches, epochs: int, seed: int, progress: bool) -> None:
    """Train a LightningModule on CPU or, where present, an accelerator; quiet unless asked."""
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
        trainer.fit(module, batches)


def inference_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
