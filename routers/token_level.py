"""Token-level similarity routing (Belofsky, "Token-Level Adaptation of LoRA Adapters").

Gradient-free: the text of each sequence so far (prompt plus generated tokens) is embedded with the
library's sentence encoder, compared with each adapter's centroid (the embedding of its description and
example prompts), and softmax(similarity / temperature) over the top-k gives the weights. Recomputed every
`every` tokens (default 2, the paper's best), held in between; the same weights serve every module.
"""

from __future__ import annotations

import torch

from .base import register
from .retrieval import TextRouter
from .routing import Routing, RoutingContext

__all__ = ["TokenLevelRouter"]


@register
class TokenLevelRouter(TextRouter):
    name = "token_level"

    def __init__(self, *, top_k: int = 2, every: int = 2, temperature: float = 0.05,
                 min_similarity: float | None = None):
        if every < 1:
            raise ValueError(f"TokenLevelRouter needs every >= 1, got {every}")
        super().__init__(top_k=top_k, temperature=temperature, min_similarity=min_similarity)
        self.every = every

    def route(self, module: str, x: torch.Tensor, context: RoutingContext) -> Routing:
        key = ("token_level", id(self))
        memory = context.state.setdefault(key, {"ids": None, "routing": None, "at": -1})
        if memory["at"] != context.past_len:  # first module of this forward: update the context text
            memory["at"] = context.past_len
            self._advance(memory, context)
        routing = memory["routing"]
        rows = context.sequence_ids
        return Routing(routing.indices[rows].to(x.device), routing.weights[rows].to(x.device))

    def _advance(self, memory: dict, context: RoutingContext) -> None:
        if context.input_ids is None or context.tokenizer is None:
            raise ValueError("TokenLevelRouter needs input_ids and compose(..., tokenizer=...) to read the context")
        ids = context.input_ids.cpu()
        memory["ids"] = ids if context.is_prefill or memory["ids"] is None else torch.cat([memory["ids"], ids], 1)
        length = memory["ids"].shape[1]
        if memory["routing"] is None or context.is_prefill or length % self.every == 0:
            texts = [context.tokenizer.decode(row, skip_special_tokens=True) for row in memory["ids"]]
            memory["routing"] = self.routing_for_texts(texts, context.state.setdefault("notes", []))
