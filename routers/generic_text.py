"""Generic text that belongs to no task: what weight routers calibrate on when a library has no text.

Calibration (routers/sequence_arrow.py) centres the hidden states and z-scores each adapter's score on some
reference prompts. With the library's example prompts, that needs text the adapters may not have (a folder
of checkpoints from a hub). These prompts are ordinary chat requests, written for this purpose, about none of
the example suite's tasks (no dates, case conversion, word lists, repetition, extraction, arithmetic or
acronyms): they measure the base model's shared offset and each adapter's scale on everyday user text.
"""

from __future__ import annotations

import hashlib
import json

__all__ = ["GENERIC_PROMPTS", "generic_corpus_hash"]

GENERIC_PROMPTS: tuple[str, ...] = (
    "Tell me a fun fact about octopuses.",
    "What should I cook for dinner tonight?",
    "Explain why the sky looks blue during the day.",
    "Write a short poem about the sea at night.",
    "How do I keep my houseplants alive in winter?",
    "What is the difference between a lake and a pond?",
    "Give me three tips for a good night's sleep.",
    "Why do cats purr?",
    "Describe a quiet village in the mountains.",
    "What are some good habits for learning a new language?",
    "Can you suggest a name for a small bakery?",
    "How does a rainbow form?",
    "Summarise the story of a hero who returns home after a long journey.",
    "What is a good way to start a conversation with a new neighbour?",
    "Write a friendly message inviting a friend to a picnic.",
    "Which animals live in the Arctic?",
    "How do bees make honey?",
    "What makes a story exciting to read?",
    "Describe the smell of fresh bread.",
    "Why is exercise good for the heart?",
    "What can I do on a rainy afternoon?",
    "Explain how a bicycle stays upright.",
    "Tell me about the history of tea.",
    "Write two sentences about autumn leaves.",
    "What is the best way to pack for a weekend trip?",
    "How do birds know where to migrate?",
    "Give me an idea for a birthday present for my sister.",
    "Why does bread go stale?",
    "Describe a busy market in the morning.",
    "What are the planets made of?",
    "How can I be more patient?",
    "Write a thank-you note to a teacher.",
    "What is the role of a lighthouse?",
    "How do volcanoes erupt?",
    "Suggest a calm activity before bed.",
    "Why do we have seasons?",
    "Tell me a short story about a lost kite.",
    "What should I know before adopting a dog?",
    "How is paper made from trees?",
    "Describe the sound of a thunderstorm.",
    "What makes a good team leader?",
    "Explain what a museum curator does.",
    "How do I make a cup of hot chocolate?",
    "What are the benefits of reading every day?",
    "Write a welcome message for a hiking club.",
    "Why do leaves change colour?",
    "What do astronauts eat in space?",
    "Give me advice for my first day at a new job.",
)


def generic_corpus_hash(texts: tuple[str, ...] = GENERIC_PROMPTS) -> str:
    """Identifies the corpus in saved calibration statistics (statistics from other text are refused)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]
