"""The one mechanism that carries routing context into the layers.

`compose` attaches a `ComposerState` to the model and registers a single forward pre-hook on it. The hook
reads the call's input_ids / inputs_embeds, attention mask and KV-cache length, and sets `state.context`;
every mixture layer reads it from the state it was built with. Gradient-checkpoint recomputation reads the
same context (no other forward runs between a forward and its backward). Generation steps with a KV cache
keep the per-sequence state of the prefill (sequence-level routers hold their choice).
"""

from __future__ import annotations

import torch

from ..routers.prompt_tokens import user_messages
from ..routers.routing import Routing, RoutingContext

__all__ = ["ComposerState"]


# The KV cache's keyword: `past_key_values` up to transformers 5.2x, `cache` after.
CACHE_KWARGS = ("past_key_values", "cache")


def _cache_length(kwargs: dict) -> int:
    past = next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if len(past) else 0


class ComposerState:
    def __init__(self, router, adapter_names: list[str], tokenizer=None, trace: bool = True):
        self.router = router
        self.adapter_names = adapter_names
        self.tokenizer = tokenizer
        self.trace_enabled = trace
        self.context: RoutingContext | None = None
        self.sequence_state: dict = {}
        self.pending_prompts: list[str] | None = None
        self.prompts: list[str] | None = None
        self.prefill_mask: torch.Tensor | None = None  # (batch, L) of the last prefill, for the trace's plots
        self.steps: list[dict[str, Routing]] = []
        self.originals: dict[str, torch.nn.Module] = {}
        self.hook = None
        self.probing = False                     # inside a router's probe pass (composer/state.py _probe)
        self.probe_state: dict | None = None
        self.validate_routing = True             # check router output at each layer (composer/layer.py)

    def pre_forward(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise ValueError("adaptermix: the composed model needs input_ids or inputs_embeds")
        batch, seq_len = reference.shape[0], reference.shape[1]
        past_len = _cache_length(kwargs)
        device = reference.device
        if self.probing:                     # a probe pass the router asked for: adapters off, nothing traced
            self.context = RoutingContext(
                batch_size=batch, seq_len=seq_len, past_len=0,
                sequence_ids=torch.arange(batch, device=device).repeat_interleave(seq_len),
                attention_mask=kwargs.get("attention_mask"), input_ids=input_ids,
                prompts=self.prompts if self.probe_state is self.sequence_state else None,
                state=self.probe_state, tokenizer=self.tokenizer)
            return
        if past_len == 0:
            self.sequence_state = {}
            self.steps = []
            self.prompts = self._prompts(input_ids, kwargs.get("attention_mask"), batch)
            mask = kwargs.get("attention_mask")
            self.prefill_mask = (mask.detach().cpu() if mask is not None
                                 else torch.ones(batch, seq_len, dtype=torch.long))
        self.context = RoutingContext(
            batch_size=batch, seq_len=seq_len, past_len=past_len,
            sequence_ids=torch.arange(batch, device=device).repeat_interleave(seq_len),
            attention_mask=kwargs.get("attention_mask"), input_ids=input_ids, prompts=self.prompts,
            state=self.sequence_state, tokenizer=self.tokenizer,
        )
        if self.trace_enabled:
            self.steps.append({})
        if past_len == 0 and getattr(self.router, "probe", False):
            self._probe(module, args, kwargs)

    # -- probe passes (routers that read the base model's hidden states before routing a prompt) -------

    def _probe(self, model, args, kwargs) -> None:
        """Calibration passes over the router's reference texts (once), then, for routers that decide per
        prompt across all layers, one pass over the prompt itself; adapters are off in both."""
        outer = self.context
        device = next(model.parameters()).device
        if self.router.needs_calibration():
            if self.tokenizer is None:
                raise ValueError(f"{type(self.router).__name__}(calibrate=True) reads the library's example prompts: "
                                 "pass tokenizer= to adaptermix.compose")
            texts = self.router.reference_texts()
            if getattr(self.tokenizer, "chat_template", None):
                texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                            add_generation_prompt=True) for t in texts]
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            for purpose in ("mean", "spread"):
                self._run_probe(model, purpose, (), {"input_ids": encoded.input_ids.to(device),
                                                     "attention_mask": encoded.attention_mask.to(device)}, {})
        if getattr(self.router, "aggregate", None) == "global":
            call = dict(kwargs, use_cache=False, **{name: None for name in CACHE_KWARGS if name in kwargs})
            self._run_probe(model, "route", args, call, self.sequence_state)
        self.context = outer

    def _run_probe(self, model, purpose: str, args, kwargs, state: dict) -> None:
        self.router.begin_probe(state, purpose)
        self.probing, self.probe_state = True, state
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            self.probing, self.probe_state = False, None
        self.router.end_probe(self.context)

    def _prompts(self, input_ids, attention_mask, batch: int) -> list[str] | None:
        if self.pending_prompts is not None:
            prompts, self.pending_prompts = self.pending_prompts, None
            if len(prompts) != batch:
                raise ValueError(f"set_prompts got {len(prompts)} texts for a batch of {batch}")
            return prompts
        if self.tokenizer is None or input_ids is None:
            return None
        return user_messages(input_ids, attention_mask, self.tokenizer)   # not the template / system prompt

    def record(self, module: str, routing: Routing) -> None:
        if self.trace_enabled and self.steps:
            # kept on its device: copying to the host here would sync a GPU at every layer
            self.steps[-1][module] = Routing(routing.indices.detach(), routing.weights.detach())
