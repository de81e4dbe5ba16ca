"""DeepFM ranker.

Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction"
(IJCAI 2017): one embedding per field shared by an FM part (first order + second order
in the O(k·n) form ½(‖Σe‖² − Σ‖e‖²)) and a deep MLP over the concatenated embeddings.

Fields: user id, user activity bucket, user group (user side); item id, item popularity
bucket, item categories (mean of category embeddings, when the dataset has them), item
content vector (a linear projection, when it has features) (item side); and the recall
score (a continuous field: its embedding is scaled by the standardised score).

Trained on train positives against negatives drawn half from the user's top
`negative_pool` recall candidates (hard) and half uniformly (easy). Positive pairs get
their recall score with the item left out of the user's history, as unseen candidates do.

Serving scores K candidates for many users. Because the first MLP layer is linear in the
concatenated embeddings, it splits into a user part, an item part and a score part that
are computed once per user / item; the FM cross terms split the same way. The result is
the same function (a test checks it against the plain forward) at a fraction of the cost.
"""

from __future__ import annotations

import numpy as np

from models.base import Candidates, FitContext, RecallModel, Ranker
from models.dataset import Dataset
from models.training import contains, fit_module, inference_device, shuffled_batches

_USER_BLOCK = 512
_MAX_CATEGORIES = 1000


def activity_buckets(counts: np.ndarray, n_buckets: int = 10) -> np.ndarray:
    edges = np.unique(np.quantile(counts, np.linspace(0, 1, n_buckets + 1)[1:-1]))
    return np.searchsorted(edges, counts, side="right").astype(np.int64)


def popularity_buckets(counts: np.ndarray) -> np.ndarray:
    return np.minimum(np.floor(np.log2(counts + 1.0)), 15).astype(np.int64)


def category_matrix(dataset: Dataset) -> np.ndarray | None:
    """Items × categories, rows summing to 1 (mean of an item's category embeddings)."""
    if not dataset.item_categories or not any(dataset.item_categories):
        return None
    counts: dict[str, int] = {}
    for cats in dataset.item_categories:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    vocabulary = {c: j for j, c in enumerate(sorted(counts, key=lambda c: (-counts[c], c))[:_MAX_CATEGORIES])}
    matrix = np.zeros((dataset.n_items, len(vocabulary)), dtype=np.float32)
    for i, cats in enumerate(dataset.item_categories):
        for c in cats:
            if c in vocabulary:
                matrix[i, vocabulary[c]] = 1.0
    return matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)


def _build_net(sizes: dict, dim: int, hidden: tuple[int, ...], dropout: float, categories, content):
    import torch
    from torch import nn

    class DeepFMNet(nn.Module):
        user_fields = ("user", "activity", "group")
        item_fields = ("item", "popularity")

        def __init__(self):
            super().__init__()
            self.embed = nn.ModuleDict({f: nn.Embedding(sizes[f], dim) for f in self.user_fields + self.item_fields})
            self.first = nn.ModuleDict({f: nn.Embedding(sizes[f], 1) for f in self.user_fields + self.item_fields})
            self.register_buffer("categories", torch.from_numpy(categories) if categories is not None else torch.zeros(0, 0))
            self.register_buffer("content", torch.from_numpy(content).float() if content is not None else torch.zeros(0, 0))
            self.category_embed = nn.Linear(self.categories.shape[1], dim, bias=False) if categories is not None else None
            self.category_first = nn.Linear(self.categories.shape[1], 1, bias=False) if categories is not None else None
            self.content_embed = nn.Linear(self.content.shape[1], dim) if content is not None else None
            self.content_first = nn.Linear(self.content.shape[1], 1, bias=False) if content is not None else None
            self.score_embed = nn.Parameter(torch.randn(dim) * 0.01)
            self.score_first = nn.Parameter(torch.zeros(1))
            self.bias = nn.Parameter(torch.zeros(1))
            n_item_fields = 2 + (categories is not None) + (content is not None)
            self.n_user_fields = len(self.user_fields)
            self.n_item_fields = n_item_fields
            widths = [dim * (self.n_user_fields + n_item_fields + 1), *hidden]
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
            self.output = nn.Linear(widths[-1], 1)
            self.dropout = nn.Dropout(dropout)
            for table in self.embed.values():
                nn.init.normal_(table.weight, std=0.01)
            for table in self.first.values():
                nn.init.zeros_(table.weight)

        def user_side(self, user, activity, group):
            values = {"user": user, "activity": activity, "group": group}
            vectors = torch.stack([self.embed[f](values[f]) for f in self.user_fields], dim=1)
            first = sum(self.first[f](values[f]).squeeze(-1) for f in self.user_fields)
            return vectors, first

        def item_side(self, item, popularity):
            values = {"item": item, "popularity": popularity}
            vectors = [self.embed[f](values[f]) for f in self.item_fields]
            first = sum(self.first[f](values[f]).squeeze(-1) for f in self.item_fields)
            if self.category_embed is not None:
                vectors.append(self.category_embed(self.categories[item]))
                first = first + self.category_first(self.categories[item]).squeeze(-1)
            if self.content_embed is not None:
                vectors.append(self.content_embed(self.content[item]))
                first = first + self.content_first(self.content[item]).squeeze(-1)
            return torch.stack(vectors, dim=1), first

        def deep(self, first_layer_output):
            h = self.dropout(torch.relu(first_layer_output))
            for layer in self.layers[1:]:
                h = self.dropout(torch.relu(layer(h)))
            return self.output(h).squeeze(-1)

        def forward(self, user, activity, group, item, popularity, score):
            """The plain DeepFM forward over a batch of (user, item, score) rows."""
            user_vectors, user_first = self.user_side(user, activity, group)
            item_vectors, item_first = self.item_side(item, popularity)
            fields = torch.cat([user_vectors, item_vectors, (score.unsqueeze(-1) * self.score_embed).unsqueeze(1)], dim=1)
            first = self.bias + user_first + item_first + score * self.score_first
            second = 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=-1)
            return first + second + self.deep(self.layers[0](fields.flatten(1)))

        def score_candidates(self, user_parts, item_parts, items, score):
            """forward() for users × K candidates, from per-user and per-item precomputations."""
            u_sum, u_square, u_first, u_hidden = user_parts
            i_sum, i_square, i_first, i_hidden = item_parts
            d = self.score_embed.shape[0]
            score_hidden = self.layers[0].weight[:, -d:] @ self.score_embed
            hidden = u_hidden.unsqueeze(1) + i_hidden[items] + score.unsqueeze(-1) * score_hidden
            item_sum = i_sum[items]
            # ½(‖Σe‖² − Σ‖e‖²) with Σe = u + i + s·e_s: the s²‖e_s‖² terms cancel.
            second = (0.5 * (u_sum.pow(2).sum(-1) - u_square)).unsqueeze(1) + i_square[items] \
                + (u_sum.unsqueeze(1) * item_sum).sum(-1) \
                + score * ((u_sum @ self.score_embed).unsqueeze(1) + item_sum @ self.score_embed)
            first = self.bias + u_first.unsqueeze(1) + i_first[items] + score * self.score_first
            return first + second + self.deep(hidden)

        def user_parts(self, user, activity, group):
            vectors, first = self.user_side(user, activity, group)
            width = vectors.shape[1] * vectors.shape[2]
            hidden = vectors.flatten(1) @ self.layers[0].weight[:, :width].T + self.layers[0].bias
            return vectors.sum(1), vectors.pow(2).sum((1, 2)), first, hidden

        def item_parts(self, item, popularity):
            vectors, first = self.item_side(item, popularity)
            offset = self.n_user_fields * vectors.shape[2]
            width = vectors.shape[1] * vectors.shape[2]
            hidden = vectors.flatten(1) @ self.layers[0].weight[:, offset:offset + width].T
            item_sum = vectors.sum(1)
            return item_sum, 0.5 * (item_sum.pow(2).sum(-1) - vectors.pow(2).sum((1, 2))), first, hidden

    return DeepFMNet()


def _lightning_module(net, lr: float):
    import lightning.pytorch as pl
    import torch
    from torch.nn import functional as F

    class BinaryRanker(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            logits = self.net(batch["user"], batch["activity"], batch["group"], batch["item"], batch["popularity"], batch["score"])
            loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

    return BinaryRanker()


class DeepFMRanker(Ranker):
    def __init__(self, embedding_dim: int, hidden: tuple[int, ...], dropout: float, lr: float, epochs: int,
                 batch_size: int, negatives: int, negative_pool: int):
        self.embedding_dim = embedding_dim
        self.hidden = tuple(hidden)
        self.dropout = dropout
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.negatives = negatives
        self.negative_pool = negative_pool
        self.net = None

    def _training_pairs(self, dataset: Dataset, recall: RecallModel, seed: int):
        rng = np.random.default_rng(seed)
        train = dataset.train.tocoo()
        pos_users, pos_items = train.row.astype(np.int64), train.col.astype(np.int64)
        pos_scores = recall.score_pairs(pos_users, pos_items, dataset.train)
        n_hard = self.negatives - self.negatives // 2
        pool = recall.candidates(np.arange(dataset.n_users), self.negative_pool, dataset.train)
        pool_sizes = (pool.items >= 0).sum(axis=1)
        hard_users = np.repeat(pos_users, n_hard)
        hard_users = hard_users[pool_sizes[hard_users] > 0]
        slots = (rng.random(len(hard_users)) * pool_sizes[hard_users]).astype(np.int64)
        hard_items, hard_scores = pool.items[hard_users, slots], pool.scores[hard_users, slots]
        easy_users = np.repeat(pos_users, self.negatives // 2)
        easy_items = rng.integers(0, dataset.n_items, len(easy_users))
        unseen = ~contains(dataset.train, easy_users, easy_items)
        easy_users, easy_items = easy_users[unseen], easy_items[unseen]
        easy_scores = recall.score_pairs(easy_users, easy_items, dataset.train)
        users = np.concatenate([pos_users, hard_users, easy_users])
        items = np.concatenate([pos_items, hard_items, easy_items])
        scores = np.concatenate([pos_scores, hard_scores, easy_scores]).astype(np.float64)
        labels = np.concatenate([np.ones(len(pos_users)), np.zeros(len(hard_users) + len(easy_users))])
        return users, items, scores, labels

    def fit(self, dataset: Dataset, recall: RecallModel, context: FitContext) -> None:
        import torch

        torch.manual_seed(context.seed)
        user_counts = np.diff(dataset.train.indptr)
        item_counts = np.asarray(dataset.train.sum(axis=0)).ravel()
        self.activity = activity_buckets(user_counts)
        self.popularity = popularity_buckets(item_counts)
        self.group = np.zeros(dataset.n_users, np.int64) if context.group_codes is None else np.asarray(context.group_codes, np.int64)
        sizes = {"user": dataset.n_users, "item": dataset.n_items, "activity": int(self.activity.max()) + 1,
                 "popularity": 16, "group": int(self.group.max()) + 1}
        content = dataset.item_features.matrix if dataset.item_features is not None else None
        self.net = _build_net(sizes, self.embedding_dim, self.hidden, self.dropout, category_matrix(dataset), content)

        users, items, scores, labels = self._training_pairs(dataset, recall, context.seed)
        finite = np.isfinite(scores)
        self.score_mean, self.score_std = float(scores[finite].mean()), float(scores[finite].std() or 1.0)
        tensors = {
            "user": torch.from_numpy(users), "item": torch.from_numpy(items),
            "activity": torch.from_numpy(self.activity[users]), "group": torch.from_numpy(self.group[users]),
            "popularity": torch.from_numpy(self.popularity[items]),
            "score": torch.from_numpy(self._standardise(scores)), "label": torch.from_numpy(labels.astype(np.float32)),
        }
        module = _lightning_module(self.net, self.lr)
        fit_module(module, shuffled_batches(tensors, self.batch_size, context.seed), self.epochs, context.seed, context.progress)
        self.net = module.net.to(inference_device()).eval()

    def _standardise(self, scores: np.ndarray) -> np.ndarray:
        return np.nan_to_num((scores - self.score_mean) / self.score_std, neginf=-10.0).astype(np.float32)

    def scores(self, users: np.ndarray, candidates: Candidates) -> np.ndarray:
        """DeepFM logits of every candidate (empty slots get −inf)."""
        import torch

        device = inference_device()
        out = np.empty(candidates.items.shape, dtype=np.float32)
        with torch.inference_mode():
            all_items = torch.arange(len(self.popularity), device=device)
            item_parts = self.net.item_parts(all_items, torch.from_numpy(self.popularity).to(device))
            for start in range(0, len(users), _USER_BLOCK):
                block = users[start:start + _USER_BLOCK]
                user_parts = self.net.user_parts(*(torch.from_numpy(a).to(device) for a in (block.astype(np.int64), self.activity[block], self.group[block])))
                items = candidates.items[start:start + _USER_BLOCK]
                logits = self.net.score_candidates(
                    user_parts, item_parts, torch.from_numpy(np.maximum(items, 0)).to(device),
                    torch.from_numpy(self._standardise(candidates.scores[start:start + _USER_BLOCK])).to(device),
                )
                out[start:start + _USER_BLOCK] = logits.float().cpu().numpy()
        out[candidates.items < 0] = -np.inf
        return out

    def rank(self, users: np.ndarray, candidates: Candidates) -> np.ndarray:
        order = np.argsort(-self.scores(users, candidates), axis=1, kind="stable")
        return np.take_along_axis(candidates.items, order, axis=1)
