"""Arrow (Ostapenko et al. 2024): zero-shot, training-free routing by the adapters' own SVD prototypes.

Per token, per module: score_e = |<p_e, x>| with p_e the top right singular vector of adapter e's dW = s·B·A
(exact, from the library's stored prototypes), top-k, softmax over the k scores / temperature. The same rule
as PEFT's `create_arrow_model` (which finds p_e by power iteration). Adapters without factors at a module
are never picked there.

GenKnowSub (`general=[names]`): every composed task adapter becomes dW_e - mean_g dW_g over the general
adapters, formed exactly by concatenating factors, and that same adapter gives both the prototype and the
applied update. (PEFT averages the general adapters' A and B separately and subtracts those, which is not
the average update: mean(B)·mean(A) != mean(B·A).) General adapters are not routed to themselves.
"""

from __future__ import annotations

import torch

from ..library.adapter import LoraAdapter, linear_combination
from ..library.derived import lora_svd
from .base import Router, register
from .routing import Routing, RoutingContext

__all__ = ["ArrowRouter"]


@register
class ArrowRouter(Router):
    """Args: top_k: adapters per token; temperature: of the softmax over the top-k scores;
    general: library names of general-knowledge adapters to subtract (GenKnowSub), or None."""

    name = "arrow"

    def __init__(self, *, top_k: int = 2, temperature: float = 1.0, general: list[str] | None = None):
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"ArrowRouter needs top_k >= 1 and temperature > 0, got {top_k}, {temperature}")
        self.top_k, self.temperature = top_k, temperature
        self.general = list(general or [])
        self._subtracted: dict[str, LoraAdapter] | None = None

    def prepare_adapters(self, library, adapters):
        if not self.general:
            return adapters
        overlap = [a.name for a in adapters if a.name in self.general]
        if overlap:
            raise ValueError(f"GenKnowSub: {overlap} are general adapters; compose only task adapters")
        general = [library.get(name) for name in self.general]
        share = -1.0 / len(general)
        subtracted = []
        for adapter in adapters:
            modules = {}
            for module, factors in adapter.modules.items():
                terms = [(1.0, factors)] + [(share, g.modules[module]) for g in general if module in g.modules]
                modules[module] = linear_combination(terms)
            subtracted.append(adapter.with_metadata(modules=modules))
        self._subtracted = {a.name: a for a in subtracted}
        return subtracted

    def _prototypes_of(self, library, name: str, modules: list[str]):
        if self._subtracted is None:
            return library.prototypes(name, modules=modules)
        adapter = self._subtracted[name]
        return {m: lora_svd(adapter.modules[m], 1) for m in modules if m in adapter.modules}

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        self.prototypes: dict[str, torch.Tensor] = {}
        per_adapter = [self._prototypes_of(library, name, list(available)) for name in adapter_names]
        for module in available:
            d_in = next(p[module][0].shape[1] for p in per_adapter if module in p)
            rows = [p[module][0][0] if module in p else torch.zeros(d_in) for p in per_adapter]
            self.prototypes[module] = torch.stack(rows).float()                      # (N, d_in)
        # Masks only where some adapter lacks the module (most modules need none: no work per token).
        self.masks = {m: (None if bool(mask.all()) else mask) for m, mask in available.items()}

    def route(self, module: str, x: torch.Tensor, context: RoutingContext) -> Routing:
        prototypes = self.prototypes[module]
        if prototypes.device != x.device:
            prototypes = self.prototypes[module] = prototypes.to(x.device)
        scores = (x.float() @ prototypes.T).abs()                                      # (T, N)
        mask = self.masks[module]
        if mask is not None:
            scores = scores.masked_fill(~mask.to(x.device)[None, :], float("-inf"))
        return Routing.from_scores(scores, self.top_k, self.temperature)
