"""Sequence-level zero-shot routing from the adapters' own weights (the routing-quality issue; the diagnosis
behind each option is in docs/ROUTING.md).

Plain Arrow decides per token and per module from one prototype. Here, per prompt:

    score_e(x) = |<p_e, x>|                          score="prototype" (Arrow's top singular direction)
               = ||dW_e x|| / ||dW_e||_F             score="subspace"  (every direction, by singular value;
                                                                       from the stored SVD of the factors)
    x <- x - mu_module                               calibrate=True: mu from the library's own example
                                                     prompts (user tokens), and each adapter's score
                                                     z-scored against its scores on those tokens
    S_e = mean over the prompt's user tokens         (chat-template and system tokens left out)

aggregate="module": each module picks from its own S at the prefill; aggregate="global": a probe pass of the
base model (adapters off) collects every module's S first, z-scored across adapters and summed, and one
choice serves every module. Either way the choice is held for the generated tokens (decode steps cost what a
fixed routing costs). candidates=m (hybrid): retrieval over the adapters' description / example embeddings
proposes m adapters per prompt and the weight scores choose among them; retrieval_weight adds retrieval's
(z-scored) similarity instead, with lexical_weight times the TF-IDF cosine in it (routers/lexical.py).

calibration="generic" calibrates on generic text that belongs to no task (routers/generic_text.py) instead
of the library's example prompts: calibrated weight routing for a library without text.

combine="confidence" trusts each signal by its own confidence instead of a fixed weight: with W and R the
weight scores and the retrieval similarities, each z-scored across adapters per prompt, and m(.) the margin
between a prompt's top two z-scores,

    S = m(W) * W + retrieval_weight * m(R) * R

so a prompt worded like an adapter's example (a wide retrieval margin) follows retrieval, and one worded
otherwise (retrieval unsure) follows the weights. min_similarity: a prompt whose best retrieval cosine
(or, without text, whose top weight z-score) is below it gets no adapter (the base model; the trace says so).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..library.errors import BaseModelMismatchError, CalibrationMismatchError
from .base import Router, register
from .generic_text import GENERIC_PROMPTS, generic_corpus_hash
from .lexical import LexicalIndex, adapter_documents, require_text
from .prompt_tokens import user_token_mask
from .routing import Routing, RoutingContext, decline

__all__ = ["HybridRouter", "SequenceArrowRouter", "combined_scores"]

_KEY = "sequence_arrow"


@register
class SequenceArrowRouter(Router):
    """Args: top_k; temperature (softmax over the top-k sequence scores); score: 'subspace' | 'prototype';
    aggregate: 'global' | 'module'; calibrate: centre hidden states and z-score adapters on the library's
    example prompts; candidates: retrieval proposes this many adapters first (None: all); retrieval_weight:
    adds that many standard deviations of retrieval similarity to the (z-scored) weight scores; lexical_weight:
    retrieval's similarity adds this many times the TF-IDF word-n-gram cosine (with candidates / retrieval_weight);
    calibration: 'library' (the adapters' example prompts) | 'generic' (text of no task, routers/generic_text.py);
    combine: 'sum' (fixed retrieval_weight) | 'confidence' (each signal weighted by its margin); min_similarity:
    below it a prompt gets no adapter (best retrieval cosine; without text, the top weight z-score)."""

    name = "sequence_arrow"

    def __init__(self, *, top_k: int = 1, temperature: float = 0.1, score: str = "subspace",
                 aggregate: str = "global", calibrate: bool = True, candidates: int | None = None,
                 retrieval_weight: float = 0.0, lexical_weight: float = 0.0, calibration: str = "library",
                 combine: str = "sum", min_similarity: float | None = None):
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"SequenceArrowRouter needs top_k >= 1 and temperature > 0, got {top_k}, {temperature}")
        if score not in ("subspace", "prototype") or aggregate not in ("global", "module"):
            raise ValueError(f"score must be 'subspace' or 'prototype' and aggregate 'global' or 'module', "
                             f"got {score!r}, {aggregate!r}")
        if candidates is not None and candidates < top_k:
            raise ValueError(f"candidates ({candidates}) must be >= top_k ({top_k})")
        if lexical_weight < 0 or (lexical_weight and candidates is None and not retrieval_weight):
            raise ValueError(f"lexical_weight ({lexical_weight}) must be >= 0, and it only acts with candidates or "
                             f"retrieval_weight")
        if calibration not in ("library", "generic") or combine not in ("sum", "confidence"):
            raise ValueError(f"calibration must be 'library' or 'generic' and combine 'sum' or 'confidence', got "
                             f"{calibration!r}, {combine!r}")
        if combine == "confidence" and not retrieval_weight:
            raise ValueError("combine='confidence' weighs weight scores against retrieval: give retrieval_weight > 0")
        self.top_k, self.temperature, self.score_kind = top_k, temperature, score
        self.aggregate, self.calibrate, self.candidates = aggregate, calibrate, candidates
        self.retrieval_weight, self.lexical_weight = retrieval_weight, lexical_weight
        self.calibration, self.combine, self.min_similarity = calibration, combine, min_similarity
        self.last_signals: dict[str, torch.Tensor] = {}      # the last batch's raw signals, for diagnostics
        self.probe = aggregate == "global" or calibrate          # the composer runs probe passes for us
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._stacked_stats: tuple | None = None                 # (stats it was stacked from, {key: stacked})

    # -- set-up ------------------------------------------------------------------------------------

    def bind(self, library, adapter_names, available):
        super().bind(library, adapter_names, available)
        self.library = library
        # Modules of one input width share one stack, so a probe pass scores them in one batched matmul:
        # stacks[d_in] (M_d, N, r, d_in), rows scaled; directions[module] (N, r, d_in) is a view into it.
        per_adapter = [library.prototypes(name, modules=list(available)) for name in adapter_names]
        groups: dict[int, list[str]] = {}
        for module in available:
            groups.setdefault(next(p[module][0].shape[1] for p in per_adapter if module in p), []).append(module)
        r = max(p[m][0].shape[0] if self.score_kind == "subspace" else 1 for p in per_adapter for m in p)
        self.stacks, self.slots, self.directions = {}, {}, {}
        for d_in, modules in groups.items():
            stack = torch.zeros(len(modules), len(adapter_names), r, d_in)
            for j, module in enumerate(modules):
                self.slots[module] = (d_in, j)
                for e, p in enumerate(per_adapter):
                    if module not in p:
                        continue
                    vectors, values = p[module]
                    if self.score_kind == "prototype":
                        stack[j, e, 0] = vectors[0]
                    else:
                        stack[j, e, :vectors.shape[0]] = vectors * (values / values.norm().clamp_min(1e-12))[:, None]
                self.directions[module] = stack[j]
            self.stacks[d_in] = stack
        self._stacked_stats = None
        self.masks = {m: (None if bool(mask.all()) else mask) for m, mask in available.items()}
        records = [library.record(name) for name in adapter_names]
        if self.candidates is not None or self.retrieval_weight:
            require_text(type(self).__name__, records, " (candidates / retrieval_weight)")
        if self.calibrate and self.calibration == "library":
            require_text(type(self).__name__, records, " (calibration='library')")
        if self.candidates is not None or self.retrieval_weight:
            _, vectors = library.text_embeddings(adapter_names)
            self.text_embeddings = torch.from_numpy(vectors)
            self.encoder = library.encoder
        self.lexical = None
        if self.lexical_weight:
            self.lexical = LexicalIndex(adapter_documents(records))

    def reference_texts(self) -> list[str]:
        """Calibration text: every composed adapter's example prompts (or description when it has none), or
        the generic corpus."""
        if self.calibration == "generic":
            return list(GENERIC_PROMPTS)
        texts = []
        for name in self.adapter_names:
            record = self.library.record(name)
            texts += [t for t in record.examples if t.strip()] or [record.description]
        return texts

    # -- scores ------------------------------------------------------------------------------------

    def _token_scores(self, module: str, x: torch.Tensor, zscore: bool = True,
                      subset: torch.Tensor | None = None) -> torch.Tensor:
        """(T, N) per-token scores at one module (centred and z-scored once calibrated); (T, M) for the
        adapters `subset` (M indices) only."""
        directions = self.directions[module]
        if directions.device != x.device:
            directions = self.directions[module] = directions.to(x.device)
        x = x.float()
        stats = self.stats[module] if self.stats is not None else None
        if subset is not None:
            directions = directions[subset.to(x.device)]
        if stats is not None:
            x = x - stats[0].to(x.device)
        projected = torch.einsum("td,nrd->tnr", x, directions)
        scores = projected.abs()[..., 0] if self.score_kind == "prototype" else projected.norm(dim=2)
        if zscore and stats is not None and stats[1] is not None:
            mean, std = stats[1].to(x.device), stats[2].to(x.device)
            if subset is not None:
                mean, std = mean[subset.to(x.device)], std[subset.to(x.device)]
            scores = (scores - mean) / std
        return scores

    def _sequence_scores(self, module: str, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """(batch, N): mean over each prompt's user tokens (only they are scored); with `candidates`, only
        each prompt's candidates are scored, the others -inf."""
        users = self._user_mask(context).to(x.device).reshape(-1)                             # (B·L,)
        allowed = self._candidate_mask(context)                                               # (B, N) or None
        subset = None if allowed is None else allowed.any(0).nonzero().flatten()
        rows = context.sequence_ids.to(x.device)[users]
        scores = self._token_scores(module, x[users], subset=subset)                          # (U, N or M)
        per_sequence = torch.zeros(context.batch_size, scores.shape[1], device=x.device).index_add_(0, rows, scores)
        ones = torch.ones_like(rows, dtype=torch.float)
        counts = torch.zeros(context.batch_size, device=x.device).index_add_(0, rows, ones)
        per_sequence = per_sequence / counts.clamp_min(1)[:, None]
        if subset is not None:
            full = torch.full((context.batch_size, len(self.adapter_names)), float("-inf"), device=x.device)
            full[:, subset.to(x.device)] = per_sequence
            per_sequence = full.masked_fill(~allowed.to(x.device), float("-inf"))
        mask = self.masks[module]
        if mask is not None:
            per_sequence = per_sequence.masked_fill(~mask.to(x.device)[None, :], float("-inf"))
        return per_sequence

    def _similarity(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dense cosine, TF-IDF cosine or None) of the prompts to the adapters' texts, each (batch, N)."""
        queries = torch.from_numpy(self.encoder.encode([p if p.strip() else "-" for p in prompts]))
        dense = queries @ self.text_embeddings.T
        return dense, (self.lexical.similarity(prompts) if self.lexical is not None else None)

    def _candidate_mask(self, context: RoutingContext) -> torch.Tensor | None:
        """(batch, N) bool: retrieval's top `candidates` adapters of each prompt (None: every adapter), once
        per batch: the weight scores are computed for those only (the cost of a large library)."""
        if self.candidates is None:
            return None
        key = (_KEY, "candidates")
        if key not in context.state:
            if context.prompts is None:
                raise ValueError("SequenceArrowRouter(candidates) needs the prompt texts: pass tokenizer= to compose() "
                                 "or call adaptermix.set_prompts")
            dense, lexical = context.state[(_KEY, "similarity")] = self._similarity(context.prompts)
            similarity = dense if lexical is None else dense + self.lexical_weight * lexical
            near = similarity.topk(min(self.candidates, similarity.shape[1]), dim=1).indices
            context.state[key] = torch.zeros(similarity.shape, dtype=torch.bool).scatter_(1, near, True)
        return context.state[key]

    def _user_mask(self, context: RoutingContext) -> torch.Tensor:
        key = (_KEY, "users")
        if key not in context.state:
            if context.input_ids is None:
                raise ValueError("SequenceArrowRouter needs input_ids (not inputs_embeds) to find the user tokens")
            mask = context.attention_mask[:, -context.seq_len:] if context.attention_mask is not None else None
            context.state[key] = user_token_mask(context.input_ids, mask, context.tokenizer)
        return context.state[key]

    def _choose(self, scores: torch.Tensor, context: RoutingContext) -> Routing:
        """Top-k of (batch, N) scores; with text (candidates / retrieval_weight), retrieval's similarities
        restrict the choice to the nearest adapters and / or are added, z-scored across adapters, with a fixed
        weight or by confidence (`combined_scores`)."""
        dense = lexical = None
        if self.candidates is not None or self.retrieval_weight:
            if context.prompts is None:
                raise ValueError("SequenceArrowRouter(candidates / retrieval_weight) needs the prompt texts: pass "
                                 "tokenizer= to compose() or call adaptermix.set_prompts")
            dense, lexical = context.state.pop((_KEY, "similarity"), None) or self._similarity(context.prompts)
            dense, lexical = dense.to(scores.device), None if lexical is None else lexical.to(scores.device)
        self.last_signals = {k: v.detach().cpu() for k, v in
                             (("weights", scores), ("dense", dense), ("lexical", lexical)) if v is not None}
        scores, confidence = combined_scores(scores, dense, lexical, retrieval_weight=self.retrieval_weight,
                                             lexical_weight=self.lexical_weight, combine=self.combine,
                                             candidates=self.candidates)
        routing = Routing.from_scores(scores, self.top_k, self.temperature)
        empty = [not p.strip() for p in context.prompts] if context.prompts is not None else None
        return decline(routing, confidence, self.min_similarity, context.state.setdefault("notes", []), self.name,
                       empty=empty, measure="best similarity" if dense is not None else "top weight score")

    # -- the composer's probe protocol (ComposerState runs these passes at a prefill) -----------------

    def needs_calibration(self) -> bool:
        return self.calibrate and self.stats is None

    def begin_probe(self, state: dict, purpose: str) -> None:
        """purpose: 'mean' / 'spread' (calibration passes over reference_texts()), 'route' (the prompts)."""
        state[(_KEY, "probe")] = {"purpose": purpose, "sums": {}, "count": 0}

    def observe(self, module: str, x: torch.Tensor, context: RoutingContext) -> None:
        probe = context.state[(_KEY, "probe")]
        users = self._user_mask(context).to(x.device).reshape(-1)
        if probe["purpose"] == "mean":
            probe["sums"][module] = x.float()[users].mean(0)
        elif probe["purpose"] == "spread":
            scores = self._token_scores(module, x, zscore=False)[users]
            probe["sums"][module] = (scores.mean(0), scores.std(0).clamp_min(1e-6))
        else:                   # the prompts' user tokens, scored for every module at once in end_probe
            probe["sums"][module] = x.float()[users]
            probe.setdefault("rows", context.sequence_ids.to(x.device)[users])

    def end_probe(self, context: RoutingContext) -> None:
        probe = context.state.pop((_KEY, "probe"))
        if probe["purpose"] == "route" and probe["sums"]:
            total = self._probe_scores(probe["sums"], probe["rows"], context)
        context.state.pop((_KEY, "users"), None)
        context.state.pop((_KEY, "candidates"), None)
        if probe["purpose"] == "mean":
            self.stats = {m: (mu, None, None) for m, mu in probe["sums"].items()}
        elif probe["purpose"] == "spread":
            self.stats = {m: (self.stats[m][0], mean, std) for m, (mean, std) in probe["sums"].items()}
        elif probe["sums"]:
            context.state[(_KEY, "routing")] = self._choose(total, context)

    def _probe_scores(self, hidden: dict[str, torch.Tensor], rows: torch.Tensor,
                      context: RoutingContext) -> torch.Tensor:
        """(batch, N): each module's sequence scores (`_sequence_scores`) z-scored across adapters, averaged
        over modules; one batched matmul per input width (M modules, U user tokens, n scored adapters)
        instead of a loop over modules."""
        allowed = self._candidate_mask(context)                                               # (B, N) or None
        subset = None if allowed is None else allowed.any(0).nonzero().flatten()
        total = 0
        for d_in, stack in self.stacks.items():
            modules = [m for m in hidden if self.slots[m][0] == d_in]
            if not modules:
                continue
            x = torch.stack([hidden[m] for m in modules])                                     # (M, U, d)
            if stack.device != x.device:
                stack = self.stacks[d_in] = stack.to(x.device)
                self.directions.update({m: stack[j] for m, (d, j) in self.slots.items() if d == d_in})
            positions = [self.slots[m][1] for m in modules]
            whole = positions == list(range(len(stack)))
            directions = stack if whole else stack[torch.tensor(positions, device=x.device)]  # (M, N, r, d)
            if subset is not None:
                directions = directions.index_select(1, subset.to(x.device))                  # (M, n, r, d)
            scores = self._stacked_token_scores(modules, x, directions, subset)               # (M, U, n)
            per_sequence = self._stacked_sequence_scores(modules, scores, rows, context, subset, allowed)
            finite = torch.isfinite(per_sequence)                                             # (M, B, N)
            count = finite.sum(2, keepdim=True)
            centred = per_sequence - per_sequence.where(finite, 0).sum(2, keepdim=True) / count
            spread = centred.where(finite, 0).pow(2).sum(2, keepdim=True).div(count).sqrt()
            total = total + torch.where(finite, centred / spread.clamp_min(1e-6), 0.0).sum(0)
        return total / len(hidden)

    def _stacked_token_scores(self, modules: list[str], x: torch.Tensor, directions: torch.Tensor,
                              subset: torch.Tensor | None) -> torch.Tensor:
        """(M, U, n) `_token_scores` of M modules at once: x (M, U, d), directions (M, n, r, d)."""
        stats = self._stats_for(modules, x.device)
        if stats is not None:
            x = x - stats[0][:, None, :]
        m, n, r, d = directions.shape
        projected = torch.bmm(x, directions.reshape(m, n * r, d).transpose(1, 2)).view(m, -1, n, r)
        scores = projected[..., 0].abs() if self.score_kind == "prototype" else projected.norm(dim=3)
        if stats is not None and stats[1] is not None:
            mean, std = stats[1], stats[2]                                                    # (M, N)
            if subset is not None:
                mean, std = mean[:, subset.to(x.device)], std[:, subset.to(x.device)]
            scores = (scores - mean[:, None, :]) / std[:, None, :]
        return scores

    def _stacked_sequence_scores(self, modules, scores, rows, context, subset, allowed) -> torch.Tensor:
        """(M, B, N): `_sequence_scores` of M modules at once from their (M, U, n) token scores."""
        device = scores.device
        per_sequence = torch.zeros(len(modules), context.batch_size, scores.shape[2], device=device)
        per_sequence.index_add_(1, rows, scores)
        counts = torch.zeros(context.batch_size, device=device).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float))
        per_sequence = per_sequence / counts.clamp_min(1)[None, :, None]
        if subset is not None:
            full = torch.full((len(modules), context.batch_size, len(self.adapter_names)), float("-inf"), device=device)
            full[:, :, subset.to(device)] = per_sequence
            per_sequence = full.masked_fill(~allowed.to(device)[None], float("-inf"))
        masks = [self.masks[m] for m in modules]
        if any(mask is not None for mask in masks):
            available = torch.stack([torch.ones(len(self.adapter_names), dtype=torch.bool) if mask is None else mask
                                     for mask in masks]).to(device)                           # (M, N)
            per_sequence = per_sequence.masked_fill(~available[:, None, :], float("-inf"))
        return per_sequence

    def _stats_for(self, modules: list[str], device) -> tuple | None:
        """The calibration statistics of `modules` stacked: (M, d) means, (M, N) score means and stds; kept
        until `stats` is replaced (calibration, load_calibration assign a new dict)."""
        if self.stats is None:
            return None
        if self._stacked_stats is None or self._stacked_stats[0] is not self.stats:
            self._stacked_stats = (self.stats, {})
        key = (tuple(modules), str(device))
        if key not in self._stacked_stats[1]:
            stats = [self.stats[m] for m in modules]
            means = torch.stack([s[0] for s in stats]).to(device)
            spread = (None, None) if any(s[1] is None for s in stats) else (
                torch.stack([s[1] for s in stats]).to(device), torch.stack([s[2] for s in stats]).to(device))
            self._stacked_stats[1][key] = (means, *spread)
        return self._stacked_stats[1][key]

    # -- calibration saved with the library ---------------------------------------------------------

    def save_calibration(self, name: str) -> Path:
        """Write the calibration statistics as a library artifact (routers/<name>.safetensors)."""
        if self.stats is None or any(v[1] is None for v in self.stats.values()):
            raise ValueError("nothing to save: the router calibrates at the first prompt through the composed model")
        tensors = {}
        for module, (mean, score_mean, score_std) in self.stats.items():
            tensors.update({f"{module}::mean": mean, f"{module}::score_mean": score_mean,
                            f"{module}::score_std": score_std})
        metadata = {"router": self.name, "kind": "calibration", "score": self.score_kind,
                    "calibration": self.calibration, "reference_texts": self._reference_hash(),
                    "adapters": self.adapter_names, "content_hashes": self.library.content_hashes(self.adapter_names),
                    "base_fingerprint": self.library.base_model.fingerprint}
        return self.library.save_artifact(name, tensors, metadata)

    def load_calibration(self, name: str) -> "SequenceArrowRouter":
        """Use statistics saved for exactly this base model, these adapters and this score."""
        tensors, metadata = self.library.load_artifact(name)
        if metadata.get("kind") != "calibration":
            raise ValueError(f"artifact {name!r} holds no calibration statistics")
        if metadata.get("base_fingerprint") != self.library.base_model.fingerprint:
            raise BaseModelMismatchError(f"calibration {name!r} was computed for another base model than this "
                                         f"library's ({self.library.base_model.name!r})")
        if (metadata.get("adapters") != self.adapter_names
                or metadata.get("content_hashes") != self.library.content_hashes(self.adapter_names)):
            raise BaseModelMismatchError(f"calibration {name!r} was computed for adapters {metadata.get('adapters')} "
                                         f"(or other versions of them); this router composes {self.adapter_names}")
        saved = (metadata.get("score"), metadata.get("calibration"), metadata.get("reference_texts"))
        if saved != (self.score_kind, self.calibration, self._reference_hash()):
            raise CalibrationMismatchError(
                f"calibration {name!r} was computed for score={saved[0]!r}, calibration={saved[1]!r} (text "
                f"{saved[2]}); this router has score={self.score_kind!r}, calibration={self.calibration!r} "
                f"(text {self._reference_hash()})")
        self.stats = {m: (tensors[f"{m}::mean"], tensors[f"{m}::score_mean"], tensors[f"{m}::score_std"])
                      for m in self.directions}
        return self

    def _reference_hash(self) -> str:
        return generic_corpus_hash(tuple(self.reference_texts()))

    # -- routing -----------------------------------------------------------------------------------

    def route(self, module: str, x: torch.Tensor, context: RoutingContext) -> Routing:
        if self.aggregate == "global":
            def compute():
                if (_KEY, "routing") not in context.state:
                    raise RuntimeError("SequenceArrowRouter(aggregate='global') needs the composer's probe pass; "
                                       "compose the model with adaptermix.compose")
                return context.state[(_KEY, "routing")]
            routing = self.sequence_routing(context, compute)
        else:
            key = (_KEY, module)
            if context.is_prefill:
                context.state[key] = self._choose(self._sequence_scores(module, x, context), context)
            if key not in context.state:
                raise RuntimeError("SequenceArrowRouter has no routing for these sequences: the prefill did not "
                                   "run through the composed model")
            held = context.state[key]
            routing = Routing(held.indices[context.sequence_ids], held.weights[context.sequence_ids])
        return Routing(routing.indices.to(x.device), routing.weights.to(x.device))


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    """(batch, N) scores centred and scaled per row over the finite entries (-inf stays -inf)."""
    finite = torch.isfinite(scores)
    count = finite.sum(1, keepdim=True).clamp_min(1)
    mean = scores.where(finite, 0).sum(1, keepdim=True) / count
    std = (scores - mean).where(finite, 0).pow(2).sum(1, keepdim=True).div(count).sqrt().clamp_min(1e-6)
    return torch.where(finite, (scores - mean) / std, scores)


def _margin(zscores: torch.Tensor) -> torch.Tensor:
    """(batch, 1): how far a row's best z-score leads the best lower one (0 with one adapter, or when every
    score ties). Ties at the top do not count as doubt: two adapters with the same text (two seeds of one
    task) tie in retrieval, which is still as sure that the prompt belongs to one of them."""
    if zscores.shape[1] < 2:
        return torch.zeros(zscores.shape[0], 1, device=zscores.device)
    best = zscores.max(1, keepdim=True).values
    below = zscores.masked_fill(zscores >= best - 1e-6, float("-inf")).max(1, keepdim=True).values
    return torch.nan_to_num(best - below, posinf=0.0, neginf=0.0).clamp_min(0)


def combined_scores(weights: torch.Tensor, dense: torch.Tensor | None = None, lexical: torch.Tensor | None = None,
                    *, retrieval_weight: float = 0.0, lexical_weight: float = 0.0, combine: str = "sum",
                    candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (batch, N) scores a SequenceArrowRouter chooses by, and the (batch,) confidence it declines by.

    Args:
        weights: (batch, N) weight scores (z-scored per module and averaged over modules).
        dense: (batch, N) retrieval cosines to the adapters' texts, or None (no text read).
        lexical: (batch, N) TF-IDF cosines, or None.
    """
    if dense is None:
        return weights, weights.max(1).values
    similarity = dense if lexical is None else dense + lexical_weight * lexical
    scores = weights
    if retrieval_weight and combine == "confidence":
        z_weights, z_text = _zscore(weights), _zscore(similarity)
        scores = _margin(z_weights) * z_weights + retrieval_weight * _margin(z_text) * z_text
    elif retrieval_weight:
        centred = similarity - similarity.mean(1, keepdim=True)
        scores = weights + retrieval_weight * centred / centred.std(1, keepdim=True).clamp_min(1e-6)
    if candidates is not None:
        near = similarity.topk(min(candidates, similarity.shape[1]), dim=1).indices
        allowed = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, near, True)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, dense.max(1).values


@register
class HybridRouter(SequenceArrowRouter):
    """The default router (docs/ROUTING.md): SequenceArrowRouter with its settings chosen on the train split
    across conditions (benchmarks/tune_routing.py): calibrated subspace scores and dense + TF-IDF retrieval,
    each trusted by its margin (combine='confidence'); a prompt whose best retrieval cosine is below
    min_similarity gets no adapter. Needs the adapters' text; for a library without it use
    SequenceArrowRouter(calibration='generic')."""

    name = "hybrid"

    def __init__(self, *, top_k: int = 1, temperature: float = 0.1, score: str = "subspace",
                 aggregate: str = "global", calibrate: bool = True, calibration: str = "library",
                 candidates: int | None = None, retrieval_weight: float = 1.0, lexical_weight: float = 0.5,
                 combine: str = "confidence", min_similarity: float | None = 0.125):
        super().__init__(top_k=top_k, temperature=temperature, score=score, aggregate=aggregate, calibrate=calibrate,
                         calibration=calibration, candidates=candidates, retrieval_weight=retrieval_weight,
                         lexical_weight=lexical_weight, combine=combine, min_similarity=min_similarity)
