"""`train_router`: fit a learnable router (the MoE gate) on a few examples; the model and adapters stay frozen."""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from .compose import composer_state

__all__ = ["train_router", "pad_examples"]


def pad_examples(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, labels (-100 on padding and where an example gives none) and attention_mask."""
    length = max(e["input_ids"].shape[0] for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, example in enumerate(examples):
        n = example["input_ids"].shape[0]
        ids[row, :n] = example["input_ids"]
        labels[row, :n] = example.get("labels", example["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_router(model, examples: list, *, steps: int = 100, batch_size: int = 8, lr: float = 1e-2,
                 seed: int = 0, pad_id: int = 0, progress: bool = True) -> list[float]:
    """Train the composed model's router by the language-modelling loss (+ its load-balancing loss).

    Args:
        examples: 1-D token-id tensors, or dicts with "input_ids" and optional "labels" (-100 = no loss).
    Returns the loss of every step.
    """
    router = composer_state(model).router
    parameters = list(router.parameters()) if hasattr(router, "parameters") else []
    if not parameters:
        raise ValueError(f"{type(router).__name__} has nothing to train")
    if not examples:
        raise ValueError("train_router needs at least one example")
    examples = [e if isinstance(e, dict) else {"input_ids": e} for e in examples]
    device = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    optimiser = torch.optim.Adam(parameters, lr=lr)
    rng = random.Random(seed)
    losses = []
    try:
        for _ in tqdm(range(steps), desc="train router", disable=not progress):
            chosen = rng.sample(examples, min(batch_size, len(examples)))
            batch = {k: v.to(device) for k, v in pad_examples(chosen, pad_id).items()}
            loss = model(**batch).loss + router.take_aux_loss().to(device)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        router.aux_losses = []
    return losses
