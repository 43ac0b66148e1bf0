"""The running batch of the embedded engine: one left-padded KV cache whose rows are the live sequences.

    B = sequences, L = cache length (left padding included), H = KV heads, D = head dim

Each sequence owns one row of every layer's (B, H, L, D) keys and values plus its row of the attention mask
(B, L); padding columns are masked out and zeroed. Sequences join after their own prefill (`join`: pad both
caches on the left to one length, concatenate the rows) and leave by dropping their rows (`keep`), after which
columns that are padding in every row are cut off, so a finished sequence's memory is freed at that step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

__all__ = ["RunningBatch", "prefill_inputs", "sample"]


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these tensors as they are (DynamicCache(ddp_cache_data=...) would copy them)."""
    cache = DynamicCache(ddp_cache_data=[(None, None)] * len(layers))
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """(..., L, D) -> (..., length, D) with zeros in front."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


def prefill_inputs(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask and position_ids (B, L) for a batch of prompts."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[b, length - len(prompt):] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


class RunningBatch:
    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []       # per layer ((B, H, L, D), (B, H, L, D))
        self.mask = torch.zeros(0, 0, dtype=torch.long)                  # (B, L)
        self.positions = torch.zeros(0, dtype=torch.long)                # (B,) position of the next token

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of a prefilled cache (padding positions zeroed: they may hold garbage)."""
        keep = mask.bool()[:, None, :, None]
        incoming = [(torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)) for k, v in _layers(cache)]
        positions = mask.sum(1)
        if not len(self):
            self.layers, self.mask, self.positions = incoming, mask, positions
            return
        length = max(self.length, mask.shape[1])
        self.layers = [(torch.cat([_pad_left(k0, length), _pad_left(k1, length)]),
                        torch.cat([_pad_left(v0, length), _pad_left(v1, length)]))
                       for (k0, v0), (k1, v1) in zip(self.layers, incoming)]
        self.mask = torch.cat([F.pad(self.mask, (length - self.length, 0)), F.pad(mask, (length - mask.shape[1], 0))])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and cut the columns that are padding in all of them."""
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[index]
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        self.layers = [(k[index, :, start:], v[index, :, start:]) for k, v in self.layers]
        self.positions = self.positions[index]

    def decode_inputs(self, tokens: torch.Tensor) -> dict:
        """Model kwargs for one decode step of every row (the cache apart: `cache()`); tokens (B,) are each
        row's last sampled token."""
        return {"input_ids": tokens[:, None],
                "attention_mask": F.pad(self.mask, (0, 1), value=1),
                "position_ids": self.positions[:, None],
                "use_cache": True}

    def cache(self) -> DynamicCache:
        return _cache_of(self.layers)

    def advance(self, cache: DynamicCache) -> None:
        """Take the cache a decode step returned (one more column, unmasked in every row)."""
        self.layers = _layers(cache)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        self.positions = self.positions + 1


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from a row's (V,) logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p       # tokens after the nucleus is full
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
