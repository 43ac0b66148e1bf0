"""Per-request routing: an `EngineRequest` in, a `RoutingDecision` out, shared by every engine.

    router = RequestRouter(RetrievalRouter(lexical_weight=1.0), library, base_model_name="SmolLM2-135M-Instruct",
                           label="retrieval_lexical")
    router.decide(request)   # RoutingDecision(adapters=("date_dmy",), weights=(1.0,), router="retrieval_lexical")

What `model` and `adapters` ask for:
    adapters={...}       an explicit mixture (wins over `model`, which must still exist): names checked against
                         the library (404 with the list), weights finite and >= 0, not all 0 (400 naming the field);
                         zero weights are dropped. Served as sum_i w_i * s_i * B_i A_i.
    model=<base name>    no adapter (the base model alone).
    model=<adapter>      that adapter alone, weight 1.
    model="auto"         the configured zero-shot router decides (`route_many`: one batch of texts at a time):
        text routers (retrieval, dense + lexical, token_level): one decision per sequence from the user's text,
            made here without the model; token_level's decision is the prompt's, held for the generated tokens.
        per-token routers (arrow, moe_gate): the engine routes every token inside the model; the decision made
            here is a placeholder (`per_token=True`) that the engine fills with the per-prompt summary, the share
            of routing weight each adapter received over the prompt's tokens.
        fixed: its configured weights.
"""

from __future__ import annotations

import math
from numbers import Real

from ..routers.arrow import ArrowRouter
from ..routers.base import Router
from ..routers.fixed import FixedRouter
from ..routers.moe_gate import MoEGateRouter
from ..routers.retrieval import TextRouter
from .engine import AUTO, BadRequestError, EngineRequest, RoutingDecision, UnknownModelError

__all__ = ["RequestRouter", "PER_TOKEN_ROUTERS", "validate_mixture"]

# Routers whose per-token routing reads only the token's hidden state: a batch can route some of its rows with
# them and others by fixed decisions (serving/batch_router.py).
PER_TOKEN_ROUTERS = (ArrowRouter, MoEGateRouter)


def validate_mixture(adapters, known: list[str]) -> dict[str, float]:
    """The explicit mixture with zero weights dropped, or a ServingError naming the field."""
    if not isinstance(adapters, dict) or not adapters:
        raise BadRequestError("`adapters` must be a non-empty object {adapter name: weight}", param="adapters")
    unknown = [name for name in adapters if name not in known]
    if unknown:
        raise UnknownModelError(f"unknown adapter(s) {unknown} in `adapters`; the library has {known}",
                                param="adapters")
    for name, weight in adapters.items():
        if isinstance(weight, bool) or not isinstance(weight, Real):
            raise BadRequestError(f"`adapters.{name}` must be a number, got {weight!r}", param=f"adapters.{name}")
        if not math.isfinite(weight):
            raise BadRequestError(f"`adapters.{name}` must be finite, got {weight}", param=f"adapters.{name}")
        if weight < 0:
            raise BadRequestError(f"`adapters.{name}` must be >= 0, got {weight}", param=f"adapters.{name}")
    mixture = {name: float(weight) for name, weight in adapters.items() if weight > 0}
    if not mixture:
        raise BadRequestError("`adapters` weights are all 0: give at least one adapter a positive weight",
                              param="adapters")
    return mixture


class RequestRouter:
    """Turns a request's `model` / `adapters` into a RoutingDecision with one configured zero-shot router.

    Args:
        router: the zero-shot router for `model="auto"` (a text router is bound here if it is not yet).
        library: the adapter library (names, and what text routers read).
        base_model_name: the model name that asks for no adapter.
        adapter_names: the servable adapters (default: the whole library).
        label: the router's name in decisions (default: `router.name`), e.g. the config file's name.
    """

    def __init__(self, router: Router, library, *, base_model_name: str, adapter_names: list[str] | None = None,
                 label: str | None = None):
        self.router = router
        self.adapter_names = list(adapter_names) if adapter_names is not None else library.names()
        self.base_model_name = base_model_name
        self.label = label or router.name
        if base_model_name in self.adapter_names or base_model_name == AUTO:
            raise ValueError(f"the base model's name {base_model_name!r} collides with an adapter or {AUTO!r}")
        if isinstance(router, TextRouter):
            if getattr(router, "adapter_names", None) != self.adapter_names:
                router.bind(library, self.adapter_names, {})
        elif isinstance(router, FixedRouter):
            validate_mixture(router.weights, self.adapter_names)
        elif not isinstance(router, PER_TOKEN_ROUTERS):
            raise ValueError(f"router {self.label!r} ({type(router).__name__}) cannot route requests in the server: "
                             f"use a text router (retrieval, token_level), a per-token one (arrow, moe_gate) or fixed")

    @property
    def per_token(self) -> bool:
        return isinstance(self.router, PER_TOKEN_ROUTERS)

    def models(self) -> list[str]:
        """The base model's name, `auto`, then every adapter's name (GET /v1/models)."""
        return [self.base_model_name, AUTO, *self.adapter_names]

    def decide(self, request: EngineRequest) -> RoutingDecision:
        decision = self.resolve(request)
        return decision if decision is not None else self.route_many([request.route_text])[0]

    def resolve(self, request: EngineRequest) -> RoutingDecision | None:
        """The decision where the request makes it (named adapter, base model, explicit mixture: validated,
        ServingError otherwise), None where the router must decide (`model="auto"`: `route_many`)."""
        if request.model not in (AUTO, self.base_model_name) and request.model not in self.adapter_names:
            raise UnknownModelError(f"model {request.model!r} does not exist; available: {self.models()}",
                                    param="model")
        if request.adapters is not None:
            mixture = validate_mixture(request.adapters, self.adapter_names)
            return RoutingDecision(tuple(mixture), tuple(mixture.values()), router="explicit",
                                   note="explicit mixture from `adapters`")
        if request.model == self.base_model_name:
            return RoutingDecision((), (), router="none", note="base model requested")
        if request.model != AUTO:
            return RoutingDecision((request.model,), (1.0,), router="named")
        return None

    def route_many(self, texts: list[str]) -> list[RoutingDecision]:
        """The zero-shot router's decisions for user texts (`model="auto"`), in one batch (one encoder call)."""
        if isinstance(self.router, FixedRouter):
            return [RoutingDecision(tuple(self.router.weights), tuple(map(float, self.router.weights.values())),
                                    router=self.label) for _ in texts]
        if self.per_token:
            return [RoutingDecision((), (), router=self.label, per_token=True,
                                    note=f"{self.label} routes every token; adapters and weights are the prompt's "
                                         f"share of routing weight") for _ in texts]
        notes: list[str] = []
        routing = self.router.routing_for_texts(list(texts), notes)
        return [self._decision(row, routing.indices[row].tolist(), routing.weights[row].tolist(), notes)
                for row in range(len(texts))]

    def _decision(self, row: int, indices: list[int], weights: list[float], notes: list[str]) -> RoutingDecision:
        chosen = [(self.adapter_names[i], float(w)) for i, w in zip(indices, weights) if i >= 0 and w > 0]
        mine = [n.replace(f"sequence {row}: ", "") for n in notes if f"sequence {row}: " in n]
        note = "; ".join(mine) or (None if chosen else f"{self.label}: no adapter chosen (base model)")
        return RoutingDecision(tuple(n for n, _ in chosen), tuple(w for _, w in chosen), router=self.label, note=note)
