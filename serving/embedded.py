"""The embedded engine: one composed model in this process, continuous batching of mixed adapters.

    request -> RequestRouter.decide -> bounded queue -> [scheduler loop] -> per-sequence output queue -> chunks

The scheduler loop (one asyncio task; model calls run on one worker thread so the event loop keeps serving
HTTP) repeats, every iteration bounded:
    admit   idle: wait for a request, then up to max_wait_ms for others to arrive with it; busy: take what is
            queued, up to max_batch_size running sequences, without waiting
    prefill the newcomers together (left-padded), each row with its own routing; their caches join the batch
    decode  one token for every running sequence in one forward pass (each row its own routing, one
            `lora_mixture` call per module); sequences that finished, or whose client left, are dropped and
            their cache rows freed before the next step
New requests therefore join a running batch at the next decode step (continuous batching) and never wait for
it to drain: on a model this small the decode step is cheap next to a request's length, so letting a request
wait for the batch to end would cost more latency than the extra prefill passes cost throughput.
"""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from ..composer.compose import compose
from ..routers.base import Router
from .batch import RunningBatch, prefill_inputs, sample
from .batch_router import BatchRouter, RowRouting
from .engine import (BadRequestError, Engine, EngineChunk, EngineRequest, EngineUnavailableError, RoutingDecision,
                     ServingError)
from .routing import RequestRouter

__all__ = ["EmbeddedEngine"]

MIN_SHARE = 1e-3   # per-token summaries leave out adapters with less of the prompt's routing weight


@dataclass(eq=False)
class _Sequence:
    request: EngineRequest
    decision: RoutingDecision | None     # None until the router decides (model="auto", at the prefill)
    prompt_ids: list[int]
    output: asyncio.Queue
    generator: torch.Generator | None
    row: RowRouting | None = None
    generated: list[int] = field(default_factory=list)
    sent: str = ""                  # text already emitted
    next_token: int = 0             # the last sampled token: the next decode step's input
    routed: bool = False            # the first chunk (with the routing decision) went out
    finished: bool = False
    cancelled: bool = False         # the client left: dropped at the next step

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled


class EmbeddedEngine(Engine):
    """Args:
        model: a Hugging Face causal LM (composed here, in place, over the library's adapters).
        tokenizer: its tokenizer (`__call__`, `decode`, `eos_token_id`, optional chat template).
        library: the adapter library; router: the zero-shot router for `model="auto"`.
        router_label: the router's name in decisions (e.g. its config name); base_model_name: the model name
            that serves no adapter (default: the library's base model's folder name).
        max_batch_size: running sequences at most; max_wait_ms: how long an idle engine waits for company;
        max_queue: requests waiting at most (then 503); max_context: prompt + max_tokens at most (default
            the model's max_position_embeddings).
    """

    name = "embedded"

    def __init__(self, model, tokenizer, library, router: Router, *, router_label: str | None = None,
                 base_model_name: str | None = None, adapter_names: list[str] | None = None,
                 max_batch_size: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256,
                 max_context: int | None = None, backend: str = "auto"):
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("EmbeddedEngine needs max_batch_size >= 1, max_wait_ms >= 0 and max_queue >= 1")
        names = list(adapter_names) if adapter_names is not None else library.names()
        self._base_name = base_model_name or Path(library.base_model.name).name
        self.request_router = RequestRouter(router, library, base_model_name=self._base_name,
                                            adapter_names=names, label=router_label)
        self.batch_router = BatchRouter(router if self.request_router.per_token else None)
        self.model = compose(model.eval(), library, self.batch_router, adapters=names, trace=False, backend=backend)
        self.tokenizer = tokenizer
        self.adapter_index = {name: i for i, name in enumerate(names)}
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.max_queue = max_queue
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_context = min(limit, max_context) if max_context else limit
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        # the KV cache's keyword: `past_key_values` up to transformers 5.2x, `cache` after
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._pending: asyncio.Queue | None = None
        self._running: list[_Sequence] = []
        self._batch = RunningBatch()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.counters = {"forward_passes": 0, "batched_rows": 0}

    # -- Engine ------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return self.request_router.models()

    @property
    def base_model_name(self) -> str:
        return self._base_name

    @property
    def max_context(self) -> int:
        return self._max_context

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    async def start(self) -> None:
        if self._task is not None:
            return
        self._pending = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptermix-engine")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Cancel the loop; every waiting or running request ends with a 503."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        gone = EngineUnavailableError("the engine stopped")
        while not self._pending.empty():
            self._pending.get_nowait().output.put_nowait(gone)
        for sequence in self._running:
            sequence.output.put_nowait(gone)
        self._running, self._batch, self._task = [], RunningBatch(), None
        self._executor.shutdown(wait=True)

    def health(self) -> dict:
        alive = self._task is not None and not self._task.done()
        return {"status": "ok" if alive else "unavailable", "engine": self.name,
                "running": len(self._running), "queued": self._pending.qsize() if self._pending else 0}

    def metrics(self) -> dict[str, float]:
        return {"queue_length": self._pending.qsize() if self._pending else 0,
                "running_sequences": len(self._running),
                "kv_cache_rows": len(self._batch), "kv_cache_length": self._batch.length,
                "forward_passes_total": self.counters["forward_passes"],
                "batched_rows_total": self.counters["batched_rows"]}

    async def generate(self, request: EngineRequest):
        if self._task is None or self._task.done():
            raise EngineUnavailableError("the embedded engine is not running")
        decision = self.request_router.resolve(request)     # None: model="auto", routed with its batch
        prompt_ids = self._encode(request.prompt)
        if not prompt_ids:
            raise BadRequestError("the prompt is empty", param="prompt")
        if len(prompt_ids) + request.sampling.max_tokens > self.max_context:
            raise BadRequestError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                                  f"({request.sampling.max_tokens}) exceeds the context of {self.max_context} tokens",
                                  param="max_tokens")
        seed = request.sampling.seed
        sequence = _Sequence(request, decision, prompt_ids, asyncio.Queue(),
                             torch.Generator().manual_seed(seed) if seed is not None else None)
        try:
            self._pending.put_nowait(sequence)
        except asyncio.QueueFull:
            raise EngineUnavailableError(f"the request queue is full ({self.max_queue} waiting); retry later") from None
        try:
            while True:
                chunk = await sequence.output.get()
                if isinstance(chunk, ServingError):
                    raise chunk
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            sequence.cancelled = not sequence.finished     # a client that leaves drops its row at the next step

    # -- the scheduler -----------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            joiners = await self._admit()
            if joiners:
                await self._step(self._prefill, joiners)
            if self._running:
                await self._step(self._decode, self._running)

    async def _step(self, step, sequences: list[_Sequence]) -> None:
        """Run one prefill or decode on the worker thread; hand each sequence its chunk."""
        try:
            events = await asyncio.get_running_loop().run_in_executor(self._executor, step, sequences)
        except Exception as exc:   # a failed forward ends the sequences in it; the engine goes on
            events = self._fail(list(sequences), exc)
        for sequence, chunk in events:
            if not sequence.cancelled:
                sequence.output.put_nowait(chunk)

    async def _admit(self) -> list[_Sequence]:
        free = self.max_batch_size - len(self._running)
        joiners: list[_Sequence] = []
        if free > 0 and not self._running:
            joiners.append(await self._pending.get())
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(joiners) < free:
                try:
                    timeout = deadline - asyncio.get_running_loop().time()
                    joiners.append(await asyncio.wait_for(self._pending.get(), max(timeout, 0)))
                except TimeoutError:
                    break
        while len(joiners) < free and not self._pending.empty():
            joiners.append(self._pending.get_nowait())
        return [s for s in joiners if not s.cancelled]

    @torch.no_grad()
    def _prefill(self, joiners: list[_Sequence]) -> list:
        self._route(joiners)
        inputs = prefill_inputs([s.prompt_ids for s in joiners], self.pad_id)
        self.batch_router.assign([s.row for s in joiners])
        out = self.model(**inputs, **{self._cache_kwarg: DynamicCache()}, use_cache=True, logits_to_keep=1)
        self._count(len(joiners))
        for b, sequence in enumerate(joiners):
            if sequence.row.per_token:
                sequence.decision = _summary(sequence.decision, self.batch_router.prompt_shares[b],
                                             list(self.adapter_index))
        self._batch.join(_returned_cache(out), inputs["attention_mask"])
        self._running += joiners
        return self._accept(joiners, out.logits[:, -1])

    @torch.no_grad()
    def _decode(self, _running=None) -> list:
        self._compact()
        if not self._running:
            return []
        self.batch_router.assign([s.row for s in self._running])
        tokens = torch.tensor([s.next_token for s in self._running])
        out = self.model(**self._batch.decode_inputs(tokens), **{self._cache_kwarg: self._batch.cache()},
                         logits_to_keep=1)
        self._count(len(self._running))
        self._batch.advance(_returned_cache(out))
        events = self._accept(self._running, out.logits[:, -1])
        self._compact()
        return events

    def _compact(self) -> None:
        """Drop finished and cancelled sequences and their cache rows."""
        live = [b for b, s in enumerate(self._running) if not s.done]
        if len(live) < len(self._running):
            self._batch.keep(live)
            self._running = [self._running[b] for b in live]

    def _count(self, rows: int) -> None:
        self.counters["forward_passes"] += 1
        self.counters["batched_rows"] += rows

    def _fail(self, sequences: list[_Sequence], exc: Exception) -> list:
        if any(s in self._running for s in sequences):   # the batch cache may be half-updated: end the batch
            sequences = list(dict.fromkeys([*sequences, *self._running]))
            self._running, self._batch = [], RunningBatch()
        error = EngineUnavailableError(f"the forward pass failed: {type(exc).__name__}: {exc}")
        for sequence in sequences:
            sequence.finished = True
        return [(s, error) for s in sequences]

    # -- tokens to text ----------------------------------------------------------------------------------

    def _accept(self, sequences: list[_Sequence], logits: torch.Tensor) -> list:
        """Sample each sequence's next token from its (V,) logits; the chunk it produces, if any."""
        events = []
        for b, sequence in enumerate(sequences):
            if sequence.done:
                continue
            params = sequence.request.sampling
            token = sample(logits[b], params.temperature, params.top_p, sequence.generator)
            chunk = self._advance_text(sequence, token)
            if chunk is not None:
                events.append((sequence, chunk))
        return events

    def _advance_text(self, sequence: _Sequence, token: int) -> EngineChunk | None:
        params = sequence.request.sampling
        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            sequence.generated.append(token)
            sequence.next_token = token
        text = self.tokenizer.decode(sequence.generated, skip_special_tokens=True)
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and len(sequence.generated) >= params.max_tokens:
            finish = "length"
        if finish is None:    # hold back what may still become a stop string or a multi-byte character
            hold = max([0, *(len(s) - 1 for s in params.stop)])
            text = text[:len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        delta = text[len(sequence.sent):] if text.startswith(sequence.sent) else ""
        first = not sequence.routed
        if not delta and not first and finish is None:
            return None
        sequence.sent += delta
        sequence.routed = True
        sequence.finished = finish is not None
        return EngineChunk(delta, routing=sequence.decision if first else None, finish_reason=finish,
                           prompt_tokens=len(sequence.prompt_ids), completion_tokens=len(sequence.generated))

    # -- routing -----------------------------------------------------------------------------------------

    def _route(self, joiners: list[_Sequence]) -> None:
        """Decide the routing of the newcomers that asked for `auto`, in one batch; set every row's routing."""
        unrouted = [s for s in joiners if s.decision is None]
        if unrouted:
            decisions = self.request_router.route_many([s.request.route_text for s in unrouted])
            for sequence, decision in zip(unrouted, decisions):
                sequence.decision = decision
        for sequence in joiners:
            sequence.row = self._row_routing(sequence.decision)

    def _row_routing(self, decision: RoutingDecision) -> RowRouting:
        if decision.per_token:
            return RowRouting(per_token=True)
        return RowRouting(tuple(self.adapter_index[n] for n in decision.adapters), tuple(decision.weights))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _summary(placeholder: RoutingDecision, shares: torch.Tensor, names: list[str]) -> RoutingDecision:
    """A per-token router's decision: each adapter's share of the prompt's routing weight, largest first."""
    total = float(shares.sum())
    if total <= 0:
        return RoutingDecision((), (), router=placeholder.router, note=placeholder.note, per_token=True)
    ranked = sorted(((float(s) / total, n) for s, n in zip(shares, names) if s / total >= MIN_SHARE), reverse=True)
    return RoutingDecision(tuple(n for _, n in ranked), tuple(w for w, _ in ranked), router=placeholder.router,
                           note=placeholder.note, per_token=True)


def _returned_cache(out) -> DynamicCache:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {getattr(tokenizer, "eos_token_id", None)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {int(i) for i in ids if i is not None}
