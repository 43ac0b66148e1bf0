"""Static routers: fixed weights for every token, or one named adapter per sequence (multi-tenant)."""

from __future__ import annotations

import torch

from ..library.errors import AdapterNotFoundError
from .base import Router, register
from .routing import Routing, RoutingContext

__all__ = ["FixedRouter", "PerSequenceRouter", "BASE"]

BASE = "__base__"  # no adapter for this sequence


@register
class FixedRouter(Router):
    """Every token gets the same adapters with the same weights, e.g. {"math": 0.7, "code": 0.3}."""

    name = "fixed"

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise ValueError("FixedRouter needs at least one adapter weight")
        self.weights = dict(weights)
        self.top_k = len(weights)

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        unknown = [n for n in self.weights if n not in adapter_names]
        if unknown:
            raise AdapterNotFoundError(f"FixedRouter names adapters that are not composed: {unknown}")
        self._indices = torch.tensor([adapter_names.index(n) for n in self.weights])
        self._weights = torch.tensor(list(self.weights.values()), dtype=torch.float32)

    def route(self, module, x, context) -> Routing:
        T = x.shape[0]
        indices = self._indices.to(x.device)[None, :].expand(T, -1)
        return Routing(indices, self._weights.to(x.device)[None, :].expand(T, -1))


@register
class PerSequenceRouter(Router):
    """One adapter per batch row (or "__base__" for none), set with `assign` before the forward pass:
    what PEFT's mixed batch (`adapter_names=`) serves, through the same kernel."""

    name = "per_sequence"
    top_k = 1

    def __init__(self):
        self._assigned: torch.Tensor | None = None

    def assign(self, names: list[str]) -> None:
        unknown = [n for n in names if n != BASE and n not in self.adapter_names]
        if unknown:
            raise AdapterNotFoundError(f"unknown adapter name(s) {unknown}; composed: {self.adapter_names}")
        self._assigned = torch.tensor([-1 if n == BASE else self.adapter_names.index(n) for n in names])

    def route(self, module, x, context: RoutingContext) -> Routing:
        if self._assigned is None or self._assigned.shape[0] != context.batch_size:
            raise ValueError(f"PerSequenceRouter: assign one adapter name per batch row "
                             f"({context.batch_size}) before the forward pass")
        indices = self._assigned.to(x.device)[context.sequence_ids][:, None]
        return Routing(indices, (indices >= 0).to(torch.float32))
