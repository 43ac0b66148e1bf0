"""The router interface and registry. Routers are strategies: each a class with a small config."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .routing import Routing, RoutingContext

__all__ = ["Router", "ROUTERS", "register", "build_router"]

ROUTERS: dict[str, type["Router"]] = {}


def register(cls):
    ROUTERS[cls.name] = cls
    return cls


def build_router(name: str, **config) -> "Router":
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known: {sorted(ROUTERS)}")
    return ROUTERS[name](**config)


class Router(ABC):
    """Picks and weights adapters per token.

    `prepare_adapters` may transform the loaded adapters before they are stacked (Arrow's GenKnowSub).
    `bind` is then called once by `compose` with the library, the composed adapter names (their order is the
    index space of `Routing.indices`) and, per target module, a (N,) bool mask of the adapters that have
    factors there. `route` is called by every mixture layer on every forward.
    """

    name: str = ""
    top_k: int = 1

    def prepare_adapters(self, library, adapters: list) -> list:
        """The adapters to compose (after any transformation this router defines; default: as they are)."""
        return adapters

    def bind(self, library, adapter_names: list[str], available: dict[str, torch.Tensor]) -> None:
        if self.top_k > len(adapter_names):
            raise ValueError(f"{type(self).__name__}: top_k={self.top_k} but only {len(adapter_names)} adapters")
        self.adapter_names = list(adapter_names)
        self.available = available

    @abstractmethod
    def route(self, module: str, x: torch.Tensor, context: RoutingContext) -> Routing: ...

    def sequence_routing(self, context: RoutingContext, compute) -> Routing:
        """A per-sequence Routing (batch, k), computed once per prefill and held for the generated tokens,
        expanded to this call's tokens."""
        key = ("sequence_routing", id(self))
        if context.is_prefill and key not in context.state:
            context.state[key] = compute()
        if key not in context.state:
            raise RuntimeError(f"{type(self).__name__} has no routing for these sequences: the prefill "
                               "forward did not run through the composed model")
        per_sequence = context.state[key]
        return Routing(per_sequence.indices[context.sequence_ids], per_sequence.weights[context.sequence_ids])
