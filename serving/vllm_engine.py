"""engine=vllm: adaptermix routes, vLLM generates.

vLLM serves one LoRA per request, with its own kernels, tensor parallelism and continuous batching. In front of
it, per request:

    decision = RequestRouter.decide(request)      # zero-shot (model="auto"), a named adapter, the base model,
                                                  #   or an explicit mixture {name: weight}
    ()                          -> model = the base model's served name
    (name,), weight 1           -> model = name    (the library adapter, exported at construction)
    k adapters, or a weight != 1 -> model = "mix-<hash>": one LoRA by rank concatenation (composer's
                                   fuse(method="cat")): A = [A_1; ...; A_k], B = [w_1 s_1 B_1, ..., w_k s_k B_k],
                                   so B·A = Σ w_i·s_i·B_i·A_i exactly, rank Σ r_i (<= --max-lora-rank)
    loaded through POST /v1/load_lora_adapter on first use, kept in a LoraCache keyed by (names, weights
    rounded to `weight_decimals`), the least recently used unloaded (/v1/unload_lora_adapter) beyond capacity;
    then POST /v1/completions (stream) with that model, its events passed on as EngineChunks.

What it cannot do: a routing that changes per token (Arrow, the learned MoE gate) has no single LoRA; those routers stay on the embedded engine (docs/DEPLOY.md). A vLLM that is not running, dies or
cannot be reached gives EngineUnavailableError (503) with the reason; this process stays up.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from ..library.adapter import LoraAdapter
from ..library.owned import check_replaceable, is_owned, make_owned
from .engine import (BadRequestError, Engine, EngineChunk, EngineRequest, EngineUnavailableError,
                     RoutingDecision, UnknownModelError)
from .lora_cache import LoraCache
from .routing import RequestRouter
from .vllm_server import VLLMRequestError, VLLMServer, VLLMServerConfig, VLLMUnavailable

__all__ = ["VLLMEngine", "lora_key", "mixtures_folder", "remove_mixture"]


class _Forgotten(Exception):
    """vLLM answered 404 for a LoRA our cache holds: it was unloaded by someone else."""


def lora_key(decision: RoutingDecision, decimals: int) -> tuple[tuple[str, float], ...]:
    """The cache key of a decision's LoRA: (name, rounded weight) pairs, sorted by name, zero weights dropped."""
    pairs = {}
    for name, weight in zip(decision.adapters, decision.weights):
        pairs[name] = pairs.get(name, 0.0) + weight
    return tuple(sorted((n, round(w, decimals)) for n, w in pairs.items() if round(w, decimals) != 0))


class VLLMEngine(Engine):
    """Args:
        library: the AdapterLibrary (read only).
        router: the zero-shot router for `model="auto"`: a text router or fixed (serving/routing.py's
            RequestRouter decides per request); per-token routers (arrow, moe_gate) stay on the embedded engine.
        router_label: the router's name in decisions; base_model_name: the model name that serves no adapter
            (default: the library's base model's folder name); adapter_names: the servable adapters.
        model_path: the base model's folder as vLLM loads it (default: the library's base model).
        server: how to start or reach vLLM (VLLMServerConfig).
        work_dir: where the PEFT exports and the server log go (default: a temporary folder, removed by stop).
            The servable adapters are exported there at construction; mixtures on first use.
        weight_decimals: mixture weights are rounded to this many decimals for the cache key and the fused LoRA.
        cache_size: LoRAs kept loaded in vLLM (default: the server's max_cpu_loras, else max_loras).
    Serving never reads the library (its SQLite connection belongs to the thread that opened it): the adapters
    are exported here, and mixtures are fused from those exports on the event loop's thread (milliseconds, once
    per mixture), as the router's decisions are.
    """

    name = "vllm"

    def __init__(self, library, router, *, router_label: str | None = None, base_model_name: str | None = None,
                 adapter_names: list[str] | None = None, model_path: str | Path | None = None,
                 server: VLLMServerConfig | None = None, work_dir: str | Path | None = None,
                 weight_decimals: int = 3, cache_size: int | None = None):
        from transformers import AutoTokenizer

        self.model_path = Path(model_path or library.base_model.name)
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"vLLM loads the base model from a local folder; {self.model_path} is not one "
                                    f"(pass model_path=)")
        self._base_name = base_model_name or self.model_path.name
        self.library = library
        self.request_router = RequestRouter(router, library, base_model_name=self._base_name,
                                            adapter_names=adapter_names, label=router_label)
        if self.request_router.per_token:
            raise ValueError(f"router {self.request_router.label!r} routes every token; vLLM serves one LoRA per "
                             f"request: use engine=embedded for per-token routers, or a text router here")
        self.config = server or VLLMServerConfig()
        self.weight_decimals = weight_decimals
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="adaptermix-vllm-"))
        self.exports: dict[str, Path] = {}                   # adapter name -> its PEFT folder
        self._export_library(self.request_router.adapter_names)
        self.server: VLLMServer | None = None
        self.cache = LoraCache(cache_size or self.config.max_cpu_loras or self.config.max_loras, self._unload)
        self.running = 0
        self.requests = 0

    # -- the Engine interface ------------------------------------------------------------------------

    @property
    def base_model_name(self) -> str:
        return self._base_name

    @property
    def max_context(self) -> int:
        return self.config.max_model_len

    def models(self) -> list[str]:
        return self.request_router.models()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    async def start(self) -> None:
        self.server = VLLMServer(self.model_path, self._base_name, self.config, self.work_dir)
        try:
            await self.server.start()
        except VLLMUnavailable as error:
            raise EngineUnavailableError(f"vLLM did not start: {error}") from error

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        self.cache.clear()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def health(self) -> dict:
        if self.server is None:
            return {"status": "unavailable", "engine": self.name, "reason": "not started"}
        try:
            if self.server.state == "ok":
                self.server.check_alive()
        except VLLMUnavailable:
            pass
        status = {"ok": "ok", "starting": "starting"}.get(self.server.state, "unavailable")
        return {"status": status, "engine": self.name, "url": self.server.url, "reason": self.server.reason,
                "loras_loaded": len(self.cache)}

    def metrics(self) -> dict[str, float]:
        return {"running": self.running, "vllm_loras_loaded": len(self.cache), "vllm_lora_loads": self.cache.loads,
                "vllm_lora_cache_hits": self.cache.hits, "vllm_lora_evictions": self.cache.evictions,
                "vllm_up": float(self.health()["status"] == "ok")}

    async def generate(self, request: EngineRequest):
        if self.server is None:
            raise EngineUnavailableError("the vLLM engine is not started")
        try:
            self.server.check_alive()
        except VLLMUnavailable as error:
            raise EngineUnavailableError(str(error)) from error
        self._check_length(request)
        decision = self.request_router.decide(request)
        self.requests += 1
        self.running += 1
        try:
            key = lora_key(decision, self.weight_decimals)
            if not key:
                async for chunk in self._stream(request, self._base_name, decision):
                    yield chunk
                return
            for attempt in range(2):
                async with self.cache.use(key, self._load) as lora_name:
                    try:
                        async for chunk in self._stream(request, lora_name, decision):
                            yield chunk
                        return
                    except _Forgotten as error:     # unloaded behind our back (another replica, a restart)
                        if attempt:
                            raise UnknownModelError(f"vLLM does not know {lora_name!r} even after loading it: "
                                                    f"{error}") from error
                        self.cache.forget(key)
        except VLLMUnavailable as error:
            self.cache.clear()
            raise EngineUnavailableError(str(error)) from error
        finally:
            self.running -= 1

    # -- routing and LoRAs ---------------------------------------------------------------------------

    def _check_length(self, request: EngineRequest) -> None:
        prompt_tokens = self.count_tokens(request.prompt)
        if prompt_tokens >= self.max_context:
            raise BadRequestError(f"the prompt has {prompt_tokens} tokens; the context is {self.max_context}",
                                  param="prompt")
        if prompt_tokens + request.sampling.max_tokens > self.max_context:
            raise BadRequestError(f"max_tokens={request.sampling.max_tokens} plus the prompt's {prompt_tokens} tokens "
                                  f"exceed the context of {self.max_context}", param="max_tokens")

    def lora_name(self, key) -> str:
        """The LoRA's name in vLLM: the adapter's own for one adapter at weight 1, else "mix-<hash>" of the weights
        and the adapters' contents (replicas that share a library and a vLLM agree on it)."""
        if len(key) == 1 and key[0][1] == 1.0:
            return key[0][0]
        contents = [(self.exports[name].name, weight) for name, weight in key]
        return "mix-" + hashlib.sha256(repr(contents).encode()).hexdigest()[:16]

    async def _load(self, key) -> str:
        """Register the key's LoRA with vLLM (a mixture is fused and exported first); its name there."""
        names, weights = [n for n, _ in key], [w for _, w in key]
        lora_name = self.lora_name(key)
        folder = self.exports.get(lora_name) or self._export_mixture(names, weights, lora_name)
        try:
            await self.server.load_lora(lora_name, folder)
        except VLLMRequestError as error:
            if "already" not in error.message.lower():          # loaded by another replica (attached server)
                raise EngineUnavailableError(f"vLLM refused LoRA {lora_name!r}: {error.message}") from error
        return lora_name

    def _export_library(self, names: list[str]) -> None:
        """Every servable adapter as a PEFT folder, named by content (an existing export is reused), now: serving
        never reads the library afterwards (its SQLite connection belongs to this thread)."""
        for name, content in tqdm(list(zip(names, self.library.content_hashes(names))), desc="exporting adapters",
                                  disable=len(names) < 50, leave=False):
            folder = self.work_dir / "peft" / f"{name}-{content[:16]}"
            if not (folder / "adapter_model.safetensors").is_file():
                self.library.get(name).save_peft(folder)
            self.exports[name] = folder

    def _export_mixture(self, names: list[str], weights: list[float], lora_name: str) -> Path:
        from adaptermix.composer import fuse

        adapters = {n: LoraAdapter.from_peft(self.exports[n]) for n in names}
        rank = sum(a.max_rank for a in adapters.values())
        if rank > self.config.max_lora_rank:
            raise BadRequestError(f"a mixture of {len(names)} adapters has rank {rank}, above vLLM's "
                                  f"--max-lora-rank {self.config.max_lora_rank}: name fewer adapters or raise "
                                  f"max_lora_rank", param="adapters")
        folder = mixtures_folder(self.work_dir) / lora_name
        if not folder.exists():
            fuse(adapters, names, weights, method="cat", name=lora_name).save_peft(folder)
        return folder

    async def _unload(self, lora_name: str) -> None:
        await self.server.unload_lora(lora_name)
        if lora_name not in self.exports:
            remove_mixture(self.work_dir, lora_name)

    # -- completions ---------------------------------------------------------------------------------

    def _body(self, request: EngineRequest, model: str) -> dict:
        s = request.sampling
        body = {"model": model, "prompt": request.prompt, "max_tokens": s.max_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "stream": True, "stream_options": {"include_usage": True},
                "add_special_tokens": False}      # the prompt is already templated, as the embedded engine sees it
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        return body

    async def _stream(self, request: EngineRequest, model: str, decision: RoutingDecision):
        """vLLM's events as EngineChunks. A LoRA that vLLM does not know (404 before any text) raises _Forgotten,
        which `generate` answers by loading it again, once."""
        routing, finish, usage = decision, None, {}
        try:
            async for event in self.server.stream_completion(self._body(request, model)):
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    if choice.get("text"):
                        yield EngineChunk(text=choice["text"], routing=routing)
                        routing = None
        except VLLMRequestError as error:
            if error.status == 404 and routing is not None and model != self._base_name:
                raise _Forgotten(error.message) from error
            if error.status == 404:
                raise UnknownModelError(f"vLLM does not know {model!r}: {error.message}") from error
            if error.status < 500:
                raise BadRequestError(f"vLLM refused the request: {error.message}") from error
            raise EngineUnavailableError(f"vLLM failed: {error.message}") from error
        yield EngineChunk(routing=routing, finish_reason=finish or "stop", prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0))


MIXTURES = "vLLM mixtures"      # the owned-folder purpose of <work_dir>/mixtures


def mixtures_folder(work_dir: Path) -> Path:
    """<work_dir>/mixtures, made and marked by adaptermix on first use; a folder of that name that adaptermix
    did not make (a user's work_dir may hold anything) is refused, never written into or deleted from."""
    folder = Path(work_dir) / "mixtures"
    if not check_replaceable(folder, MIXTURES):
        make_owned(folder, MIXTURES)
    return folder


def remove_mixture(work_dir: Path, lora_name: str) -> None:
    """Delete one fused mixture's export, only inside the mixtures folder adaptermix made and marked."""
    parent = Path(work_dir) / "mixtures"
    folder = parent / lora_name
    if is_owned(parent, MIXTURES) and folder.parent == parent and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
