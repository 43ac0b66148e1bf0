"""Lexical similarity of prompts to the adapters' texts: TF-IDF over word n-grams (scikit-learn).

Sentence embeddings blur instructions that differ in one ordered phrase: "as day/month/year" and "as
month/day/year", "twice" and "three times" embed almost alike (docs/ROUTING.md). Word bigrams keep the order
and the rare words. Text routers add `lexical_weight` times this cosine to the embedding cosine, the usual
dense + sparse hybrid of retrieval systems.

    index = LexicalIndex(adapter_documents([library.record(n) for n in names]))
    similarity = index.similarity(["Rewrite the date 2020-01-02 as month/day/year."])     # (1, N) in [0, 1]
"""

from __future__ import annotations

import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from ..library.derived import adapter_texts
from ..library.errors import AdapterTextMissingError

__all__ = ["LexicalIndex", "adapter_documents", "require_text", "without_text"]


def adapter_documents(records) -> list[str]:
    """One document per adapter record: its description (or its name in words) and its example prompts."""
    return ["\n".join(adapter_texts(r.name, r.description, r.examples)) for r in records]


def without_text(records) -> list[str]:
    """Names of the adapters with neither a description nor an example prompt."""
    return [r.name for r in records if not (r.description.strip() or any(e.strip() for e in r.examples))]


def require_text(router: str, records, what: str = "") -> None:
    """Refuse, naming the router and the adapters, when some adapter has no text to read."""
    empty = without_text(records)
    if empty:
        raise AdapterTextMissingError(
            f"{router}{what} reads each adapter's description or example prompts; adapters {empty} have neither "
            f"(a library without text: route by weights, e.g. SequenceArrowRouter(calibration='generic'))")


class LexicalIndex:
    """TF-IDF vectors (word 1..ngrams-grams, sublinear tf, L2-normalised) of the adapters' documents."""

    def __init__(self, documents: list[str], *, ngrams: int = 2):
        if ngrams < 1:
            raise ValueError(f"ngrams must be >= 1, got {ngrams}")
        if not documents or not all(d.strip() for d in documents):
            raise ValueError("LexicalIndex needs one non-empty document per adapter")
        self.vectorizer = TfidfVectorizer(ngram_range=(1, ngrams), sublinear_tf=True)
        try:
            self.matrix = self.vectorizer.fit_transform(documents)                   # (N, vocabulary)
        except ValueError as error:  # every word a stop word / punctuation
            raise ValueError(f"LexicalIndex: the adapters' texts hold no words to index ({error})") from None

    def similarity(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), N) cosine similarities; 0 for a text sharing no n-gram with an adapter."""
        queries = self.vectorizer.transform(texts)
        return torch.from_numpy((queries @ self.matrix.T).toarray()).float()
