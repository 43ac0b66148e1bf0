"""Merge an adapter into the base weights, and unmerge it exactly (the original weights are kept aside:
W + dW - dW is not W in floating point)."""

from __future__ import annotations

import torch
from torch import nn

from ..library.adapter import LoraAdapter

__all__ = ["merge_adapter", "unmerge_adapter"]

ATTRIBUTE = "_adaptermix_merged"


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> nn.Module:
    """W += weight·dW for every module the adapter targets (Conv1D weights are stored transposed)."""
    if hasattr(model, ATTRIBUTE):
        raise ValueError("an adapter is already merged into this model; unmerge it first")
    named = dict(model.named_modules())
    missing = [m for m in adapter.modules if m not in named]
    if missing:
        raise ValueError(f"adapter {adapter.name!r} targets modules this model lacks: {missing[:3]}")
    saved = {}
    for module, factors in adapter.modules.items():
        target = named[module].weight
        saved[module] = target.detach().clone()
        delta = weight * factors.delta_weight(torch.float64)
        target += (delta.T if module in adapter.conv1d or type(named[module]).__name__ == "Conv1D" else delta).to(target)
    setattr(model, ATTRIBUTE, saved)
    return model


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Restore the weights exactly as they were before `merge_adapter`."""
    saved = getattr(model, ATTRIBUTE, None)
    if saved is None:
        raise ValueError("no adapter is merged into this model")
    named = dict(model.named_modules())
    for module, weight in saved.items():
        named[module].weight.copy_(weight)
    delattr(model, ATTRIBUTE)
    return model
