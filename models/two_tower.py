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

from rectune.models.base import Candidates, FitContext, RecallModel, matrix_digest, remembered, rows_per_block, top_k_in_blocks
from rectune.models.content import fused_graph
from rectune.models.dataset import Dataset
from rectune.models.heuristic import HeuristicRecall
from rectune.models.metrics import in_rows
from rectune.models.training import adam, fit_module, history_bag, inference_device, shuffled_batches

_BLOCK = 4096
# Users per FAISS search: keeps the ~1,000-wide temporaries small enough to reuse memory.
_SEARCH_BLOCK = 4096
CONTENT_HOP_WEIGHT = 2.0
"""Weight of each content-graph hop in the smoothed tables (on Baby validation, 2 and 4
gave the same Recall@20 at two hops, .0955 and .0950)."""
_TRAINED_KEPT = 8
"""Trained towers kept in memory: the default's, the one DeepFM fits on a held-out split, and a
study's recent ones — ~10 MB each at embedding_dim 64 (~80 MB at 512). With two, the main job
trained embedding_dim=45 again (21 s) for a trial that changed only the heuristic part's
cf_weight, three trials after its first training."""
_trained: dict[str, tuple["TwoTowerNet", np.ndarray]] = {}
"""Trained towers and their item vectors, newest last: a study that moves only the heuristic
part's weights reuses them instead of training again (~30 s on Baby)."""
FAISS_ABOVE_ITEMS = 50_000
"""Exact search takes FAISS for catalogues larger than this, a blocked matmul + top-k up to it
(measured in bench/serving.py)."""


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
    blend: StandardisedBlend | None = field(default=None, init=False)

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
            # Its precomputed parts (S's row means, S·prior) take ~0.1 s on Baby: once per fit, not per call.
            self.blend = StandardisedBlend(self.item_vectors, self.heuristic.similarity, self.heuristic.prior,
                                           self.heuristic_weight)

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
        if self.blend is None:
            search = faiss_top_k if len(self.item_vectors) > FAISS_ABOVE_ITEMS else blocked_top_k
            return search(self.user_vectors(users, history), self.item_vectors, k, history[users])
        vectors, rows = torch.from_numpy(self.user_vectors(users, history)), history[users]
        return top_k_in_blocks(lambda block: self.blend(vectors[block], rows[block]), np.arange(len(users)), k, rows,
                               rows_per_block(len(self.item_vectors)))


def _item_vectors(net: TwoTowerNet) -> np.ndarray:
    with torch.inference_mode():
        return net.items(torch.arange(net.item_id.num_embeddings, device=inference_device())).float().cpu().numpy()


class StandardisedBlend:
    """standardised(user vectors · item vectors) + weight · standardised(history · S + prior), each
    standardised per user over the catalogue (centred, unit population deviation), in one pass
    per product: the row means and deviations come in closed form — the two-tower's from the
    item vectors' mean and covariance, the heuristic's from its product's norm — and the scaling,
    the centring and the popularity prior ride in the two-tower's matmul as two extra inner
    columns. Standardising each score block in place, then adding, made six more passes over
    every block: serving top-50 to every Baby user took 2.32 s against 1.91–2.03 s now, 1.07–1.15×
    the two products alone (bench/serving.py, 2026-12-02)."""

    def __init__(self, item_vectors: np.ndarray, similarity: np.ndarray, prior: np.ndarray, weight: float):
        self.n_items = len(item_vectors)
        items = torch.from_numpy(item_vectors).double()
        self.item_mean = items.mean(dim=0)
        centred = items - self.item_mean
        self.item_covariance = centred.T @ centred / self.n_items
        self.similarity, self.weight = similarity, weight
        self.similarity_row_mean = similarity.mean(axis=1, dtype=np.float64)
        prior_mean = float(prior.mean(dtype=np.float64))
        centred_prior = prior.astype(np.float64) - prior_mean
        self.prior_mean, self.prior_square = prior_mean, float(centred_prior @ centred_prior)
        self.similarity_centred_prior = similarity @ centred_prior.astype(np.float32)
        # items × (dimension + 2): the two extra rows multiply each user's prior weight and offset.
        self.extended_items = torch.cat([torch.from_numpy(item_vectors).T, torch.from_numpy(prior)[None, :],
                                         torch.ones(1, self.n_items)]).contiguous()

    def __call__(self, user_vectors: torch.Tensor, history: sp.csr_matrix) -> torch.Tensor:
        product = torch.from_numpy(np.asarray(history @ self.similarity, dtype=np.float32))
        users = user_vectors.double()
        learned_mean = users @ self.item_mean
        learned_deviation = ((users @ self.item_covariance) * users).sum(dim=1).clamp_min(0).sqrt()
        product_mean = torch.from_numpy(np.asarray(history @ self.similarity_row_mean).ravel())
        # |history·S + prior − its mean|² = |h·S|² − n·mean(h·S)² + 2 h·S·(prior − its mean) + |prior − its mean|²
        square = (torch.linalg.vector_norm(product, dim=1).double().square() - self.n_items * product_mean.square()
                  + 2 * torch.from_numpy(np.asarray(history @ self.similarity_centred_prior, dtype=np.float64).ravel())
                  + self.prior_square)
        closed_form_deviation = (square.clamp_min(0) / self.n_items).sqrt()
        learned_scale = 1 / _nonzero(learned_deviation)
        closed_form_scale = self.weight / _nonzero(closed_form_deviation)
        offset = -learned_mean * learned_scale - closed_form_scale * (product_mean + self.prior_mean)
        coefficients = torch.cat([users * learned_scale[:, None], closed_form_scale[:, None], offset[:, None]], dim=1)
        return product.mul_(closed_form_scale.float()[:, None]).addmm_(coefficients.float(), self.extended_items)


def _nonzero(deviation: torch.Tensor) -> torch.Tensor:
    """A constant row (deviation 0) stays all zeros after centring: divide it by 1."""
    return torch.where(deviation > 0, deviation, torch.ones_like(deviation))
