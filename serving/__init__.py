"""Serving: an OpenAI-compatible HTTP server in front of an engine that routes every request zero-shot.

Three layers, each testable alone (docs/ARCHITECTURE.md): `protocol` (the OpenAI schema as pydantic models),
`app` (FastAPI routes: validate, call the engine, map errors to status codes) and an engine behind the one
interface of `engine.Engine` (embedded: batched `lora_mixture` in this process; vllm: a vLLM server in front
of which adaptermix routes). Nothing here starts at import time.
"""
