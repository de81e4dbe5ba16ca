"""Two-tower recall.

Covington et al., "Deep Neural Networks for YouTube Recommendations" (RecSys 2016):
a user tower (mean of the history's item embeddings + user attributes + optionally a
user-id embedding, off by default because it memorises sparse users) and an
item tower (item id + item content features) map into one space; candidates are the K
items nearest to the user vector. Trained with in-batch sampled softmax and the logQ
correction of Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations" (RecSys 2019). Retrieval is exact inner-product search: a blocked matmul +
top-k, or a FAISS flat index for catalogues where that is faster (bench/serving.py).

During training the target item is left out of the history mean, so the model cannot
learn to recognise an item in its own history (which it never sees at serving time).

Item content enters as FREEDOM does it (Zhou & Shen, "A Tale of Two Graphs: Freezing and
Denoising Graph Structures for Multimodal Recommendation", MM 2023): the item-id table and
the history table are smoothed over the frozen, fused item-item content graph S (the
heuristic's, `models.content.fused_graph`) — E + 2·(S E + S² E) for `content_layers` = 2 —
so items with similar text or images share what they learn. Measured on Baby (default
parameters otherwise, validation Recall@20 / NDCG@20): no smoothing .0788 / .0331, the item
table only, one hop .0821 / .0346, both tables one hop .0893 / .0379, two hops .0955 /
.0415, three .0956 / .0414.

`heuristic_weight` > 0 adds the heuristic recall's scores (`models.heuristic`, with the same
content graphs, EASE and popularity prior) to the two-tower's, each standardised over the
catalogue per user: a learned and a closed-form recall make different mistakes. On Baby
validation (two hops): the two-tower alone .0950 / .0414, the heuristic alone .0937 / .0452,
the sum at weight .1 / .15 / .2 / .3 / .5 .1065 / .0485, .1080 / .0492, .1071 / .0495,
.1053 / .0490, .1035 / .0484 — the default, .2, has the best NDCG@20.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

import torch
from torch import nn
from torch.nn import functional as F

from rectune.models.base import Candidates, FitContext, RecallModel, matrix_digest, remembered, top_k_in_blocks
from rectune.models.content import fused_graph
from rectune.models.dataset import Dataset
from rectune.models.heuristic import HeuristicRecall
from rectune.models.metrics import in_rows
from rectune.models.training import adam, fit_module, history_bag, inference_device, shuffled_batches

_BLOCK = 4096
# Scores computed per block of users (16 MB of float32): bounds memory for any number of
# users and catalogue size.
_SCORES_PER_BLOCK = 4_000_000
# Users per FAISS search: keeps the ~1,000-wide temporaries small enough to reuse memory.
_SEARCH_BLOCK = 4096
CONTENT_HOP_WEIGHT = 2.0
"""Weight of each content-graph hop in the smoothed tables (on Baby validation, 2 and 4
gave the same Recall@20 at two hops, .0955 and .0950)."""
_TRAINED_KEPT = 2  # the pipeline's recall and the one DeepFM fits on a held-out split
_trained: dict[str, tuple["TwoTowerNet", np.ndarray]] = {}
"""Trained towers and their item vectors, newest last: a study that moves only the heuristic
part's weights reuses them instead of training again (~30 s on Baby)."""
FAISS_ABOVE_ITEMS = 50_000
"""Exact search takes FAISS for catalogues larger than this, a blocked matmul + top-k up to it
(measured in bench/serving.py)."""


def rows_per_block(n_items: int) -> int:
    """Users scored per matmul of exact search."""
    return max(1, _SCORES_PER_BLOCK // n_items)


def blocked_top_k(vectors: np.ndarray, items: np.ndarray, k: int, seen: sp.csr_matrix) -> Candidates:
    """Exact inner-product top-k of each row of `vectors` among `items`, the items of its row
    of `seen` excluded: scores for a block of users by one matmul, masked, then torch's top-k."""
    table = torch.from_numpy(items).T.contiguous()
    rows = torch.from_numpy(vectors)
    return top_k_in_blocks(lambda block: rows[block] @ table, np.arange(len(vectors)), k, seen, rows_per_block(len(items)))


def faiss_top_k(vectors: np.ndarray, items: np.ndarray, k: int, seen: sp.csr_matrix) -> Candidates:
    """The same search through a FAISS flat index, which cannot mask per query: it searches
    past each user's seen items and drops them after."""
    import faiss

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    k = min(k, items.shape[0])
    out_items = np.full((len(vectors), k), -1, dtype=np.int64)
    out_scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
    for start in range(0, len(vectors), _SEARCH_BLOCK):
        block = slice(start, start + _SEARCH_BLOCK)
        masked = seen[block]
        depth = min(k + int(np.diff(masked.indptr).max(initial=0)), items.shape[0])
        found_scores, found = index.search(vectors[block], depth)
        keep = ~(in_rows(masked, found) | (found < 0))
        # Each row keeps its first k survivors: compact all rows with one flat gather.
        survivors = np.flatnonzero(keep)  # row-major positions
        counts = keep.sum(axis=1)
        kept = np.minimum(counts, k)
        rows = np.repeat(np.arange(len(kept)), kept)
        slots = np.arange(len(rows)) - np.repeat(np.cumsum(kept) - kept, kept)
        chosen = survivors[np.repeat(np.cumsum(counts) - counts, kept) + slots]
        out_items[block][rows, slots] = found.ravel()[chosen]
        out_scores[block][rows, slots] = found_scores.ravel()[chosen]
    return Candidates(out_items, out_scores)


def user_attribute_codes(dataset: Dataset) -> np.ndarray:
    """Categorical user attributes as integer codes, users × columns."""
    columns = []
    if dataset.user_attributes is not None:
        for name in dataset.user_attributes.columns:
            # Users without attributes (no row in the user file) share one code of their own;
            # pandas' default code for them, -1, is no valid embedding index.
            columns.append(pd.factorize(dataset.user_attributes[name].astype(str), sort=True, use_na_sentinel=False)[0])
    if not columns:
        return np.zeros((dataset.n_users, 0), dtype=np.int64)
    return np.stack(columns, axis=1).astype(np.int64)


class _SymmetricGraphProduct(torch.autograd.Function):
    """graph @ x for a symmetric sparse graph given as CSR parts (indices, row starts, weights),
    whose gradient is graph @ grad: one more product. Each product is a weighted
    `embedding_bag` over the rows' neighbours — on Baby's fused graph (181k edges) 1.0 ms
    against 3.8 ms for torch's CSR product, whose generic backward took ~5× its forward."""

    @staticmethod
    def forward(ctx, x, indices, starts, weights):
        ctx.graph = (indices, starts, weights)
        return F.embedding_bag(indices, x, starts, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad):
        indices, starts, weights = ctx.graph
        return F.embedding_bag(indices, grad, starts, mode="sum", per_sample_weights=weights), None, None, None


class TwoTowerNet(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, item_features: np.ndarray | None, attribute_sizes: list[int],
                 user_id: bool, content_graph: sp.csr_matrix | None = None, content_layers: int = 0):
        super().__init__()
        self.pad = n_items
        # The graph's CSR arrays as non-persistent buffers: they follow the module's device and
        # are pickled with it, but are data, not state.
        self.smooths = content_graph is not None and content_layers > 0
        if self.smooths:
            graph = sp.csr_matrix(content_graph, dtype=np.float32)
            for name, part in (("graph_indices", graph.indices.astype(np.int64)), ("graph_starts", graph.indptr[:-1].astype(np.int64)),
                               ("graph_weights", graph.data)):
                self.register_buffer(name, torch.from_numpy(part.copy()), persistent=False)
        self.content_layers = content_layers
        self.user_id = nn.Embedding(n_users, dim) if user_id else None
        self.history = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # row n_items: "nothing left out"
        self.attributes = nn.ModuleList(nn.Embedding(size, dim) for size in attribute_sizes)
        self.user_mlp = nn.Sequential(nn.Linear(dim * (1 + user_id + len(attribute_sizes)), 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.item_id = nn.Embedding(n_items, dim)
        features = torch.zeros(n_items, 0) if item_features is None else torch.from_numpy(item_features)
        self.register_buffer("item_features", features.float())
        self.content = nn.Linear(features.shape[1], dim) if features.shape[1] else None
        self.item_mlp = nn.Sequential(nn.Linear(dim * (2 if self.content else 1), 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        for table in (self.history, self.item_id, *self.attributes, *([self.user_id] if user_id else [])):
            nn.init.normal_(table.weight, std=0.05)
        with torch.no_grad():
            self.history.weight[n_items].zero_()

    def users(self, users, bag, attributes, left_out):
        """bag: the users' histories from `history_bag`; left_out: an item to remove from
        each history (the training target) or `pad`."""
        items, offsets, lengths = bag
        history = torch.cat([self.smoothed(self.history.weight[:self.pad]), self.history.weight[self.pad:]])
        total = F.embedding_bag(items, history, offsets, mode="sum") - history[left_out]
        counts = lengths - (left_out != self.pad).long()
        mean = total / counts.clamp(min=1).unsqueeze(1)
        parts = [mean] + [table(attributes[:, j]) for j, table in enumerate(self.attributes)]
        if self.user_id is not None:
            parts.append(self.user_id(users))
        return F.normalize(self.user_mlp(torch.cat(parts, dim=1)), dim=-1)

    def smoothed(self, table: torch.Tensor) -> torch.Tensor:
        """`table` plus its propagation over the content graph, CONTENT_HOP_WEIGHT per hop."""
        if not self.smooths:
            return table
        out = hop = table
        for _ in range(self.content_layers):
            hop = _SymmetricGraphProduct.apply(hop, self.graph_indices, self.graph_starts, self.graph_weights)
            out = out + CONTENT_HOP_WEIGHT * hop
        return out

    def items(self, items):
        parts = [self.smoothed(self.item_id.weight)[items]]
        if self.content is not None:
            parts.append(self.content(self.item_features[items]))
        return F.normalize(self.item_mlp(torch.cat(parts, dim=1)), dim=-1)


def _lightning_module(net, train: sp.csr_matrix, log_popularity, temperature: float, lr: float, weight_decay: float):
    import lightning.pytorch as pl

    class InBatchSoftmax(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("log_popularity", log_popularity)
            self.register_buffer("indptr", torch.from_numpy(train.indptr.astype(np.int64)))
            self.register_buffer("indices", torch.from_numpy(train.indices.astype(np.int64)))

        def training_step(self, batch, _):
            items = batch["item"]
            bag = history_bag(self.indptr, self.indices, batch["user"])
            users = self.net.users(batch["user"], bag, batch["attributes"], items)
            logits = users @ self.net.items(items).T / temperature - self.log_popularity[items].unsqueeze(0)
            # The same item twice in a batch is a positive, not a negative, for both rows.
            duplicate = (items.unsqueeze(0) == items.unsqueeze(1)) & ~torch.eye(len(items), dtype=torch.bool, device=items.device)
            loss = F.cross_entropy(logits.masked_fill(duplicate, float("-inf")), torch.arange(len(items), device=items.device))
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return adam(self.parameters(), lr, weight_decay)

    return InBatchSoftmax()


@dataclass
class TwoTowerRecall(RecallModel):
    embedding_dim: int
    lr: float
    epochs: int
    batch_size: int
    temperature: float
    weight_decay: float
    user_id: bool
    content_layers: int = 0
    neighbors: int = 10
    text_weight: float = 0.9
    heuristic: HeuristicRecall | None = None
    heuristic_weight: float = 0.0
    content_note: str = field(default="", init=False)
    net: TwoTowerNet | None = field(default=None, init=False)
    item_vectors: np.ndarray | None = field(default=None, init=False)
    attributes: np.ndarray | None = field(default=None, init=False)

    def fit(self, dataset: Dataset, context: FitContext) -> None:
        self.attributes = user_attribute_codes(dataset)
        graphs = dataset.content.graphs if dataset.content is not None else {}
        graph = fused_graph(graphs, self.neighbors, self.text_weight) if graphs and self.content_layers else None
        if self.content_layers:
            self.content_note = (f"content: {', '.join(sorted(graphs))}, {self.content_layers} hops" if graphs else
                                 f"no item content on {dataset.name!r}: content_layers changes nothing")
        self.net, self.item_vectors = remembered(_trained, self._training_key(dataset, graph, context.seed),
                                                 lambda: self._train(dataset, graph, context), _TRAINED_KEPT)
        if self.heuristic is not None:
            self.heuristic.fit(dataset, context)

    def _training_key(self, dataset: Dataset, graph: sp.csr_matrix | None, seed: int) -> str:
        """What the trained towers depend on: the data they read and the two-tower's own parameters
        (not the heuristic part's, whose changes then cost no retraining)."""
        digest = hashlib.sha256(repr((self.embedding_dim, self.lr, self.epochs, self.batch_size, self.temperature,
                                      self.weight_decay, self.user_id, self.content_layers, seed, dataset.train.shape)).encode())
        for matrix in (dataset.train, *([graph] if graph is not None else [])):
            digest.update(matrix_digest(matrix).encode())
        features = dataset.item_features.matrix if dataset.item_features is not None else np.zeros(0)
        for part in (features, self.attributes):
            digest.update(np.ascontiguousarray(part).tobytes())
        return digest.hexdigest()

    def _train(self, dataset: Dataset, graph: sp.csr_matrix | None, context: FitContext) -> tuple[TwoTowerNet, np.ndarray]:
        torch.manual_seed(context.seed)
        features = dataset.item_features.matrix if dataset.item_features is not None else None
        net = TwoTowerNet(dataset.n_users, dataset.n_items, self.embedding_dim, features,
                          [int(c.max()) + 1 for c in self.attributes.T], self.user_id, graph, self.content_layers)
        train = dataset.train.tocoo()
        counts = np.asarray(dataset.train.sum(axis=0)).ravel()
        log_popularity = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()
        users = torch.from_numpy(train.row.astype(np.int64))
        tensors = {
            "user": users,
            "item": torch.from_numpy(train.col.astype(np.int64)),
            "attributes": torch.from_numpy(self.attributes)[users],
        }
        module = _lightning_module(net, dataset.train, log_popularity, self.temperature, self.lr, self.weight_decay)
        fit_module(module, shuffled_batches(tensors, self.batch_size, context.seed), self.epochs, context.seed, context.progress)
        net = module.net.to(inference_device()).eval()
        return net, _item_vectors(net)

    def user_vectors(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        """User vectors from their rows of `history`."""
        device = inference_device()
        out = []
        with torch.inference_mode():
            for start in range(0, len(users), _BLOCK):
                block = users[start:start + _BLOCK]
                rows = history[block]
                bag = history_bag(torch.from_numpy(rows.indptr.astype(np.int64)).to(device),
                                  torch.from_numpy(rows.indices.astype(np.int64)).to(device),
                                  torch.arange(len(block), device=device))
                vectors = self.net.users(
                    torch.from_numpy(block.astype(np.int64)).to(device), bag,
                    torch.from_numpy(self.attributes[block]).to(device), torch.full((len(block),), self.net.pad, device=device),
                )
                out.append(vectors.float().cpu().numpy())
        return np.vstack(out) if out else np.zeros((0, self.embedding_dim), np.float32)

    def candidates(self, users: np.ndarray, k: int, history: sp.csr_matrix) -> Candidates:
        if self.heuristic is None:
            search = faiss_top_k if len(self.item_vectors) > FAISS_ABOVE_ITEMS else blocked_top_k
            return search(self.user_vectors(users, history), self.item_vectors, k, history[users])
        vectors, rows = torch.from_numpy(self.user_vectors(users, history)), history[users]
        table = torch.from_numpy(self.item_vectors).T.contiguous()

        def scores(block: np.ndarray) -> torch.Tensor:
            closed_form = torch.from_numpy(np.asarray(self.heuristic.scores(rows[block]), dtype=np.float32))
            return standardised(vectors[block] @ table).add_(standardised(closed_form), alpha=self.heuristic_weight)

        return top_k_in_blocks(scores, np.arange(len(users)), k, rows, rows_per_block(len(self.item_vectors)))


def _item_vectors(net: TwoTowerNet) -> np.ndarray:
    with torch.inference_mode():
        return net.items(torch.arange(net.item_id.num_embeddings, device=inference_device())).float().cpu().numpy()


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """Each row centred and scaled to unit deviation over the catalogue, in place, so two
    models' scores add. Centred first, then a norm: 1.2 ms a block of 283 × 7,050 where
    torch.std_mean took 9 ms (2 cores, 2026-12-02)."""
    scores.sub_(scores.mean(dim=1, keepdim=True))
    deviation = torch.linalg.vector_norm(scores, dim=1, keepdim=True).div_(scores.shape[1] ** 0.5)
    return scores.div_(torch.where(deviation > 0, deviation, torch.ones_like(deviation)))
