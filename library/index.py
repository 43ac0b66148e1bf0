"""The faiss index over adapters' pooled text embeddings (inner product on unit vectors = cosine).

Rows are identified by the catalog's adapter ids, so a rename never touches the index. The index file is a
cache of the catalog: it records the catalog generation it was built at, and any mismatch (another process
wrote, a crash between commit and save) triggers a rebuild from the stored embeddings.
Flat (exact) below `ivf_threshold` adapters, IVF above it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .files import write_atomic

__all__ = ["IndexConfig", "TextIndex"]


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
        self.path = self.folder / f"text-{config_hash}-{kind_wanted}.faiss"
        self.meta_path = self.path.with_suffix(".json")
        self.config = config
        self.index: faiss.Index | None = None
        self.generation: int | None = None
        self.dirty = False

    def build(self, ids: np.ndarray, vectors: np.ndarray, generation: int) -> None:
        dim = vectors.shape[1] if vectors.size else 1
        if self.kind_wanted == "ivf":
            nlist = max(1, int(math.sqrt(len(ids))))  # ~sqrt(n) lists: >= 39 training points each
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = self.config.nprobe
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if len(ids):
            index.add_with_ids(vectors, ids.astype(np.int64))
        self.index, self.generation, self.dirty = index, generation, True

    def load(self, generation: int) -> bool:
        """Load the saved index if it was built at `generation`. False if missing or stale."""
        if not (self.path.is_file() and self.meta_path.is_file()):
            return False
        try:
            saved = json.loads(self.meta_path.read_text())["generation"]
        except (ValueError, KeyError):
            return False
        if saved != generation:
            return False
        self.index = faiss.deserialize_index(np.fromfile(self.path, dtype=np.uint8))
        if isinstance(self.index, faiss.IndexIVF):
            self.index.nprobe = self.config.nprobe
        self.generation, self.dirty = generation, False
        return True

    def save(self) -> None:
        if self.index is None or not self.dirty:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, faiss.serialize_index(self.index).tobytes())
        write_atomic(self.meta_path, json.dumps({"generation": self.generation, "size": self.size}).encode())
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
        if removed:
            self.index.remove_ids(np.asarray(removed, dtype=np.int64))
        if added:
            vectors = np.stack(list(added.values())).astype(np.float32)
            if vectors.shape[1] != self.index.d:
                self.index, self.generation = None, None
                return
            self.index.add_with_ids(vectors, np.fromiter(added, dtype=np.int64))
        self.generation, self.dirty = new, True

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """query: (dim,) or (Q, dim) unit vectors -> scores (Q, k), ids (Q, k) with -1 for empty slots."""
        query = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        return self.index.search(query, k)
