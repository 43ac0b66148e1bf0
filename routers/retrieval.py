"""Retrieval routing (LoraRetriever / Stylus style): embed each prompt with the library's sentence encoder,
take the top-k adapters by cosine similarity to their description / example embeddings, weight them
softmax(sim / temperature), and hold that routing for every token of the sequence, generated ones too."""

from __future__ import annotations

import torch

from .base import Router, register
from .routing import Routing, RoutingContext

__all__ = ["RetrievalRouter", "TextRouter"]


class TextRouter(Router):
    """Routes by the similarity of texts to the adapters' description / example embeddings."""

    def __init__(self, *, top_k: int, temperature: float):
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"{type(self).__name__} needs top_k >= 1 and temperature > 0, got {top_k}, {temperature}")
        self.top_k, self.temperature = top_k, temperature

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        self.encoder = library.encoder
        _, vectors = library.text_embeddings(adapter_names)
        self.embeddings = torch.from_numpy(vectors)                                  # (N, dim)

    def routing_for_texts(self, texts: list[str]) -> Routing:
        """(len(texts), k): top-k adapters by cosine similarity, softmax(sim / temperature) over the k."""
        queries = torch.from_numpy(self.encoder.encode(texts))                       # (batch, dim)
        return Routing.from_scores(queries @ self.embeddings.T, self.top_k, self.temperature)


@register
class RetrievalRouter(TextRouter):
    name = "retrieval"

    def __init__(self, *, top_k: int = 1, temperature: float = 0.05):
        super().__init__(top_k=top_k, temperature=temperature)

    def route(self, module, x, context: RoutingContext) -> Routing:
        def compute():
            if context.prompts is None:
                raise ValueError("RetrievalRouter needs the prompt texts: pass tokenizer= to compose(), or call "
                                 "adaptermix.set_prompts(model, texts) before the forward pass")
            return self.routing_for_texts(context.prompts)

        routing = self.sequence_routing(context, compute)
        return Routing(routing.indices.to(x.device), routing.weights.to(x.device))
