"""Two-tower recall.

Covington et al., "Deep Neural Networks for YouTube Recommendations" (RecSys 2016):
a user tower (user id + mean of the history's item embeddings + user attributes) and an
item tower (item id + item content features) map into one space; candidates are the K
items nearest to the user vector. Trained with in-batch sampled softmax and the logQ
correction of Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations" (RecSys 2019). Retrieval is FAISS exact inner-product search.

During training the target item is left out of the history mean, so the model cannot
learn to recognise an item in its own history (which it never sees at serving time).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from models.base import Candidates, FitContext, RecallModel
from models.dataset import Dataset
from models.training import contains, fit_module, inference_device, padded_history, shuffled_batches

_BLOCK = 4096


def user_attribute_codes(dataset: Dataset, context: FitContext) -> np.ndarray:
    """Categorical user attributes (and the user group) as integer codes, users × columns."""
    columns = []
    if dataset.user_attributes is not None:
        for name in dataset.user_attributes.columns:
            columns.append(pd.factorize(dataset.user_attributes[name].astype(str), sort=True)[0])
    if context.group_codes is not None:
        columns.append(np.asarray(context.group_codes))
    if not columns:
        return np.zeros((dataset.n_users, 0), dtype=np.int64)
    return np.stack(columns, axis=1).astype(np.int64)


def _build_net(n_users: int, n_items: int, dim: int, item_features: np.ndarray | None, attribute_sizes: list[int]):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class TwoTowerNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pad = n_items
            self.user_id = nn.Embedding(n_users, dim)
            self.history = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
            self.attributes = nn.ModuleList(nn.Embedding(size, dim) for size in attribute_sizes)
            self.user_mlp = nn.Sequential(nn.Linear(dim * (2 + len(attribute_sizes)), 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
            self.item_id = nn.Embedding(n_items, dim)
            features = torch.zeros(n_items, 0) if item_features is None else torch.from_numpy(item_features)
            self.register_buffer("item_features", features.float())
            self.content = nn.Linear(features.shape[1], dim) if features.shape[1] else None
            self.item_mlp = nn.Sequential(nn.Linear(dim * (2 if self.content else 1), 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
            for table in (self.user_id, self.history, self.item_id, *self.attributes):
                nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                self.history.weight[n_items].zero_()

        def users(self, users, histories, attributes, left_out):
            counts = (histories != self.pad).sum(dim=1) - (left_out != self.pad).long()
            mean = (self.history(histories).sum(dim=1) - self.history(left_out)) / counts.clamp(min=1).unsqueeze(1)
            parts = [self.user_id(users), mean] + [table(attributes[:, j]) for j, table in enumerate(self.attributes)]
            return F.normalize(self.user_mlp(torch.cat(parts, dim=1)), dim=-1)

        def items(self, items):
            parts = [self.item_id(items)]
            if self.content is not None:
                parts.append(self.content(self.item_features[items]))
            return F.normalize(self.item_mlp(torch.cat(parts, dim=1)), dim=-1)

    return TwoTowerNet()


def _lightning_module(net, log_popularity, temperature: float, lr: float, weight_decay: float):
    import lightning.pytorch as pl
    import torch
    from torch.nn import functional as F

    class InBatchSoftmax(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("log_popularity", log_popularity)

        def training_step(self, batch, _):
            items = batch["item"]
            users = self.net.users(batch["user"], batch["history"], batch["attributes"], items)
            logits = users @ self.net.items(items).T / temperature - self.log_popularity[items].unsqueeze(0)
            # The same item twice in a batch is a positive, not a negative, for both rows.
            duplicate = (items.unsqueeze(0) == items.unsqueeze(1)) & ~torch.eye(len(items), dtype=torch.bool, device=items.device)
            loss = F.cross_entropy(logits.masked_fill(duplicate, float("-inf")), torch.arange(len(items), device=items.device))
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)

    return InBatchSoftmax()


class TwoTowerRecall(RecallModel):
    def __init__(self, embedding_dim: int, lr: float, epochs: int, batch_size: int, temperature: float, weight_decay: float):
        self.embedding_dim = embedding_dim
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.temperature = temperature
        self.weight_decay = weight_decay
        self.net = None
        self.item_vectors: np.ndarray | None = None

    def fit(self, dataset: Dataset, context: FitContext) -> None:
        import torch

        torch.manual_seed(context.seed)
        self.attributes = user_attribute_codes(dataset, context)
        features = dataset.item_features.matrix if dataset.item_features is not None else None
        self.net = _build_net(dataset.n_users, dataset.n_items, self.embedding_dim, features,
                              [int(c.max()) + 1 for c in self.attributes.T])
        train = dataset.train.tocoo()
        counts = np.asarray(dataset.train.sum(axis=0)).ravel()
        log_popularity = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()
        histories = torch.from_numpy(padded_history(dataset.train, dataset.n_items))
        users = torch.from_numpy(train.row.astype(np.int64))
        tensors = {
            "user": users,
            "item": torch.from_numpy(train.col.astype(np.int64)),
            "history": histories[users],
            "attributes": torch.from_numpy(self.attributes)[users],
        }
        module = _lightning_module(self.net, log_popularity, self.temperature, self.lr, self.weight_decay)
        fit_module(module, shuffled_batches(tensors, self.batch_size, context.seed), self.epochs, context.seed, context.progress)
        self.net = module.net.to(inference_device()).eval()
        self.item_vectors = self._item_vectors()

    def _item_vectors(self) -> np.ndarray:
        import torch

        device = inference_device()
        with torch.inference_mode():
            items = torch.arange(self.net.item_id.num_embeddings, device=device)
            return self.net.items(items).float().cpu().numpy()

    def user_vectors(self, users: np.ndarray, history: sp.csr_matrix, left_out: np.ndarray | None = None) -> np.ndarray:
        """User vectors from `history`; `left_out[i]` (an item or -1) is removed from row i's history."""
        import torch

        device = inference_device()
        pad = self.net.pad
        out = []
        with torch.inference_mode():
            for start in range(0, len(users), _BLOCK):
                block = users[start:start + _BLOCK]
                histories = torch.from_numpy(padded_history(history[block], pad)).to(device)
                leave = np.full(len(block), pad) if left_out is None else np.where(left_out[start:start + _BLOCK] >= 0, left_out[start:start + _BLOCK], pad)
                vectors = self.net.users(
                    torch.from_numpy(block.astype(np.int64)).to(device), histories,
                    torch.from_numpy(self.attributes[block]).to(device), torch.from_numpy(leave.astype(np.int64)).to(device),
                )
                out.append(vectors.float().cpu().numpy())
        return np.vstack(out) if out else np.zeros((0, self.embedding_dim), np.float32)

    def candidates(self, users: np.ndarray, k: int, history: sp.csr_matrix) -> Candidates:
        import faiss

        index = faiss.IndexFlatIP(self.item_vectors.shape[1])
        index.add(self.item_vectors)
        seen = history[users]
        # Search past the seen items, then drop them: FAISS cannot mask per query.
        depth = min(k + int(np.diff(seen.indptr).max(initial=0)), self.item_vectors.shape[0])
        scores, items = index.search(self.user_vectors(users, history), depth)
        rows = np.repeat(np.arange(len(users)), depth)
        drop = contains(seen, rows, items.ravel()).reshape(items.shape) | (items < 0)
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]
        items = np.take_along_axis(items, order, axis=1).astype(np.int64)
        scores = np.take_along_axis(scores, order, axis=1)
        dropped = np.take_along_axis(drop, order, axis=1)
        items[dropped] = -1
        scores[dropped] = -np.inf
        return Candidates(items, scores.astype(np.float32))

    def score_pairs(self, users: np.ndarray, items: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        in_history = contains(history, users, items)
        vectors = self.user_vectors(users, history, np.where(in_history, items, -1))
        return np.einsum("ij,ij->i", vectors, self.item_vectors[items]).astype(np.float32)
