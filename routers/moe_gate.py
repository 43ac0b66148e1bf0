"""Learned MoE gate (MixLoRA / MoLE style) over frozen library adapters.

A linear gate per layer (per (layer, d_in) group, so q/k/v/gate/up share one and down_proj has its own) or
per module maps each token to N logits; top-k. The chosen adapters are weighted by their full-softmax
probabilities (Switch / GShard: with top-1, renormalising over the k would give weight 1 and no gradient
to the gate); `renormalize=True` divides by their sum instead (Mixtral style, k >= 2). Training (`train_router`) updates only
the gates, with the language-modelling loss plus a Switch-style load-balancing loss
N · Σ_e f_e · P_e (f_e: share of top-k slots given to e, P_e: mean gate probability of e).
Gates save into the library with the names and content hashes of the adapters they were trained for.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..library.errors import BaseModelMismatchError
from .base import Router, register
from .routing import Routing, RoutingContext

__all__ = ["MoEGateRouter"]

_LAYER = re.compile(r"^(.*?\.\d+)\.")


@register
class MoEGateRouter(Router):
    """Args: top_k; per_module: one gate per module instead of per layer; load_balance: aux loss weight;
    renormalize: weights sum to 1 over the k chosen adapters."""

    name = "moe_gate"

    def __init__(self, *, top_k: int = 2, per_module: bool = False, load_balance: float = 0.01,
                 renormalize: bool = False):
        if top_k < 1 or load_balance < 0:
            raise ValueError(f"MoEGateRouter needs top_k >= 1 and load_balance >= 0, got {top_k}, {load_balance}")
        self.top_k, self.per_module, self.load_balance = top_k, per_module, load_balance
        self.renormalize = renormalize
        self.gates = nn.ModuleDict()
        self.aux_losses: list[torch.Tensor] = []

    def _key(self, module: str, d_in: int) -> str:
        if self.per_module:
            return module.replace(".", "__")
        match = _LAYER.match(module)
        return f"{(match.group(1) if match else 'all').replace('.', '__')}__d{d_in}"

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        self.library = library
        self.keys = {}
        for module in available:
            d_in = library.base_model.modules[module][1]
            key = self.keys[module] = self._key(module, d_in)
            if key not in self.gates:
                self.gates[key] = nn.Linear(d_in, len(adapter_names), bias=False)
                nn.init.zeros_(self.gates[key].weight)  # start uniform: every adapter equally likely

    def route(self, module: str, x: torch.Tensor, context: RoutingContext) -> Routing:
        gate = self.gates[self.keys[module]]
        if gate.weight.device != x.device:
            gate.to(x.device)
        logits = gate(x.to(gate.weight.dtype)).float()                                        # (T, N)
        logits = logits.masked_fill(~self.available[module].to(x.device)[None, :], float("-inf"))
        k = min(self.top_k, logits.shape[1])
        probs = torch.softmax(logits, dim=1)                                                   # (T, N)
        weights, indices = torch.topk(probs, k, dim=1)
        if self.renormalize:
            weights = weights / weights.sum(1, keepdim=True)
        values = weights
        if torch.is_grad_enabled() and self.load_balance > 0:
            share = torch.zeros_like(probs).scatter_add_(1, indices, torch.ones_like(values)).mean(0) / k
            self.aux_losses.append(logits.shape[1] * (share * probs.mean(0)).sum())
        return Routing(indices, weights)

    def take_aux_loss(self) -> torch.Tensor:
        """The load-balancing loss of the forward passes since the last call (weighted), then cleared."""
        loss = torch.stack(self.aux_losses).mean() * self.load_balance if self.aux_losses else torch.zeros(())
        self.aux_losses = []
        return loss

    def parameters(self):
        return self.gates.parameters()

    # -- saved with the library ------------------------------------------------------------------

    def save(self, name: str) -> None:
        metadata = {"router": self.name, "top_k": self.top_k, "per_module": self.per_module,
                    "renormalize": self.renormalize,
                    "adapters": self.adapter_names, "content_hashes": self.library.content_hashes(self.adapter_names),
                    "base_fingerprint": self.library.base_model.fingerprint}
        self.library.save_artifact(name, self.gates.state_dict(), metadata)

    def load(self, name: str) -> "MoEGateRouter":
        """Load gates trained for exactly these adapters (same names, same content) into a bound router."""
        tensors, metadata = self.library.load_artifact(name)
        if (metadata.get("adapters") != self.adapter_names
                or metadata.get("content_hashes") != self.library.content_hashes(self.adapter_names)
                or metadata.get("base_fingerprint") != self.library.base_model.fingerprint):
            raise BaseModelMismatchError(
                f"gate {name!r} was trained for adapters {metadata.get('adapters')} (or other versions of them); "
                f"this model composes {self.adapter_names}")
        self.gates.load_state_dict(tensors)
        return self
