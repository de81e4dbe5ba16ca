"""Item content as per-modality item-item kNN graphs.

Content arrives in two shapes, and both end as one graph per modality (item × item CSR,
row i = item i's nearest neighbours weighted by cosine, no self-loop):

- neighbour lists (`item_knn.tsv[.gz]`: `asin neighbor_asin modality cosine`), such as the
  frozen text and image graphs MMRec's FREEDOM and MGCN build for Amazon Baby. They are
  read as they are: a list cannot be made longer than the file has.
- feature matrices (MMRec `text_feat.npy` / `image_feat.npy`, MiniLM embeddings of item
  text): each item keeps its `GRAPH_NEIGHBORS` most similar items by exact inner-product
  search of the L2-normalised rows (FAISS `IndexFlatIP` when installed, else a blocked
  matmul with the same result), cached on disk under a hash of the matrix.

Consumers (the heuristic recall) cut the graphs to fewer neighbours per item with
`top_neighbours` and normalise them as they need.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from rectune.models.dataset import Dataset, ItemContent
from rectune.models.errors import DataError

NEIGHBOUR_COLUMNS = ("asin", "neighbor_asin", "modality", "cosine")
NEIGHBOUR_FILES = ("item_knn.tsv.gz", "item_knn.tsv")
GRAPH_NEIGHBORS = 500
"""Neighbours per item kept when a graph is built from features (the search space's
`neighbors` can ask for up to this many)."""
EMBEDDING_DIM = 32
"""Width of the spectral embedding of the content graphs that rankers read."""
_COSINE_SLACK = 1e-6  # printed cosines of an item with itself read 1.000000 ± rounding
_BLOCK = 2048


def read_neighbour_lists(path: Path, item_ids: np.ndarray) -> ItemContent:
    """One kNN graph per modality from a neighbour file; every problem is one DataError line."""
    from rectune.models.loaders import _numeric, read_table

    frame = read_table(path, NEIGHBOUR_COLUMNS)
    index = pd.Index(np.asarray(item_ids).astype(str))
    rows, cols = index.get_indexer(frame["asin"]), index.get_indexer(frame["neighbor_asin"])
    for column, found in (("asin", rows), ("neighbor_asin", cols)):
        if (found < 0).any():
            line = int(np.flatnonzero(found < 0)[0])
            raise DataError(path, f"column {column!r} names an item the interactions do not have: "
                                  f"{frame[column].iloc[line]!r} (data row {line + 1})")
    cosine = _numeric(frame, "cosine", path).to_numpy(dtype=np.float64)
    outside = np.abs(cosine) > 1 + _COSINE_SLACK
    if outside.any():
        line = int(np.flatnonzero(outside)[0])
        raise DataError(path, f"column 'cosine' has {frame['cosine'].iloc[line]!r} outside [-1, 1] (data row {line + 1})")
    modality = frame["modality"].str.strip()
    if (modality == "").any():
        raise DataError(path, f"column 'modality' is blank in data row {int(np.flatnonzero(modality == '')[0]) + 1}")
    repeated = pd.DataFrame({"a": rows, "b": cols, "m": modality}).duplicated()
    if repeated.any():
        line = int(np.flatnonzero(repeated)[0])
        raise DataError(path, f"data row {line + 1} repeats the pair ({frame['asin'].iloc[line]!r}, "
                              f"{frame['neighbor_asin'].iloc[line]!r}) for modality {modality.iloc[line]!r}")
    graphs, sources = {}, {}
    n = len(index)
    for name in sorted(modality.unique()):
        keep = (modality == name).to_numpy() & (rows != cols)
        graphs[name] = sp.csr_matrix((cosine[keep].astype(np.float32), (rows[keep], cols[keep])), shape=(n, n))
        per_item = np.diff(graphs[name].indptr)
        sources[name] = f"{path.name}: up to {int(per_item.max())} neighbours per item, {int((per_item == 0).sum())} items without"
    return ItemContent(graphs=graphs, sources=sources)


def find_neighbour_file(directory: Path) -> Path | None:
    return next((directory / name for name in NEIGHBOUR_FILES if (directory / name).is_file()), None)


def top_neighbours(graph: sp.csr_matrix, neighbors: int) -> sp.csr_matrix:
    """Each row's `neighbors` largest entries (ties: the lower item index)."""
    graph = graph.tocsr()
    if np.diff(graph.indptr).max(initial=0) <= neighbors:
        return graph
    rows, cols, vals = [], [], []
    for row in range(graph.shape[0]):
        start, stop = graph.indptr[row], graph.indptr[row + 1]
        order = np.lexsort((graph.indices[start:stop], -graph.data[start:stop]))[:neighbors]
        rows.append(np.full(len(order), row))
        cols.append(graph.indices[start:stop][order])
        vals.append(graph.data[start:stop][order])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=graph.shape)


def normalised_graph(graph: sp.csr_matrix) -> sp.csr_matrix:
    """A kNN graph made symmetric (an edge either way, weighted by its larger positive
    cosine) and normalised as D^-1/2 A D^-1/2.

    Cosine weights rather than FREEDOM's binary edges: on Baby (EASE + fused graphs,
    validation) Recall@20 / NDCG@20 .0937 / .0452 against .0923 / .0446."""
    positive = graph.maximum(0).tocsr()
    adjacency = positive.maximum(positive.T).astype(np.float32).tolil()
    adjacency.setdiag(0)
    adjacency = adjacency.tocsr()
    adjacency.eliminate_zeros()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    inverse_root = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    scale = sp.diags(inverse_root.astype(np.float32))
    return (scale @ adjacency @ scale).tocsr()


def modality_weights(modalities: tuple[str, ...], text_weight: float) -> dict[str, float]:
    """Fusion weights summing to 1: text and image in the ratio text_weight : 1 − text_weight,
    any other modality as much as both together; a lone modality weighs 1."""
    raw = {m: {"text": text_weight, "image": 1.0 - text_weight}.get(m, 1.0) for m in modalities}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()} if len(modalities) > 1 else {m: 1.0 for m in modalities}


def fused_graph(graphs: dict[str, sp.csr_matrix], neighbors: int, text_weight: float) -> sp.csr_matrix:
    """The modalities' graphs, each cut to `neighbors` per item and normalised, summed with
    `modality_weights`: symmetric, as every normalised graph is."""
    weights = modality_weights(tuple(sorted(graphs)), text_weight)
    return sum(weights[m] * normalised_graph(top_neighbours(g, neighbors)) for m, g in graphs.items()).tocsr()


def graph_embedding(graphs: dict[str, sp.csr_matrix], dim: int = EMBEDDING_DIM, seed: int = 0) -> np.ndarray:
    """Items × dim spectral embedding of the content graphs (their normalised adjacencies
    averaged): the leading eigenvectors, as in Laplacian eigenmaps, so items with
    neighbouring content get nearby vectors — a dense content field for a ranker."""
    from scipy.sparse.linalg import eigsh

    fused = sum(normalised_graph(g) for g in graphs.values()) / len(graphs)
    n = fused.shape[0]
    k = min(dim, n - 2)
    if k < 1:
        return np.zeros((n, 0), dtype=np.float32)
    v0 = np.random.default_rng(seed).standard_normal(n)
    values, vectors = eigsh(fused.astype(np.float64), k=k, which="LA", v0=v0)
    vectors = vectors[:, np.argsort(-values, kind="stable")]
    # Eigenvectors are defined up to sign; fix it so results do not depend on the solver.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    return np.ascontiguousarray(vectors * np.where(signs == 0, 1.0, signs) * np.sqrt(n), dtype=np.float32)


def item_content_matrix(dataset: Dataset) -> np.ndarray | None:
    """The dense item vectors a ranker reads: the item features, and the spectral embedding
    of the content graphs when the dataset has any."""
    blocks = [dataset.item_features.matrix] if dataset.item_features is not None else []
    if dataset.content is not None and dataset.content.graphs:
        blocks.append(graph_embedding(dataset.content.graphs))
    return np.hstack(blocks).astype(np.float32) if blocks else None


def knn_from_features(features: np.ndarray, neighbors: int) -> sp.csr_matrix:
    """Exact cosine kNN graph of the rows of `features` (self excluded, positive cosines only)."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    n = len(unit)
    keep = min(neighbors, n - 1)
    if keep < 1:
        return sp.csr_matrix((n, n), dtype=np.float32)
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        index = faiss.IndexFlatIP(unit.shape[1])
        index.add(unit)
        values, items = index.search(unit, keep + 1)
    else:
        parts = []
        for start in range(0, n, _BLOCK):
            block = unit[start:start + _BLOCK] @ unit.T
            top = np.argpartition(-block, keep, axis=1)[:, :keep + 1]
            parts.append((np.take_along_axis(block, top, axis=1), top))
        values, items = np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])
    return _graph_without_self(values, items, keep)


def _graph_without_self(values: np.ndarray, items: np.ndarray, keep: int) -> sp.csr_matrix:
    n = len(items)
    rows = np.repeat(np.arange(n), items.shape[1])
    values, items = values.ravel(), items.ravel()
    # Sort each row by cosine, then item index, so both search back ends pick the same ties.
    order = np.lexsort((items, -values, rows))
    rows, items, values = rows[order], items[order], values[order]
    usable = (items != rows) & (items >= 0)
    rows, items, values = rows[usable], items[usable], values[usable]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    keep_mask = (rank < keep) & (values > 0)
    return sp.csr_matrix((values[keep_mask], (rows[keep_mask], items[keep_mask])), shape=(n, n))


def _feature_key(features: np.ndarray, neighbors: int) -> str:
    digest = hashlib.sha256(b"knn-v1")
    digest.update(f"{features.shape};{features.dtype};{neighbors}".encode())
    digest.update(np.ascontiguousarray(features).tobytes())
    return digest.hexdigest()


def _cached_graph(directory: Path, features: np.ndarray) -> sp.csr_matrix:
    path = directory / f"{_feature_key(features, GRAPH_NEIGHBORS)}.npz"
    try:
        graph = sp.load_npz(path).tocsr()
        if graph.shape == (len(features), len(features)) and np.isfinite(graph.data).all():
            return graph
    except (OSError, ValueError, EOFError, KeyError):
        pass  # missing or corrupt: rebuild and overwrite
    graph = knn_from_features(features, GRAPH_NEIGHBORS)
    from rectune.models.features import write_atomically

    write_atomically(path, lambda handle: sp.save_npz(handle, graph))
    return graph


def attach_content(dataset: Dataset, cache_dir: str | Path | None = None) -> Dataset:
    """The dataset with a kNN graph for every modality it has features for (cached)."""
    from rectune.models.config import cache_dir as resolve_cache_dir
    from rectune.models.features import TEXT_SOURCE

    content = dataset.content or ItemContent()
    features = dict(content.features)
    sources = dict(content.sources)
    if dataset.item_features is not None and dataset.item_features.source == TEXT_SOURCE and "text" not in content.modalities:
        features["text"] = dataset.item_features.matrix
        sources["text"] = f"item text encoded by {TEXT_SOURCE.removeprefix('text:')}"
    if not set(features) - set(content.graphs):
        return dataset
    directory = resolve_cache_dir(cache_dir) / "content"
    graphs = dict(content.graphs)
    for modality, matrix in sorted(features.items()):
        if modality in graphs:
            continue  # a neighbour file's graph for this modality is the one the source ships
        graphs[modality] = _cached_graph(directory, matrix)
        sources[modality] = f"{sources.get(modality, modality)}; exact kNN, {GRAPH_NEIGHBORS} per item"
    return replace(dataset, content=ItemContent(graphs=graphs, sources=sources))
