"""Derived data stored beside each adapter, keyed by (kind, config hash).

Each kind is a strategy: a small config, a `key` saying what the data depends on (the factors, or the
adapter's texts), and `compute`. The store persists results and recomputes only what is missing for the
current config.

    arrow       per module: right singular vectors (k, d_in) and singular values (k,) of dW = s·B·A
    sketch      one vector: a two-sided Gaussian sketch of every module's dW (for clustering, MBC)
    text        (n_texts, dim) embeddings of the description and example prompts, and their pooled mean
"""

from __future__ import annotations

import hashlib
import json
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .adapter import LoraAdapter, LoraModule
from .base_model import BaseModelSpec
from .encoders import TextEncoder

__all__ = ["lora_svd", "ArrowPrototypes", "ParameterSketch", "TextEmbedding", "DerivedKind",
           "adapter_texts", "text_hash"]


def lora_svd(module: LoraModule, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k right singular vectors (k, d_in) and singular values (k,) of dW = scale·B·A, in float64.

    Exact, and never forms the (d_out, d_in) matrix: with A^T = Qa·Ra and B = Qb·Rb (thin QR),
    dW = scale·Qb·(Rb·Ra^T)·Qa^T, so the SVD of the small core U·S·V^T gives dW's right vectors Qa·V.
    Each vector's sign is fixed so that its largest-magnitude entry is positive.
    """
    A, B = module.A.detach().double().cpu(), module.B.detach().double().cpu()
    Qa, Ra = torch.linalg.qr(A.T)                     # (d_in, r), (r, r)
    Qb, Rb = torch.linalg.qr(B)                       # (d_out, r), (r, r)
    _, S, Vh = torch.linalg.svd(Rb @ Ra.T)            # core (r, r)
    vectors = (Qa @ Vh.T).T                           # (r, d_in)
    k = S.shape[0] if k is None else min(k, S.shape[0])
    vectors, values = vectors[:k], S[:k] * abs(module.scale)
    pivot = vectors.abs().argmax(dim=1, keepdim=True)
    vectors = vectors * torch.sign(vectors.gather(1, pivot))
    return vectors, values


def adapter_texts(name: str, description: str, examples) -> list[str]:
    """What describes an adapter: its description (or its name in words) and its example prompts."""
    head = description.strip() or name.replace("_", " ").replace("-", " ")
    return [head] + [e for e in examples if e.strip()]


def text_hash(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


class DerivedKind(ABC):
    """One kind of derived data. `depends_on` is "content" (the factors) or "text" (the descriptions)."""

    kind: str
    depends_on: str
    stored_as: str  # "file" (large tensor dicts, memory-mapped) or "blob" (small, in the catalog)

    @property
    @abstractmethod
    def config(self) -> dict: ...

    @property
    def config_hash(self) -> str:
        text = json.dumps({"kind": self.kind, **self.config}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ArrowPrototypes(DerivedKind):
    """Arrow prototypes (Ostapenko et al. 2024). directions=None keeps all r singular directions."""

    directions: int | None = None
    kind = "arrow"
    depends_on = "content"
    stored_as = "file"

    @property
    def config(self) -> dict:
        return asdict(self)

    def compute(self, adapter: LoraAdapter, spec: BaseModelSpec) -> dict[str, torch.Tensor]:
        out = {}
        for module_name, module in adapter.modules.items():
            vectors, values = lora_svd(module, self.directions)
            out[f"{module_name}::vectors"] = vectors.float().contiguous()
            out[f"{module_name}::values"] = values.float().contiguous()
        return out


@dataclass(frozen=True)
class ParameterSketch(DerivedKind):
    """G_out^T·dW·G_in per module (p×p), Gaussians seeded by module name, concatenated and L2-normalised.

    Inner products of sketches estimate Frobenius inner products of dW without forming it (JL), so cosine
    similarity of sketches tracks cosine similarity of the updates, whatever the factorisation.
    """

    sketch_dim: int = 4
    seed: int = 0
    kind = "sketch"
    depends_on = "content"
    stored_as = "blob"

    @property
    def config(self) -> dict:
        return asdict(self)

    def _gaussian(self, module_name: str, side: str, rows: int) -> torch.Tensor:
        seed = zlib.crc32(f"{self.seed}:{module_name}:{side}".encode())
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(rows, self.sketch_dim, generator=gen, dtype=torch.float64) / self.sketch_dim ** 0.5

    def compute(self, adapter: LoraAdapter, spec: BaseModelSpec) -> dict[str, torch.Tensor]:
        p = self.sketch_dim
        parts = []
        for module_name, (d_out, d_in) in spec.modules.items():
            module = adapter.modules.get(module_name)
            if module is None:
                parts.append(torch.zeros(p * p, dtype=torch.float64))
                continue
            left = self._gaussian(module_name, "out", d_out).T @ module.B.double()     # (p, r)
            right = module.A.double() @ self._gaussian(module_name, "in", d_in)       # (r, p)
            parts.append((module.scale * left @ right).flatten())
        vector = torch.cat(parts)
        return {"vector": (vector / vector.norm().clamp_min(1e-30)).float()}


class TextEmbedding(DerivedKind):
    """Embeddings of the adapter's texts with a sentence encoder, plus their normalised mean."""

    kind = "text"
    depends_on = "text"
    stored_as = "blob"

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder

    @property
    def config(self) -> dict:
        return dict(self.encoder.config)

    def compute_many(self, texts: list[list[str]]) -> list[dict[str, torch.Tensor]]:
        """Batch-encode several adapters' texts in one encoder call."""
        flat = [t for group in texts for t in group]
        vectors = torch.from_numpy(self.encoder.encode(flat))
        out, start = [], 0
        for group in texts:
            items = vectors[start:start + len(group)]
            start += len(group)
            pooled = items.mean(0)
            out.append({"items": items.contiguous(), "vector": pooled / pooled.norm().clamp_min(1e-12)})
        return out


def blob_to_numpy(tensors: dict[str, torch.Tensor], key: str = "vector") -> np.ndarray:
    return tensors[key].numpy().astype(np.float32, copy=False)
