"""Arrow (Ostapenko et al. 2024): zero-shot, training-free routing by the adapters' own SVD prototypes.

Per token, per module: score_e = |<p_e, x>| with p_e the top right singular vector of adapter e's dW = s·B·A
(exact, from the library's stored prototypes), top-k, softmax over the k scores / temperature. The same rule
as PEFT's `create_arrow_model` (which finds p_e by power iteration). Adapters without factors at a module
are never picked there.
"""

from __future__ import annotations

import torch

from .base import Router, register
from .routing import Routing, RoutingContext

__all__ = ["ArrowRouter"]


@register
class ArrowRouter(Router):
    """Args: top_k: adapters per token; temperature: of the softmax over the top-k scores."""

    name = "arrow"

    def __init__(self, *, top_k: int = 2, temperature: float = 1.0):
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"ArrowRouter needs top_k >= 1 and temperature > 0, got {top_k}, {temperature}")
        self.top_k, self.temperature = top_k, temperature

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        self.prototypes: dict[str, torch.Tensor] = {}
        per_adapter = [library.prototypes(name, modules=list(available)) for name in adapter_names]
        for module, mask in available.items():
            d_in = next(p[module][0].shape[1] for p in per_adapter if module in p)
            rows = [p[module][0][0] if module in p else torch.zeros(d_in) for p in per_adapter]
            self.prototypes[module] = torch.stack(rows).float()                      # (N, d_in)

    def route(self, module: str, x: torch.Tensor, context: RoutingContext) -> Routing:
        prototypes = self.prototypes[module]
        if prototypes.device != x.device:
            prototypes = self.prototypes[module] = prototypes.to(x.device)
        scores = (x.float() @ prototypes.T).abs()                                      # (T, N)
        scores = scores.masked_fill(~self.available[module].to(x.device)[None, :], float("-inf"))
        return Routing.from_scores(scores, self.top_k, self.temperature)
