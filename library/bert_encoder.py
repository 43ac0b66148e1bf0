"""A torch-only forward of BERT sentence encoders (the bundled all-MiniLM-L6-v2): the sentence-transformers
pipeline Transformer -> mean pooling -> normalize, read from the same folder (tokenizer.json, config.json,
model.safetensors), without importing sentence-transformers or transformers, whose imports take seconds
(`adaptermix search` must answer in under 3 s). Equal to `SentenceTransformer.encode` (tests/test_encoders.py);
any folder it does not recognise goes to sentence-transformers.

    B = texts in a batch, L = tokens (padded), d = hidden size, h = heads
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BertSentenceEncoder", "supports"]

_PIPELINE = ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
             "sentence_transformers.models.Normalize"]


def _json(path: Path) -> dict | list:
    return json.loads(path.read_text())


def supports(folder: str | Path) -> bool:
    """A BERT encoder with mean pooling and normalisation, all files present: the pipeline this file runs."""
    folder = Path(folder)
    try:
        modules = _json(folder / "modules.json")
        config = _json(folder / "config.json")
        pooling = _json(folder / modules[1]["path"] / "config.json")
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    return ([m.get("type") for m in modules] == _PIPELINE and modes == {"pooling_mode_mean_tokens"}
            and config.get("model_type") == "bert" and config.get("hidden_act") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file())


class BertSentenceEncoder:
    """The folder's encoder, in float32 on the CPU. `encode` mirrors SentenceTransformer.encode's arguments."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.config = _json(folder / "config.json")
        max_length = int(_json(folder / "sentence_bert_config.json").get("max_seq_length", 512)) \
            if (folder / "sentence_bert_config.json").is_file() else 512
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.weights = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.heads = int(self.config["num_attention_heads"])
        self.eps = float(self.config.get("layer_norm_eps", 1e-12))

    def get_embedding_dimension(self) -> int:
        return int(self.config["hidden_size"])

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weights[f"{name}.weight"], self.weights[f"{name}.bias"], self.eps)

    def _layer(self, x: torch.Tensor, bias: torch.Tensor, i: int) -> torch.Tensor:
        prefix = f"encoder.layer.{i}"
        B, L, d = x.shape
        split = lambda t: t.view(B, L, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731  (B, h, L, d/h)
        q, k, v = (split(self._linear(x, f"{prefix}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias             # (B, h, L, L)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
        x = self._norm(self._linear(context, f"{prefix}.attention.output.dense") + x,
                       f"{prefix}.attention.output.LayerNorm")
        hidden = F.gelu(self._linear(x, f"{prefix}.intermediate.dense"))
        return self._norm(self._linear(hidden, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")

    @torch.no_grad()
    def _batch(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer.encode_batch(texts)
        L = max(len(e.ids) for e in encoded)
        ids = torch.zeros(len(texts), L, dtype=torch.long)
        mask = torch.zeros(len(texts), L)
        for row, e in enumerate(encoded):
            ids[row, :len(e.ids)] = torch.tensor(e.ids)
            mask[row, :len(e.ids)] = 1
        w = self.weights
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._norm(x, "embeddings.LayerNorm")
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min                   # (B, 1, 1, L)
        for i in range(int(self.config["num_hidden_layers"])):
            x = self._layer(x, bias, i)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)       # (B, d)
        return F.normalize(pooled, dim=1)

    def encode(self, texts: list[str], batch_size: int = 64, **_) -> np.ndarray:
        """(len(texts), d) unit rows, float32 (the keyword arguments of SentenceTransformer.encode are taken:
        this always normalises and returns numpy)."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))   # similar lengths batch together
        out = np.zeros((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._batch([texts[i] for i in rows]).numpy()
        return out
