"""The HTTP layer: FastAPI routes that validate, call the engine and map errors to OpenAI error bodies.

    GET  /v1/models            the base model, `auto`, every adapter
    POST /v1/chat/completions  messages -> the base model's chat template -> the engine
    POST /v1/completions       prompt -> the engine
    GET  /health, GET /metrics (Prometheus text)

Every completion (and every stream chunk) carries the routing decision in an `adaptermix` field and in the
`X-Adaptermix-Routing` header (JSON). With an API key configured, /v1/* needs `Authorization: Bearer <key>`.
The app owns its engine: the lifespan starts it and stops it; nothing starts at import time.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import AUTO, BadRequestError, Engine, EngineChunk, EngineRequest, SamplingParams, ServingError
from .metrics import Metrics
from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                       CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, ErrorBody,
                       ErrorResponse, ModelCard, ModelList, Usage)

__all__ = ["create_app", "ROUTING_HEADER"]

ROUTING_HEADER = "X-Adaptermix-Routing"


class AuthenticationError(ServingError):
    status, type = 401, "authentication_error"


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """400 naming the first offending field (malformed JSON included)."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                              "invalid_request_error", code="json_invalid")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    loc = [part for part in loc if part not in ("int", "float", "str", "list[str]", "list[ContentPart]")]
    param = ".".join(loc) or None
    return error_response(400, f"invalid `{param}`: {first['msg']}" if param else f"invalid request: {first['msg']}",
                          "invalid_request_error", param=param)


def create_app(engine: Engine, *, api_key: str | None = None, default_max_tokens: int = 256) -> FastAPI:
    """The server around one engine. api_key: required as a bearer token on /v1/* (None: open)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="adaptermix", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        return _validation_error(exc)

    @app.exception_handler(ServingError)
    async def on_serving(request, exc: ServingError):
        code = "invalid_api_key" if isinstance(exc, AuthenticationError) else None
        return error_response(exc.status, exc.message, exc.type, exc.param, code)

    @app.exception_handler(HTTPException)
    async def on_http(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        metrics.request(request.url.path, response.status_code)
        return response

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`")
        if not secrets.compare_digest(given[len("Bearer "):].encode(), api_key.encode()):
            raise AuthenticationError("incorrect API key")

    @app.get("/health")
    async def health():
        report = engine.health()
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.metrics()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        names = engine.models()
        kinds = {engine.base_model_name: "base", AUTO: "router"}
        return ModelList(data=[ModelCard(id=name, kind=kinds.get(name, "adapter")) for name in names])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest):
        if not body.messages:
            raise BadRequestError("`messages` must hold at least one message", param="messages")
        prompt = engine.render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        route_text = "\n".join(m.text() for m in body.messages if m.role == "user")
        max_tokens = body.max_tokens or body.max_completion_tokens
        return await serve(body, "chat", prompt, route_text, max_tokens, "messages")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise BadRequestError("`prompt` must be one string (one prompt per request)", param="prompt")
        if not prompts[0]:
            raise BadRequestError("`prompt` is empty", param="prompt")
        return await serve(body, "text", prompts[0], prompts[0], body.max_tokens, "prompt")

    async def serve(body, kind: str, prompt: str, route_text: str, max_tokens: int | None, prompt_param: str):
        prompt_tokens = engine.count_tokens(prompt)
        if prompt_tokens >= engine.max_context:
            raise BadRequestError(f"the prompt is {prompt_tokens} tokens; the context holds {engine.max_context}",
                                  param=prompt_param)
        room = engine.max_context - prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise BadRequestError(f"max_tokens {max_tokens} exceeds what the context leaves after the prompt "
                                  f"({prompt_tokens} of {engine.max_context} tokens): at most {room}",
                                  param="max_tokens")
        sampling = SamplingParams(max_tokens=max_tokens or min(default_max_tokens, room), temperature=body.temperature,
                                  top_p=body.top_p, stop=body.stops(), seed=body.seed, ignore_eos=body.ignore_eos)
        request = EngineRequest(f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", prompt, route_text,
                                body.model, body.adapters, sampling)
        started = time.perf_counter()
        chunks = engine.generate(request)
        first = await anext(chunks)                  # routing errors surface here, before any byte is sent
        routing = first.routing.as_dict()
        metrics.routed(first.routing.adapters)
        headers = {ROUTING_HEADER: json.dumps(routing)}
        timing = {"started": started, "ttft": time.perf_counter() - started}
        shape = _Shape(kind, request.request_id, body.model, routing)
        if body.stream:
            return StreamingResponse(stream(shape, first, chunks, timing, body.include_usage),
                                     media_type="text/event-stream", headers=headers)
        text, last = first.text, first
        async for chunk in chunks:
            text, last = text + chunk.text, chunk
        record(last, timing)
        return JSONResponse(shape.complete(text, last).model_dump(), headers=headers)

    async def stream(shape: "_Shape", first: EngineChunk, chunks, timing: dict, include_usage: bool):
        last = first
        try:
            yield shape.sse(shape.delta(first.text, role=True))
            while last.finish_reason is None:
                last = await anext(chunks)
                if last.text:
                    yield shape.sse(shape.delta(last.text))
            yield shape.sse(shape.delta("", finish_reason=last.finish_reason))
            if include_usage:
                yield shape.sse(shape.usage_chunk(last))
            yield "data: [DONE]\n\n"
            record(last, timing)
        except ServingError as exc:                  # the engine failed mid-stream: say so in the stream
            yield shape.sse(ErrorResponse(error=ErrorBody(message=exc.message, type=exc.type, param=exc.param)))
        finally:
            await chunks.aclose()                     # a client that left: the engine drops the sequence

    def record(last: EngineChunk, timing: dict) -> None:
        metrics.finished(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                         latency=time.perf_counter() - timing["started"], ttft=timing["ttft"])

    return app


class _Shape:
    """Builds one request's responses and stream chunks, chat or text."""

    def __init__(self, kind: str, request_id: str, model: str, routing: dict):
        self.kind, self.id, self.model, self.routing = kind, request_id, model, routing

    def _common(self) -> dict:
        return {"id": self.id, "model": self.model, "adaptermix": self.routing}

    @staticmethod
    def usage(chunk: EngineChunk) -> Usage:
        return Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                     total_tokens=chunk.prompt_tokens + chunk.completion_tokens)

    def complete(self, text: str, last: EngineChunk):
        if self.kind == "chat":
            choice = ChatChoice(message={"role": "assistant", "content": text}, finish_reason=last.finish_reason)
            return ChatCompletionResponse(**self._common(), choices=[choice], usage=self.usage(last))
        choice = CompletionChoice(text=text, finish_reason=last.finish_reason)
        return CompletionResponse(**self._common(), choices=[choice], usage=self.usage(last))

    def delta(self, text: str, role: bool = False, finish_reason: str | None = None):
        if self.kind == "chat":
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
            choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(**self._common(), choices=[choice])
        return CompletionChunk(**self._common(), choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

    def usage_chunk(self, last: EngineChunk):
        kind = ChatCompletionChunk if self.kind == "chat" else CompletionChunk
        return kind(**self._common(), choices=[], usage=self.usage(last))

    @staticmethod
    def sse(model) -> str:
        return f"data: {model.model_dump_json()}\n\n"
