"""What the router chose: per forward step and module, the (T, k) indices and weights; usage statistics;
plots (composer/plots.py): prompts x adapters, and tokens x adapters for one prompt or a batch split by prompt.

    T = tokens of one step (batch rows x positions), N = composed adapters, P = prompts
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..routers.routing import Routing
from .compose import composer_state

__all__ = ["RoutingTrace", "routing_trace"]

_LAYER = re.compile(r"layers\.(\d+)\.")


def _layer_of(module: str) -> str:
    found = _LAYER.search(module)
    return found.group(1) if found else module


@dataclass
class RoutingTrace:
    adapter_names: list[str]
    steps: list[dict[str, Routing]]  # one dict per forward call (prefill, then each generated token)
    notes: list[str] = field(default_factory=list)  # routers' fallbacks (e.g. a prompt that matched nothing)
    attention_mask: torch.Tensor | None = None       # (batch, L) of the prefill: splits the rows by prompt
    prompts: list[str] | None = None                 # the prompts' texts, when the composer knew them

    @property
    def modules(self) -> list[str]:
        return sorted({m for step in self.steps for m in step})

    def mixture(self, module: str) -> torch.Tensor:
        """(tokens over all steps, N) weight each token gave each adapter at `module`."""
        rows = []
        for step in self.steps:
            if module in step:
                indices, weights = step[module].indices.cpu(), step[module].weights.float().cpu()
                dense = torch.zeros(indices.shape[0], len(self.adapter_names) + 1)
                dense.scatter_add_(1, torch.where(indices >= 0, indices, len(self.adapter_names)), weights)
                rows.append(dense[:, :-1])
        return torch.cat(rows) if rows else torch.zeros(0, len(self.adapter_names))

    def usage(self, module: str | None = None) -> dict[str, float]:
        """Share of routing weight each adapter received (one module, or all modules pooled)."""
        mixtures = [self.mixture(m) for m in ([module] if module else self.modules)]
        total = torch.cat(mixtures).sum(0) if mixtures else torch.zeros(len(self.adapter_names))
        total = total / total.sum().clamp_min(1e-12)
        return dict(zip(self.adapter_names, total.tolist()))

    def top1_share(self, module: str | None = None) -> dict[str, float]:
        """Share of tokens whose highest-weighted adapter is each adapter."""
        mixtures = torch.cat([self.mixture(m) for m in ([module] if module else self.modules)])
        counts = torch.bincount(mixtures.argmax(1), minlength=len(self.adapter_names)).float()
        return dict(zip(self.adapter_names, (counts / counts.sum().clamp_min(1)).tolist()))

    def entropy(self, module: str | None = None) -> float:
        """Mean entropy (nats) of the per-token routing distribution."""
        mixtures = torch.cat([self.mixture(m) for m in ([module] if module else self.modules)])
        p = mixtures / mixtures.sum(1, keepdim=True).clamp_min(1e-12)
        return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean()) if p.numel() else 0.0

    def decision_counts(self, attention_mask: torch.Tensor, generated: torch.Tensor | None = None,
                        eos_id: int | None = None, per_layer: bool = False) -> torch.Tensor:
        """(batch, N + 1): per sequence, how many (token, layer) decisions chose each adapter (last column:
        none). A decision is the adapter with the largest routing weight summed over the layer's modules, at
        every prompt token (attention_mask (batch, L) of the prefill: padding left out) and every generated
        token up to and including the first `eos_id` in `generated` (batch, new tokens).
        per_layer: (batch, layers, N + 1) instead, layers in model order."""
        N = len(self.adapter_names)
        B, L = attention_mask.shape
        if generated is not None and eos_id is not None:
            is_eos = generated == eos_id
            ended = is_eos.int().cumsum(1)
            gen_len = ((ended == 0) | ((ended == 1) & is_eos)).sum(1).cpu()
        else:
            gen_len = torch.full((B,), len(self.steps), dtype=torch.long)
        layers = sorted({_layer_of(m) for step in self.steps for m in step}, key=lambda k: (len(k), k))
        counts = torch.zeros(B, len(layers), N + 1)
        for s, step in enumerate(self.steps):
            by_layer: dict[str, torch.Tensor] = {}
            for module, routing in step.items():
                idx, weights = routing.indices.cpu(), routing.weights.float().cpu()
                dense = by_layer.setdefault(_layer_of(module), torch.zeros(idx.shape[0], N + 1))
                dense.scatter_add_(1, torch.where(idx >= 0, idx, N), weights)
            if s == 0:
                row_of, valid = torch.arange(B).repeat_interleave(L), attention_mask.reshape(-1).bool().cpu()
            else:
                row_of, valid = torch.arange(B), (s - 1) < gen_len
            for layer, dense in by_layer.items():
                if dense.shape[0] != row_of.shape[0]:
                    raise ValueError(f"step {s} has {dense.shape[0]} rows; the attention mask implies {row_of.shape[0]}")
                choice = torch.where(dense[:, :N].sum(1) > 0, dense[:, :N].argmax(1), N)
                at = torch.full_like(choice, layers.index(layer))
                counts.index_put_((row_of[valid], at[valid], choice[valid]), torch.ones(int(valid.sum())),
                                  accumulate=True)
        return counts if per_layer else counts.sum(1)

    def per_layer_usage(self) -> dict[str, dict[str, float]]:
        return {m: self.usage(m) for m in self.modules}

    def prompt_shares(self, generated: torch.Tensor | None = None, eos_id: int | None = None) -> torch.Tensor:
        """(prompts, N + 1): each prompt's share of (token, layer) decisions per adapter (last column: none),
        over its prompt tokens and, given `generated`, its generated tokens up to `eos_id`."""
        counts = self.decision_counts(self._mask(), generated, eos_id)
        return counts / counts.sum(1, keepdim=True).clamp_min(1)

    def token_rows(self, module: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """((tokens, N) routing weights, (tokens,) prompt of each token): one module or all averaged, padding
        dropped, rows grouped by prompt (its prompt tokens, then its generated tokens, in order)."""
        modules = [module] if module else self.modules
        matrix = torch.stack([self.mixture(m) for m in modules]).mean(0)
        mask = self._mask()
        B, L = mask.shape
        owner = torch.cat([torch.arange(B).repeat_interleave(L), torch.arange(B).repeat(len(self.steps) - 1)])
        keep = torch.cat([mask.reshape(-1).bool(), torch.ones(B * (len(self.steps) - 1), dtype=torch.bool)])
        if owner.shape[0] != matrix.shape[0]:
            raise ValueError(f"the trace has {matrix.shape[0]} token rows; its prefill mask implies {owner.shape[0]}")
        order = torch.sort(owner[keep], stable=True).indices
        return matrix[keep][order], owner[keep][order]

    def _mask(self) -> torch.Tensor:
        if self.attention_mask is None:
            rows = next(iter(self.steps[0].values())).indices.shape[0] if self.steps and self.steps[0] else 0
            return torch.ones(1, rows, dtype=torch.long)   # one sequence: a trace made before masks were kept
        return self.attention_mask

    def plot_prompts(self, path, labels: list[str] | None = None, generated: torch.Tensor | None = None,
                     eos_id: int | None = None) -> Path:
        """PNG, prompts x adapters: each prompt's share of (token, layer) decisions (`prompt_shares`).
        labels: one per prompt (default: the prompts' texts), shown whole, wrapped."""
        from .plots import prompt_grid

        shares = self.prompt_shares(generated, eos_id)
        return prompt_grid(path, shares, self.adapter_names + ["none"], self._labels(labels, shares.shape[0]),
                           title="share of (token, layer) decisions per adapter")

    def heatmap(self, path, module: str | None = None, tokens: list[str] | None = None, prompt: int | None = None,
                labels: list[str] | None = None) -> Path:
        """PNG of routing weights, tokens x adapters, for one module (default: all modules averaged).

        prompt=i: that prompt's tokens alone (`tokens`: their strings, for the rows). Otherwise the whole
        batch, padding dropped, split by prompt with a rule and its label (`labels`, default its text)."""
        from .plots import token_heatmap

        matrix, owner = self.token_rows(module)
        title = module or f"mean over {len(self.modules)} modules"
        if prompt is not None:
            if not 0 <= prompt < int(self._mask().shape[0]):
                raise ValueError(f"prompt={prompt} but the trace holds {int(self._mask().shape[0])} prompt(s)")
            return token_heatmap(path, matrix[owner == prompt], self.adapter_names, tokens=tokens,
                                 title=f"{self._labels(labels, int(self._mask().shape[0]))[prompt]}\n({title})")
        labels = self._labels(labels, int(self._mask().shape[0]))
        return token_heatmap(path, matrix, self.adapter_names, tokens=tokens, owner=owner, labels=labels, title=title)

    def _labels(self, labels, count: int) -> list[str]:
        labels = list(labels) if labels is not None else list(self.prompts or [f"prompt {i}" for i in range(count)])
        if len(labels) != count:
            raise ValueError(f"{len(labels)} labels for {count} prompts")
        return labels


def routing_trace(model) -> RoutingTrace:
    state = composer_state(model)
    return RoutingTrace(list(state.adapter_names), list(state.steps),
                        list(dict.fromkeys(state.sequence_state.get("notes", []))),
                        attention_mask=state.prefill_mask, prompts=state.prompts)
