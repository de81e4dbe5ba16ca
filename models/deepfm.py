"""DeepFM ranker.

Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction"
(IJCAI 2017): one embedding per field shared by an FM part (first order + second order
in the O(k·n) form ½(‖Σe‖² − Σ‖e‖²)) and a deep MLP over the concatenated embeddings.

Fields: user activity bucket (user side; not the user group, which is a way to read the
metrics and must not change the model); item popularity bucket, item categories (mean of
category embeddings, when the dataset has them), item content vector (a linear projection
of its features and of the spectral embedding of the content graphs,
`models.content.item_content_matrix`) (item side); and two continuous pair fields, the
recall score and the log rank in the candidate list (each scales its own embedding).
No user or item id: the ranker learns from one list per held-out item (~11k on Baby), and
id embeddings memorised them — with them, validation loss rose after the second epoch and
validation Recall@20 of heuristic+deepfm stayed below its recall alone (Baby .0903 at its
best epoch count vs .0937; MovieLens-100K .3423 vs .3694); without, it is above (.0941,
.3710) and its validation loss falls for 10 epochs (at a learning rate of .001).

Trained as it serves, on candidate lists: a second recall stage is fitted on train minus
a held-out share of each user's items; for each held-out item among its top
`negative_pool` candidates, the loss is a softmax over the user's list — the held-out item
against `negatives` candidates drawn uniformly from the same list, with sampled softmax's
correction (Bengio & Senécal 2008; Jean et al. 2015) so it estimates the softmax over the
whole list. A listwise loss compares candidates of one user with each other, which is what
ranking asks. The pointwise logistic loss it replaced (`negatives` = 4 per positive) let
deep candidates into the top 20 as K grew, below the recall alone at every K (Baby
validation Recall@20 of heuristic+deepfm .0883 at K=500, .0693 at K=2000; recall alone
.0937; two_tower+deepfm .1015 and .0874 against .1071). Listwise, Recall@20 stays level from
K=100 to 2000 (.0941; two_tower+deepfm .1071, tying its recall), and Recall@50 of
heuristic+deepfm rises above the recall alone's .1451 (.1502 at K=100, .1529–.1534 at K ≥ 500).

Serving scores K candidates for many users. Because the first MLP layer is linear in the
concatenated embeddings, it splits into a user part, an item part and a pair part that
are computed once per user / item; the FM cross terms split the same way. The result is
the same function (a test checks it against the plain forward) at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

import torch
from torch import nn
from torch.nn import functional as F

from rectune.models.base import Candidates, FitContext, Ranker
from rectune.models.content import item_content_matrix
from rectune.models.dataset import Dataset
from rectune.models.errors import ConfigError
from rectune.models.metrics import in_rows
from rectune.models.training import adam, batches_in_order, fit_module, inference_device, shuffled_batches

# Candidates scored per block: small enough that the hidden activations stay in cache
# (measured on 2 cores: 4k pairs per block ran 2.3x faster than 64k).
_PAIRS_PER_BLOCK = 4096
_MAX_CATEGORIES = 1000
# Share of each user's train items held out to label the ranker's training lists. The runner
# caches the recall stage fitted without them: changing the share or the draw means bumping
# tools/cache.STAGE_FORMAT, or stale held-out stages are loaded from disk.
_HOLDOUT_SHARE = 0.2
VALIDATION_USERS = 2000
"""Validation users whose candidate lists give the ranker's validation loss after each epoch."""
_VALIDATION_STREAM = 1


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


def fm_second_order(vectors: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} ⟨v_i, v_j⟩ over the fields of each row (batch × fields × dim → batch), in
    the O(k·n) form ½(‖Σv‖² − Σ‖v‖²)."""
    return 0.5 * (vectors.sum(dim=1).pow(2) - vectors.pow(2).sum(dim=1)).sum(dim=-1)


class DeepFMNet(nn.Module):
    user_fields = ("activity",)
    item_fields = ("popularity",)

    def __init__(self, sizes: dict, dim: int, hidden: tuple[int, ...], dropout: float, categories: np.ndarray | None,
                 content: np.ndarray | None, n_pair_fields: int):
        super().__init__()
        self.embed = nn.ModuleDict({f: nn.Embedding(sizes[f], dim) for f in self.user_fields + self.item_fields})
        self.first = nn.ModuleDict({f: nn.Embedding(sizes[f], 1) for f in self.user_fields + self.item_fields})
        self.register_buffer("categories", torch.from_numpy(categories) if categories is not None else torch.zeros(0, 0))
        self.register_buffer("content", torch.from_numpy(content).float() if content is not None else torch.zeros(0, 0))
        self.category_embed = nn.Linear(self.categories.shape[1], dim, bias=False) if categories is not None else None
        self.category_first = nn.Linear(self.categories.shape[1], 1, bias=False) if categories is not None else None
        self.content_embed = nn.Linear(self.content.shape[1], dim) if content is not None else None
        self.content_first = nn.Linear(self.content.shape[1], 1, bias=False) if content is not None else None
        # Continuous (user, item)-pair fields: each value scales its own embedding.
        self.pair_embed = nn.Parameter(torch.randn(n_pair_fields, dim) * 0.01)
        self.pair_first = nn.Parameter(torch.zeros(n_pair_fields))
        self.bias = nn.Parameter(torch.zeros(1))
        self.n_user_fields = len(self.user_fields)
        self.n_item_fields = len(self.item_fields) + (categories is not None) + (content is not None)
        widths = [dim * (self.n_user_fields + self.n_item_fields + n_pair_fields), *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(widths[-1], 1)
        self.dropout = nn.Dropout(dropout)
        for table in self.embed.values():
            nn.init.normal_(table.weight, std=0.01)
        for table in self.first.values():
            nn.init.zeros_(table.weight)

    def user_side(self, activity):
        values = {"activity": activity}
        vectors = torch.stack([self.embed[f](values[f]) for f in self.user_fields], dim=1)
        first = sum(self.first[f](values[f]).squeeze(-1) for f in self.user_fields)
        return vectors, first

    def item_side(self, item, popularity):
        values = {"popularity": popularity}
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
        h = self.dropout(torch.relu(first_layer_output) if self.training else first_layer_output.relu_())
        for layer in self.layers[1:]:
            h = self.dropout(torch.relu(layer(h)))
        return self.output(h).squeeze(-1)

    def forward(self, activity, item, popularity, pair):
        """The plain DeepFM forward over a batch of rows; `pair` is (batch × pair fields)."""
        user_vectors, user_first = self.user_side(activity)
        item_vectors, item_first = self.item_side(item, popularity)
        fields = torch.cat([user_vectors, item_vectors, pair.unsqueeze(-1) * self.pair_embed], dim=1)
        first = self.bias + user_first + item_first + pair @ self.pair_first
        return first + fm_second_order(fields) + self.deep(self.layers[0](fields.flatten(1)))

    def user_parts(self, activity):
        vectors, first = self.user_side(activity)
        width = vectors.shape[1] * vectors.shape[2]
        hidden = vectors.flatten(1) @ self.layers[0].weight[:, :width].T + self.layers[0].bias
        return vectors.sum(1), fm_second_order(vectors), first, hidden

    def item_parts(self, item, popularity):
        """Per item: [first-layer part (h) | Σe·e_pair (P) | Σe (d) | own FM + first order (1)]."""
        vectors, first = self.item_side(item, popularity)
        offset = self.n_user_fields * vectors.shape[2]
        width = vectors.shape[1] * vectors.shape[2]
        hidden = vectors.flatten(1) @ self.layers[0].weight[:, offset:offset + width].T
        item_sum = vectors.sum(1)
        own = fm_second_order(vectors) + first
        return torch.cat([hidden, item_sum @ self.pair_embed.T, item_sum, own.unsqueeze(1)], dim=1).contiguous()

    def score_candidates(self, user_parts, item_table, items, pair):
        """forward() for users × K candidates, from per-user and per-item precomputations.

        The first layer splits into user, item and pair blocks; the FM term
        ½(‖Σe‖² − Σ‖e‖²) splits into each side's own term plus dot products across
        sides, and the pair fields' dot products reduce to their P × P Gram matrix.
        """
        u_sum, u_own, u_first, u_hidden = user_parts
        n_users, k = items.shape
        h, d, p = u_hidden.shape[1], u_sum.shape[1], self.pair_embed.shape[0]
        rows = F.embedding(items, item_table)
        pair_weight = (self.layers[0].weight[:, -p * d:].reshape(h, p, d) * self.pair_embed).sum(-1)  # h × P
        hidden = torch.baddbmm(u_hidden.unsqueeze(1) + rows[..., :h], pair, pair_weight.T.expand(n_users, p, h))
        gram = self.pair_embed @ self.pair_embed.T
        pair_own = 0.5 * (((pair @ gram) * pair).sum(-1) - pair.pow(2) @ gram.diagonal())
        cross = torch.bmm(rows[..., h + p:h + p + d], u_sum.unsqueeze(-1)).squeeze(-1) \
            + (pair * (rows[..., h:h + p] + (u_sum @ self.pair_embed.T).unsqueeze(1))).sum(-1)
        first = self.bias + (u_first + u_own).unsqueeze(1) + rows[..., -1] + pair @ self.pair_first
        return first + pair_own + cross + self.deep(hidden)



def _lightning_module(net, lr: float):
    import lightning.pytorch as pl

    class ListwiseRanker(pl.LightningModule):
        """Sampled softmax over candidate lists (the held-out item in slot 0); keeps its
        curve — the mean training loss of each epoch and the loss on the validation lists after it."""

        def __init__(self):
            super().__init__()
            self.net = net
            self.train_losses, self.val_losses = [], []
            self._train_parts, self._val_parts = [], []

        def _loss(self, batch, reduction: str = "mean"):
            lists, length = batch["item"].shape
            logits = self.net(batch["activity"].repeat_interleave(length), batch["item"].flatten(),
                              batch["popularity"].flatten(), batch["pair"].flatten(0, 1))
            logits = logits.view(lists, length) + batch["offset"]
            return F.cross_entropy(logits, torch.zeros(lists, dtype=torch.long, device=logits.device), reduction=reduction)

        def training_step(self, batch, _):
            loss = self._loss(batch)
            self.log("loss", loss, prog_bar=True)
            # Kept as tensors, summed once an epoch: no device sync per step.
            self._train_parts.append((loss.detach() * len(batch["item"]), len(batch["item"])))
            return loss

        def on_train_epoch_end(self):
            self.train_losses.append(_mean(self._train_parts))
            self._train_parts = []

        def validation_step(self, batch, _):
            self._val_parts.append((self._loss(batch, "sum"), len(batch["item"])))

        def on_validation_epoch_end(self):
            self.val_losses.append(_mean(self._val_parts))
            self._val_parts = []

        def configure_optimizers(self):
            return adam(self.parameters(), lr)

    return ListwiseRanker()


def _mean(parts: list[tuple[torch.Tensor, int]]) -> float:
    """The per-example mean of (sum of losses, examples) parts."""
    return float(sum(total for total, _ in parts)) / max(sum(count for _, count in parts), 1)


@dataclass
class DeepFMRanker(Ranker):
    embedding_dim: int
    hidden: tuple[int, ...]
    dropout: float
    lr: float
    epochs: int
    batch_size: int
    negatives: int
    negative_pool: int
    net: DeepFMNet | None = field(default=None, init=False)
    curve: list[dict] = field(default_factory=list, init=False)
    """Per epoch: the mean training loss and the loss on validation lists (sampled softmax
    per list) — whether more epochs would help or the ranker overfits."""

    def _training_lists(self, dataset: Dataset, fit_recall, context: FitContext):
        """Lists to learn from (see `_labelled`), and the recall stage that made them.

        A recall stage scores its own training pairs too well to teach a ranker what an
        unseen relevant item looks like. So a fresh recall stage is fitted on train minus a
        held-out share of each user's items; its candidate lists, with the held-out items
        as positives and the other candidates as negatives, are exactly what the ranker
        meets at serving time, scores and ranks included.
        """
        rng = np.random.default_rng(context.seed)
        train = dataset.train.tocoo()
        counts = np.diff(dataset.train.indptr)
        order = np.lexsort((rng.random(train.nnz), train.row))
        position = np.arange(train.nnz) - np.repeat(dataset.train.indptr[:-1], counts)
        n_held = np.where(counts >= 2, np.maximum(1, np.floor(counts * _HOLDOUT_SHARE)), 0).astype(np.int64)
        held = np.zeros(train.nnz, dtype=bool)
        held[order] = position < np.repeat(n_held, counts)
        kept = sp.csr_matrix((train.data[~held], (train.row[~held], train.col[~held])), shape=train.shape)
        answers = sp.csr_matrix((train.data[held], (train.row[held], train.col[held])), shape=train.shape)

        recall = fit_recall(replace(dataset, train=kept))
        return self._labelled(recall, np.flatnonzero(n_held > 0), kept, answers, rng), recall

    def _labelled(self, recall, users: np.ndarray, history: sp.csr_matrix, answers: sp.csr_matrix, rng: np.random.Generator):
        """Lists to rank: one per answer among `users`' top `negative_pool` candidates from
        `history` — (users, items, recall scores, ranks, offsets), each row the answer in slot 0
        and `negatives` other candidates of that user's list drawn uniformly; `offsets` is what
        sampled softmax adds to each logit (−log of the draw's expected count, list size /
        negatives), so the loss estimates the softmax over the whole list; −inf for a draw that
        is also an answer."""
        pool = recall.candidates(users, self.negative_pool, history)
        labels = in_rows(answers[users], pool.items)
        rows, slots = np.nonzero(labels)
        sizes = (pool.items >= 0).sum(axis=1)[rows, None]
        drawn = (rng.random((len(rows), self.negatives)) * sizes).astype(np.int64)
        offsets = np.zeros((len(rows), 1 + self.negatives), dtype=np.float32)
        offsets[:, 1:] = np.log(sizes / self.negatives)
        offsets[:, 1:][labels[rows[:, None], drawn]] = -np.inf
        slots = np.concatenate([slots[:, None], drawn], axis=1)
        return (users[rows], pool.items[rows[:, None], slots], pool.scores[rows[:, None], slots].astype(np.float64),
                slots, offsets)

    def fit(self, dataset: Dataset, fit_recall, context: FitContext) -> None:
        torch.manual_seed(context.seed)
        user_counts = np.diff(dataset.train.indptr)
        item_counts = np.asarray(dataset.train.sum(axis=0)).ravel()
        self.activity = activity_buckets(user_counts)
        self.popularity = popularity_buckets(item_counts)
        sizes = {"activity": int(self.activity.max()) + 1, "popularity": 16}
        content = item_content_matrix(dataset)
        self.net = DeepFMNet(sizes, self.embedding_dim, self.hidden, self.dropout, category_matrix(dataset), content, 2)

        (users, items, scores, ranks, offsets), recall = self._training_lists(dataset, fit_recall, context)
        if not len(users):
            raise ConfigError(f"DeepFM has no positive to learn from: no held-out train item reached the top {self.negative_pool} candidates")
        finite = np.isfinite(scores)
        self.score_mean, self.score_std = float(scores[finite].mean()), float(scores[finite].std() or 1.0)
        log_ranks = np.log1p(ranks)
        self.rank_mean, self.rank_std = float(log_ranks.mean()), float(log_ranks.std() or 1.0)
        module = _lightning_module(self.net, self.lr)
        fit_module(module, shuffled_batches(self._tensors(users, items, scores, ranks, offsets), self.batch_size, context.seed),
                   self.epochs, context.seed, context.progress, self._validation_batches(dataset, recall, context.seed))
        self.net = module.net.to(inference_device()).eval()
        validated = module.val_losses or [None] * len(module.train_losses)
        self.curve = [{"epoch": epoch, "train_loss": round(train, 5), "val_loss": None if val is None else round(val, 5)}
                      for epoch, (train, val) in enumerate(zip(module.train_losses, validated), 1)]

    def _validation_batches(self, dataset: Dataset, recall, seed: int):
        """Batches of labelled candidate lists of up to VALIDATION_USERS validation users (their
        validation items the answers), from the recall stage the training lists came from; None
        without validation items. A random stream of their own: the training lists stay as they were."""
        users = np.flatnonzero(np.diff(dataset.val.indptr) > 0)
        if not len(users):
            return None
        rng = np.random.default_rng([seed, _VALIDATION_STREAM])
        users = np.sort(rng.choice(users, min(len(users), VALIDATION_USERS), replace=False))
        found = self._labelled(recall, users, dataset.train, dataset.val, rng)
        if not len(found[0]):
            return None
        return batches_in_order(self._tensors(*found), self.batch_size)

    def _tensors(self, users, items, scores, ranks, offsets) -> dict:
        return {
            "item": torch.from_numpy(items),
            "activity": torch.from_numpy(self.activity[users]),
            "popularity": torch.from_numpy(self.popularity[items]),
            "pair": torch.from_numpy(self.pair_features(scores, ranks)), "offset": torch.from_numpy(offsets),
        }

    def pair_features(self, scores: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Standardised recall score and log rank in the candidate list (the rank is
        comparable across users, the raw score is not), stacked on the last axis."""
        score = np.nan_to_num((scores - self.score_mean) / self.score_std, neginf=-10.0, posinf=10.0)
        rank = (np.log1p(ranks) - self.rank_mean) / self.rank_std
        return np.stack([score, rank], axis=-1).astype(np.float32)

    def scores(self, users: np.ndarray, candidates: Candidates) -> np.ndarray:
        """DeepFM logits of every candidate (empty slots get −inf)."""
        device = inference_device()
        out = np.empty(candidates.items.shape, dtype=np.float32)
        ranks = np.broadcast_to(np.arange(candidates.items.shape[1]), candidates.items.shape)
        with torch.inference_mode():
            all_items = torch.arange(len(self.popularity), device=device)
            item_table = self.net.item_parts(all_items, torch.from_numpy(self.popularity).to(device))
            step = max(1, _PAIRS_PER_BLOCK // max(candidates.items.shape[1], 1))
            for start in range(0, len(users), step):
                block = slice(start, start + step)
                user_parts = self.net.user_parts(torch.from_numpy(self.activity[users[block]]).to(device))
                logits = self.net.score_candidates(
                    user_parts, item_table, torch.from_numpy(np.maximum(candidates.items[block], 0)).to(device),
                    torch.from_numpy(self.pair_features(candidates.scores[block], ranks[block])).to(device),
                )
                out[block] = logits.float().cpu().numpy()
        out[candidates.items < 0] = -np.inf
        return out

    def rank(self, users: np.ndarray, candidates: Candidates, length: int) -> np.ndarray:
        scores = torch.from_numpy(self.scores(users, candidates))
        order = torch.topk(scores, min(length, scores.shape[1]), dim=1, sorted=True).indices.numpy()
        return np.take_along_axis(candidates.items, order, axis=1)
