"""The mixture layer: a frozen base linear (nn.Linear or GPT-2 Conv1D) plus routed LoRA adapters.

    y = base(x) + lora_mixture(x, A, B, scales, router(x).indices, router(x).weights, ranks)

A: (N, r_max, d_in), B: (N, d_out, r_max): the composed adapters' factors at this module, stacked once
(rank-padded with zeros; adapters without factors here are zero and never picked by masking routers).
B is the transposed view of its rows (N, r_max, d_out), the layout the kernels read with unit stride.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import lora_mixture
from ..kernels.validation import routing_bounds
from ..library.errors import RouterOutputError
from .state import ComposerState

__all__ = ["MixtureLinear"]


class MixtureLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, module_name: str, *, A: torch.Tensor, B: torch.Tensor,
                 scales: torch.Tensor, ranks: torch.Tensor, state: ComposerState, backend: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("ranks", ranks, persistent=False)
        self.state = state
        self.backend = backend

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.state.context is None:
            raise RuntimeError("adaptermix: a mixture layer ran outside the composed model's forward")
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.reshape(-1, out.shape[-1])
        if self.state.probing:                   # the router reads the base model's hidden states
            self.state.router.observe(self.module_name, flat_x, self.state.context)
            return out
        routing = self.state.router.route(self.module_name, flat_x, self.state.context)
        if self.state.validate_routing:
            check_routing(routing, self.A.shape[0], self.module_name, self.state.router)
        self.state.record(self.module_name, routing)
        weights = routing.weights.to(flat_x.dtype)
        A, B = self.A.to(flat_x.dtype), self.B.to(flat_x.dtype)
        differentiable = torch.is_grad_enabled() and (x.requires_grad or out.requires_grad or weights.requires_grad)
        if differentiable:
            mixed = lora_mixture(flat_x, A, B, self.scales, routing.indices, weights, ranks=self.ranks,
                                 base=flat_out, backend=self.backend, validate=False)
            return mixed.view(out.shape)
        flat_out = flat_out.contiguous()
        lora_mixture(flat_x, A, B, self.scales, routing.indices, weights, ranks=self.ranks, out=flat_out,
                     backend=self.backend, validate=False)
        return flat_out.view(out.shape)

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, adapters={self.A.shape[0]}, r_max={self.A.shape[1]}"


def check_routing(routing, num_adapters: int, module_name: str, router) -> None:
    """A router's output before it reaches the op (which trusts it): finite weights, ids in [-1, N).
    Three reductions and one device sync per layer (kernels.validation.routing_bounds, the op's own check);
    `ComposerState.validate_routing = False` skips it."""
    if routing.weights.numel() == 0:
        return
    total, lowest, highest = routing_bounds(routing.indices, routing.weights)
    if not math.isfinite(total) and not bool(torch.isfinite(routing.weights).all()):
        raise RouterOutputError(f"{type(router).__name__} returned NaN or infinite weights at {module_name}")
    if lowest < -1 or highest >= num_adapters:
        raise RouterOutputError(f"{type(router).__name__} returned adapter ids in [{lowest}, {highest}] "
                                f"at {module_name}; valid ids are -1 (an empty slot) to {num_adapters - 1}")
