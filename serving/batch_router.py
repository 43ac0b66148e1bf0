"""The router inside the embedded engine's composed model: every batch row routed its own way.

    B = batch rows, T = tokens of one layer call, K = routing slots (the widest row), N = composed adapters

Before each forward the engine calls `assign` with one `RowRouting` per batch row: a fixed mixture (a named
adapter, an explicit mixture, a text router's decision, the base model = no slots), or `per_token=True`, where
the configured per-token router (arrow, moe_gate: routing that reads only the token's hidden state) routes that
row's tokens. One `lora_mixture` call per module then serves the whole mixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routers.base import Router
from ..routers.routing import Routing, RoutingContext

__all__ = ["BatchRouter", "RowRouting"]


@dataclass(frozen=True)
class RowRouting:
    """One row's routing: indices into the composed adapters and their weights (k,), or per_token."""

    indices: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    per_token: bool = False


class BatchRouter(Router):
    """Args: inner: the per-token router for `per_token` rows (None: no row may ask for one)."""

    name = "batch"
    top_k = 1

    def __init__(self, inner: Router | None = None):
        self.inner = inner
        self._indices = self._weights = self._per_token = self._fixed = None
        self._any_per_token = False
        self.prompt_shares: torch.Tensor | None = None   # (B, N) per-token rows' weight at the last prefill

    def prepare_adapters(self, library, adapters):
        return self.inner.prepare_adapters(library, adapters) if self.inner is not None else adapters

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        if self.inner is not None:
            self.inner.bind(library, adapter_names, available)

    def assign(self, rows: list[RowRouting]) -> None:
        """The routing of each batch row for the next forward pass."""
        if any(row.per_token for row in rows) and self.inner is None:
            raise ValueError("a row asks for per-token routing but the batch has no per-token router")
        width = max([1, *(len(row.indices) for row in rows)])
        self._indices = torch.full((len(rows), width), -1, dtype=torch.long)            # (B, K)
        self._weights = torch.zeros(len(rows), width)                                    # (B, K)
        for b, row in enumerate(rows):
            self._indices[b, :len(row.indices)] = torch.tensor(row.indices, dtype=torch.long)
            self._weights[b, :len(row.weights)] = torch.tensor(row.weights)
        self._per_token = torch.tensor([row.per_token for row in rows], dtype=torch.bool)
        self._any_per_token = bool(self._per_token.any())
        self._fixed = None
        self.prompt_shares = torch.zeros(len(rows), len(self.adapter_names))

    def route(self, module: str, x: torch.Tensor, context: RoutingContext) -> Routing:
        if self._indices is None or self._indices.shape[0] != context.batch_size:
            raise ValueError(f"BatchRouter: assign one RowRouting per batch row ({context.batch_size}) first")
        if self._fixed is None or self._fixed[0] is not context:      # once per forward, not once per module
            rows = context.sequence_ids.cpu()
            self._fixed = (context, rows, self._per_token[rows], Routing(self._indices[rows].to(x.device),
                                                                         self._weights[rows].to(x.device)))
        _, rows, tokens, fixed = self._fixed                                             # tokens: (T,) per-token rows
        if not self._any_per_token:
            return fixed
        indices, weights = fixed.indices.cpu(), fixed.weights.cpu()                      # (T, K)
        if bool(tokens.any()):
            routed = self.inner.route(module, x[tokens.to(x.device)], context)
            indices, weights = _widen(indices, routed.k), _widen(weights, routed.k)
            indices[tokens, :routed.k] = routed.indices.cpu()
            weights[tokens, :routed.k] = routed.weights.float().cpu()
            if context.is_prefill:
                self._record_shares(rows[tokens], routed, context)
        return Routing(indices.to(x.device), weights.to(x.device))

    def _record_shares(self, rows: torch.Tensor, routed: Routing, context: RoutingContext) -> None:
        """Add the per-token rows' routing weight per adapter (padding positions left out)."""
        dense = torch.zeros(rows.shape[0], len(self.adapter_names) + 1)
        slots = routed.indices.cpu()
        dense.scatter_add_(1, torch.where(slots >= 0, slots, len(self.adapter_names)), routed.weights.float().cpu())
        if context.attention_mask is not None:
            mask = context.attention_mask[:, -context.seq_len:].reshape(-1).cpu().bool()
            dense *= mask[self._per_token[context.sequence_ids.cpu()]][:, None]
        self.prompt_shares.index_add_(0, rows, dense[:, :-1])


def _widen(table: torch.Tensor, width: int) -> torch.Tensor:
    """(T, K) -> (T, max(K, width)), new slots empty (-1 / 0)."""
    if table.shape[1] >= width:
        return table.clone()
    fill = -1 if not table.dtype.is_floating_point else 0.0
    return torch.cat([table, torch.full((table.shape[0], width - table.shape[1]), fill, dtype=table.dtype)], 1)
