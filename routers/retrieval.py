"""Retrieval routing (LoraRetriever / Stylus style): embed each prompt with the library's sentence encoder,
take the top-k adapters by cosine similarity to their description / example embeddings, weight them
softmax(sim / temperature), and hold that routing for every token of the sequence, generated ones too.

lexical_weight > 0 adds that many times the TF-IDF word-n-gram cosine (routers/lexical.py) to the embedding
cosine: dense + sparse retrieval, which tells apart instructions the sentence encoder embeds alike."""

from __future__ import annotations

import torch

from .base import Router, register
from .lexical import LexicalIndex, adapter_documents, require_text
from .routing import Routing, RoutingContext, decline

__all__ = ["RetrievalRouter", "TextRouter"]


class TextRouter(Router):
    """Routes by the similarity of texts to the adapters' description / example embeddings."""

    def __init__(self, *, top_k: int, temperature: float, min_similarity: float | None = None,
                 lexical_weight: float = 0.0, lexical_ngrams: int = 2):
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"{type(self).__name__} needs top_k >= 1 and temperature > 0, got {top_k}, {temperature}")
        if lexical_weight < 0:
            raise ValueError(f"{type(self).__name__} needs lexical_weight >= 0, got {lexical_weight}")
        self.top_k, self.temperature, self.min_similarity = top_k, temperature, min_similarity
        self.lexical_weight, self.lexical_ngrams = lexical_weight, lexical_ngrams

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        records = [library.record(n) for n in adapter_names]
        require_text(type(self).__name__, records)
        self.encoder = library.encoder
        _, vectors = library.text_embeddings(adapter_names)
        self.embeddings = torch.from_numpy(vectors)                                  # (N, dim)
        self.lexical = None
        if self.lexical_weight:
            self.lexical = LexicalIndex(adapter_documents(records), ngrams=self.lexical_ngrams)

    def similarities(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding cosine, routing score), each (len(texts), N); the score adds the lexical term."""
        queries = torch.from_numpy(self.encoder.encode([t if t.strip() else "-" for t in texts]))
        dense = queries @ self.embeddings.T
        if self.lexical is None:
            return dense, dense
        return dense, dense + self.lexical_weight * self.lexical.similarity(texts)

    def routing_for_texts(self, texts: list[str], notes: list[str] | None = None) -> Routing:
        """(len(texts), k): top-k adapters by cosine similarity, softmax(sim / temperature) over the k.

        A text that is empty, or whose best embedding similarity is below `min_similarity`, gets no adapter
        (the base model answers it); each such fallback is described in `notes` (the trace shows them)."""
        empty = [not t.strip() for t in texts]
        similarity, score = self.similarities(texts)                                 # (batch, N) each
        routing = Routing.from_scores(score, self.top_k, self.temperature)
        return decline(routing, similarity.max(1).values, self.min_similarity, notes, self.name, empty=empty,
                       measure="best similarity")


@register
class RetrievalRouter(TextRouter):
    name = "retrieval"

    def __init__(self, *, top_k: int = 1, temperature: float = 0.05, min_similarity: float | None = None,
                 lexical_weight: float = 0.0, lexical_ngrams: int = 2):
        super().__init__(top_k=top_k, temperature=temperature, min_similarity=min_similarity,
                         lexical_weight=lexical_weight, lexical_ngrams=lexical_ngrams)

    def route(self, module, x, context: RoutingContext) -> Routing:
        def compute():
            if context.prompts is None:
                raise ValueError("RetrievalRouter needs the prompt texts: pass tokenizer= to compose(), or call "
                                 "adaptermix.set_prompts(model, texts) before the forward pass")
            return self.routing_for_texts(context.prompts, context.state.setdefault("notes", []))

        routing = self.sequence_routing(context, compute)
        return Routing(routing.indices.to(x.device), routing.weights.to(x.device))
