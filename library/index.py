"""The faiss index over adapters' pooled text embeddings (inner product on unit vectors = cosine).

Rows are identified by the catalog's adapter ids, so a rename never touches the index. Flat (exact) below
`ivf_threshold` adapters, IVF above it.

The saved index is a cache of the catalog, in ONE file written by one atomic rename (no index + metadata
pair that two writers could interleave):

    index/text-<config hash>-<kind>.safetensors
        ids        (n,)        int64    catalog adapter ids
        vectors    (n, dim)    float32  unit rows
        centroids  (nlist, dim) float32 IVF only: the trained coarse quantizer
        metadata   format, generation (the catalog's, when built), sha256 of the tensor bytes

It is never handed to `faiss.deserialize_index`: library files may come from someone else, and faiss's
reader is native code. The file is parsed by safetensors' bounds-checked reader, checked (format, the
catalog's generation and its set of adapter ids, a sha256 over its tensor bytes, shapes, finite values), and
the faiss index is rebuilt from the arrays (memcpy for flat; one assignment pass for IVF). Any mismatch is
a cache miss: the index is rebuilt from the embeddings the catalog stores.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load as st_load_numpy, save as st_save_numpy

from .files import write_atomic

__all__ = ["IndexConfig", "TextIndex"]

FORMAT = "adaptermix.index/1"


@dataclass(frozen=True)
class IndexConfig:
    ivf_threshold: int = 20_000
    nprobe: int = 32


class TextIndex:
    """Args: folder: where index files live; config_hash: the text-embedding config the vectors come
    from; kind_wanted: "flat" or "ivf"."""

    def __init__(self, folder: Path, config_hash: str, kind_wanted: str, config: IndexConfig = IndexConfig()):
        self.folder = Path(folder)
        self.kind_wanted = kind_wanted
        self.path = self.folder / f"text-{config_hash}-{kind_wanted}.safetensors"
        self.config = config
        self.index: faiss.Index | None = None
        self.generation: int | None = None
        self.dirty = False
        self._ids = np.zeros(0, np.int64)                # (n,)
        self._vectors = np.zeros((0, 0), np.float32)     # (n, dim)
        self._centroids: np.ndarray | None = None        # (nlist, dim), IVF only

    def build(self, ids: np.ndarray, vectors: np.ndarray, generation: int) -> None:
        ids = np.ascontiguousarray(ids, np.int64)
        vectors = np.ascontiguousarray(vectors, np.float32)
        if not len(ids):
            vectors = np.zeros((0, 1), np.float32)  # an empty library: no dimension known yet
        centroids = None
        if self.kind_wanted == "ivf":
            dim = vectors.shape[1]
            nlist = max(1, int(math.sqrt(len(ids))))  # ~sqrt(n) lists: >= 39 training points each
            trainer = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            trainer.train(vectors)
            centroids = trainer.quantizer.reconstruct_n(0, nlist)
        self._assemble(ids, vectors, centroids)
        self.generation, self.dirty = generation, True

    def _assemble(self, ids: np.ndarray, vectors: np.ndarray, centroids: np.ndarray | None) -> None:
        dim = vectors.shape[1] if vectors.size else 1
        if centroids is not None:
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(centroids)
            index = faiss.IndexIVFFlat(quantizer, dim, len(centroids), faiss.METRIC_INNER_PRODUCT)
            index.is_trained = True
            index.nprobe = self.config.nprobe
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if len(ids):
            index.add_with_ids(vectors, ids)
        self.index, self._ids, self._vectors, self._centroids = index, ids, vectors, centroids

    def load(self, generation: int, catalog_ids: np.ndarray) -> bool:
        """Load the saved index if it was built at `generation` over exactly `catalog_ids` and its bytes
        are intact. False (a cache miss) if it is missing, stale, damaged or malformed."""
        if self.path.is_symlink() or not self.path.is_file():
            return False
        try:
            data = self.path.read_bytes()
            arrays = st_load_numpy(data)
            metadata = _metadata(data)
        except Exception:  # safetensors raises its own error type for a malformed file
            return False
        ids, vectors, centroids = arrays.get("ids"), arrays.get("vectors"), arrays.get("centroids")
        if (metadata.get("format") != FORMAT or metadata.get("generation") != str(generation)
                or metadata.get("sha256") != _digest(arrays)
                or not _well_formed(ids, vectors, centroids, self.kind_wanted)
                or not np.array_equal(np.sort(ids), np.sort(np.asarray(catalog_ids, np.int64)))):
            return False
        self._assemble(ids, vectors, centroids)
        self.generation, self.dirty = generation, False
        return True

    def save(self) -> None:
        if self.index is None or not self.dirty:
            return
        arrays = {"ids": self._ids, "vectors": self._vectors}
        if self._centroids is not None:
            arrays["centroids"] = np.ascontiguousarray(self._centroids, np.float32)
        metadata = {"format": FORMAT, "generation": str(self.generation), "sha256": _digest(arrays)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, st_save_numpy(arrays, metadata=metadata))
        except OSError:
            # The file is a cache and readers save it without the writer lock, so a writer's recovery may
            # sweep the temp file away mid-save (or the folder is read-only, or the disk full): the search
            # stands, the index stays dirty and the next save tries again.
            return
        self.dirty = False

    @property
    def size(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    def update(self, removed: list[int], added: dict[int, np.ndarray], old: int, new: int) -> None:
        """Apply one committed write (generation old -> new) in place, or drop the index if it is stale."""
        if self.index is None or self.generation != old:
            self.index, self.generation = None, None
            return
        ids, vectors = self._ids, self._vectors
        if removed:
            keep = ~np.isin(ids, np.asarray(removed, np.int64))
            ids, vectors = ids[keep], vectors[keep]
            self.index.remove_ids(np.asarray(removed, dtype=np.int64))
        if added:
            rows = np.stack(list(added.values())).astype(np.float32)
            if rows.shape[1] != self.index.d:
                self.index, self.generation = None, None
                return
            new_ids = np.fromiter(added, dtype=np.int64)
            self.index.add_with_ids(rows, new_ids)
            ids = np.concatenate([ids, new_ids])
            vectors = np.concatenate([vectors, rows])
        self._ids, self._vectors = ids, vectors
        self.generation, self.dirty = new, True

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """query: (dim,) or (Q, dim) unit vectors -> scores (Q, k), ids (Q, k) with -1 for empty slots."""
        query = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        return self.index.search(query, k)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(f"{name}{arrays[name].dtype}{arrays[name].shape}".encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _metadata(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def _well_formed(ids, vectors, centroids, kind: str) -> bool:
    if ids is None or vectors is None or ids.dtype != np.int64 or vectors.dtype != np.float32:
        return False
    if ids.ndim != 1 or vectors.ndim != 2 or vectors.shape[0] != ids.shape[0] or vectors.shape[1] < 1:
        return False
    if not np.isfinite(vectors).all() or len(np.unique(ids)) != len(ids):
        return False
    if kind == "ivf":
        return (centroids is not None and centroids.dtype == np.float32 and centroids.ndim == 2
                and centroids.shape[1] == vectors.shape[1] and 1 <= centroids.shape[0] <= max(1, len(ids))
                and bool(np.isfinite(centroids).all()))
    return centroids is None
