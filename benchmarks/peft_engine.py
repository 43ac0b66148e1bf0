"""PEFT's mixed batch behind the server's engine interface: the baseline of benchmarks/serve_load.py.

A PeftModel holds every adapter of the example library; requests are routed by the same RequestRouter as the
embedded engine (top-1: PEFT's mixed batch serves one adapter per sequence) and served batch-at-a-time:
gather up to max_batch_size requests (max_wait_ms), then one `model.generate(..., adapter_names=[...])` over
the left-padded batch, greedy. That is how PEFT serves mixed adapters: it has no scheduler, KV-cache
management or streaming of its own, so each request's text arrives when its batch ends (TTFT = latency), and
requests that arrive during a batch wait for it to end.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from adaptermix.serving.engine import BadRequestError, Engine, EngineChunk, EngineRequest, EngineUnavailableError
from adaptermix.serving.routing import RequestRouter

__all__ = ["PeftEngine"]


class PeftEngine(Engine):
    name = "peft"

    def __init__(self, model, tokenizer, library, router, checkpoints: Path, *, router_label: str | None = None,
                 max_batch_size: int = 16, max_wait_ms: float = 10.0, max_context: int = 2048):
        from peft import PeftModel

        names = library.names()
        self._base_name = Path(library.base_model.name).name
        self.request_router = RequestRouter(router, library, base_model_name=self._base_name, label=router_label)
        self.model = PeftModel.from_pretrained(model.eval(), checkpoints / names[0], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(checkpoints / name, adapter_name=name)
        self.model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.max_batch_size, self.max_wait, self._max_context = max_batch_size, max_wait_ms / 1000, max_context
        self._pending: asyncio.Queue | None = None
        self._task = None
        self._executor: ThreadPoolExecutor | None = None

    def models(self):
        return self.request_router.models()

    @property
    def base_model_name(self):
        return self._base_name

    @property
    def max_context(self):
        return self._max_context

    def count_tokens(self, text):
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def health(self):
        return {"status": "ok" if self._task is not None and not self._task.done() else "unavailable"}

    async def start(self):
        self._pending = asyncio.Queue(maxsize=1024)
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self):
        self._task.cancel()
        self._executor.shutdown(wait=True)

    async def generate(self, request: EngineRequest):
        decision = self.request_router.decide(request)
        if len(decision.adapters) > 1:
            raise BadRequestError("PEFT's mixed batch serves one adapter per request", param="adapters")
        done = asyncio.get_running_loop().create_future()
        await self._pending.put((request, decision, done))
        text, finish, prompt_tokens, completion_tokens = await done
        yield EngineChunk(text, routing=decision)
        yield EngineChunk("", finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(await asyncio.wait_for(self._pending.get(), max(deadline - loop.time(), 0)))
                except TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(self._executor, self._generate, batch)
            except Exception as exc:
                for *_, done in batch:
                    done.set_exception(EngineUnavailableError(f"PEFT generate failed: {exc}"))
                continue
            for (*_, done), result in zip(batch, results):
                done.set_result(result)

    @torch.no_grad()
    def _generate(self, batch):
        prompts = [request.prompt for request, _, _ in batch]
        names = [decision.adapters[0] if decision.adapters else "__base__" for _, decision, _ in batch]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        longest = max(request.sampling.max_tokens for request, _, _ in batch)
        fixed_length = all(request.sampling.ignore_eos for request, _, _ in batch)
        output = self.model.generate(**inputs, adapter_names=names, max_new_tokens=longest, do_sample=False,
                                     min_new_tokens=longest if fixed_length else None,
                                     pad_token_id=self.tokenizer.pad_token_id)
        results = []
        eos = self.tokenizer.eos_token_id
        for row, (request, _, _) in enumerate(batch):
            new = output[row, inputs.input_ids.shape[1]:][:request.sampling.max_tokens].tolist()
            finish = "stop" if eos in new else "length"
            new = new[:new.index(eos)] if eos in new else new
            prompt_tokens = int(inputs.attention_mask[row].sum())
            results.append((self.tokenizer.decode(new, skip_special_tokens=True), finish, prompt_tokens, len(new)))
        return results
