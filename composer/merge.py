"""Merge an adapter into the base weights, and unmerge it exactly (the original weights are kept aside:
W + dW - dW is not W in floating point)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..library.adapter import LoraAdapter
from ..library.errors import AdapterValidationError

__all__ = ["merge_adapter", "unmerge_adapter"]

ATTRIBUTE = "_adaptermix_merged"


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> nn.Module:
    """W += weight·dW for every module the adapter targets (Conv1D weights are stored transposed).

    All or nothing: targets, shapes and finiteness are checked before any weight changes, and if a merged
    weight comes out non-finite (overflow in a low-precision dtype) every module is restored."""
    if hasattr(model, ATTRIBUTE):
        raise ValueError("an adapter is already merged into this model; unmerge it first")
    targets = _checked_targets(model, adapter, weight)
    saved = {}
    try:
        for module, (target, transposed) in targets.items():
            saved[module] = target.detach().clone()
            delta = weight * adapter.modules[module].delta_weight(torch.float64)
            target += (delta.T if transposed else delta).to(target)
            if not bool(torch.isfinite(target).all()):
                raise AdapterValidationError(f"merging {adapter.name!r} into {module} at weight {weight} makes "
                                             f"its {target.dtype} weights overflow; nothing was merged")
    except BaseException:
        for module, original in saved.items():
            targets[module][0].copy_(original)
        raise
    setattr(model, ATTRIBUTE, saved)
    return model


def _checked_targets(model: nn.Module, adapter: LoraAdapter, weight: float) -> dict:
    """module -> (weight parameter, stored transposed?), after every check that needs no arithmetic."""
    if not math.isfinite(weight):
        raise AdapterValidationError(f"merge weight must be finite, got {weight}")
    found = adapter.problems()
    if found:
        raise AdapterValidationError(f"adapter {adapter.name!r} cannot be merged: " + "; ".join(found[:3]))
    named = dict(model.named_modules())
    missing = [m for m in adapter.modules if m not in named or not isinstance(getattr(named[m], "weight", None), torch.Tensor)]
    if missing:
        raise AdapterValidationError(f"adapter {adapter.name!r} targets modules this model lacks: {missing[:3]}")
    targets = {}
    for module, factors in adapter.modules.items():
        target = named[module].weight
        transposed = module in adapter.conv1d or type(named[module]).__name__ == "Conv1D"
        expected = (factors.d_in, factors.d_out) if transposed else (factors.d_out, factors.d_in)
        if tuple(target.shape) != expected:
            raise AdapterValidationError(f"adapter {adapter.name!r} at {module}: factors make a {expected} update, "
                                         f"the model's weight is {tuple(target.shape)}; nothing was merged")
        targets[module] = (target, transposed)
    return targets


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
