"""The contract between routers and the mixture layers.

    T = tokens of one layer call (batch rows x positions, flattened), k = adapters per token, N = adapters

A router gets the layer input x (T, d_in) and a `RoutingContext`, and returns a `Routing`: indices (T, k)
into the composed adapters (-1 = empty slot) and weights (T, k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Routing", "RoutingContext", "decline"]


@dataclass(frozen=True)
class Routing:
    """indices: (T, k) int64, -1 for an empty slot; weights: (T, k) floating."""

    indices: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        if self.indices.dim() != 2 or self.weights.shape != self.indices.shape:
            raise ValueError(f"Routing needs indices and weights of one (T, k) shape, got "
                             f"{tuple(self.indices.shape)} and {tuple(self.weights.shape)}")
        if self.indices.dtype.is_floating_point or not self.weights.dtype.is_floating_point:
            raise TypeError("Routing indices must be integers and weights floating point")

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def check(self, num_adapters: int) -> "Routing":
        """Range and finiteness (syncs the device: for tests and debugging)."""
        if self.indices.numel() and (int(self.indices.min()) < -1 or int(self.indices.max()) >= num_adapters):
            raise ValueError(f"Routing indices must lie in [-1, {num_adapters})")
        if not bool(torch.isfinite(self.weights).all()):
            raise ValueError("Routing weights contain NaN or Inf")
        return self

    @staticmethod
    def from_scores(scores: torch.Tensor, top_k: int, temperature: float) -> "Routing":
        """Top-k of (T, N) scores, softmax over the k (-inf scores become empty slots)."""
        k = min(top_k, scores.shape[1])
        values, indices = torch.topk(scores, k, dim=1)
        weights = torch.softmax(values / temperature, dim=1)
        empty = torch.isinf(values) & (values < 0)
        weights = torch.where(empty, 0.0, torch.nan_to_num(weights))
        return Routing(torch.where(empty, -1, indices), weights)


@dataclass
class RoutingContext:
    """What the layers know about the current forward pass, set by the composer's one pre-hook.

    Args:
        batch_size, seq_len: of this forward call (seq_len = 1 per generation step with a KV cache).
        past_len: tokens already in the KV cache (0 at prefill).
        sequence_ids: (T,) batch row of each flattened token.
        attention_mask: (batch, past_len + seq_len) or None.
        input_ids: (batch, seq_len) or None (inputs_embeds given).
        prompts: per batch row, the prompt text (from `set_prompts` or the tokenizer), or None.
        state: per-router storage that lives as long as the current sequences (cleared at prefill).
        tokenizer: the one given to `compose`, for routers that read text (or None).
    """

    batch_size: int
    seq_len: int
    past_len: int
    sequence_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    prompts: list[str] | None = None
    state: dict = field(default_factory=dict)
    tokenizer: object = None

    @property
    def is_prefill(self) -> bool:
        return self.past_len == 0


def decline(routing: Routing, confidence: torch.Tensor, threshold: float | None, notes: list[str] | None,
            router: str, *, empty: list[bool] | None = None, measure: str = "confidence") -> Routing:
    """How every router that can decline a prompt does so: a (batch, k) per-sequence routing with the rows
    whose confidence (batch,) is below `threshold` (or whose prompt is empty) emptied, so that the base model
    answers them; each such row is described in `notes` (the routing trace shows them)."""
    empty = torch.tensor(empty if empty is not None else [False] * len(confidence), dtype=torch.bool)
    weak = empty | (confidence.cpu() < threshold if threshold is not None else torch.zeros_like(empty))
    if not bool(weak.any()):
        return routing
    rows = weak.to(routing.indices.device)[:, None]
    for row in weak.nonzero().flatten().tolist():
        why = "empty prompt" if empty[row] else f"{measure} {float(confidence[row]):.3f} < min_similarity {threshold}"
        if notes is not None:
            notes.append(f"{router}: sequence {row}: {why}; no adapter (base model)")
    return Routing(torch.where(rows, -1, routing.indices), torch.where(rows, 0.0, routing.weights))
