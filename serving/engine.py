"""The engine interface: what the HTTP layer calls, and what every engine (embedded, vLLM) implements.

The HTTP layer renders chat messages with the base model's chat template, then hands the engine one
`EngineRequest` per request. The engine routes it (`model="auto"`), serves a named adapter or the base model,
or an explicit mixture (`adapters`), and yields `EngineChunk`s as tokens are produced: the first chunk carries
the `RoutingDecision`, the last one a `finish_reason`. Engines know nothing of HTTP; they raise the
`ServingError` subclasses below, which the HTTP layer maps to status codes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["SamplingParams", "EngineRequest", "RoutingDecision", "EngineChunk", "Engine", "ServingError",
           "BadRequestError", "UnknownModelError", "EngineUnavailableError", "AUTO"]

AUTO = "auto"   # the model name that asks for zero-shot routing


class ServingError(Exception):
    """An error with an HTTP status and an OpenAI error type; `param` names the offending field, if any."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class BadRequestError(ServingError):
    status, type = 400, "invalid_request_error"


class UnknownModelError(ServingError):
    status, type = 404, "model_not_found"


class EngineUnavailableError(ServingError):
    status, type = 503, "engine_unavailable"


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling fields. temperature 0 = greedy; seed makes sampling repeatable per request;
    ignore_eos (an extension, as vLLM's): generate max_tokens tokens, end-of-sequence or not (benchmarks)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine sees it.

    Args:
        request_id: unique per request (the response's id).
        prompt: the full text to continue (chat template already applied for chat requests).
        route_text: what routers compare: the user's message(s) without template or system prompt.
        model: `AUTO`, an adapter's name, or the base model's name.
        adapters: an explicit mixture {name: weight} (weights finite, >= 0, not all 0), or None.
        sampling: the sampling parameters.
    """

    request_id: str
    prompt: str
    route_text: str
    model: str
    adapters: dict[str, float] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class RoutingDecision:
    """Which adapters answered a request and with what weights (empty: the base model alone).

    note: why the decision is not the router's plain choice (a fallback to the base model below the
    router's threshold, an explicit mixture, ...), else None.
    per_token: the router routes every token (arrow, moe_gate): adapters and weights summarise the prompt
    (each adapter's share of routing weight over the prompt's tokens), not one mixture held for the sequence.
    """

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    router: str
    note: str | None = None
    per_token: bool = False

    def __post_init__(self):
        if len(self.adapters) != len(self.weights):
            raise ValueError("RoutingDecision needs one weight per adapter")

    def as_dict(self) -> dict:
        return {"adapters": list(self.adapters), "weights": [round(w, 6) for w in self.weights],
                "router": self.router, "note": self.note, "per_token": self.per_token}


@dataclass(frozen=True)
class EngineChunk:
    """Text produced since the previous chunk. `routing` is set on the first chunk; `finish_reason`
    ("stop" or "length") and the token counts on the last."""

    text: str = ""
    routing: RoutingDecision | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(ABC):
    """What the HTTP layer needs. Every queue and wait inside is bounded; `stop` drains or cancels."""

    name: str = ""

    @abstractmethod
    def models(self) -> list[str]:
        """The base model's name, `AUTO`, then every adapter's name."""

    @property
    @abstractmethod
    def base_model_name(self) -> str: ...

    @property
    @abstractmethod
    def max_context(self) -> int:
        """Prompt tokens + max_tokens may not exceed this."""

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Route and generate. Raises ServingError subclasses (before the first chunk where it can).
        Cancelling the iteration (client gone) drops the sequence from the batch and frees its cache."""

    @abstractmethod
    def health(self) -> dict:
        """{"status": "ok" | "starting" | "unavailable", ...details}."""

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Chat messages [{"role", "content"}] as one prompt, ready for the assistant's turn: the base model's
        chat template where the engine has a tokenizer with one (`self.tokenizer`), else "role: content" lines."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def metrics(self) -> dict[str, float]:
        """Engine gauges for /metrics (e.g. queue length, running sequences); names without prefix."""
        return {}
