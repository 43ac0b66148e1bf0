"""`adaptermix serve LIBRARY key=value ...`: the OpenAI-compatible server over a library.

Defaults come from conf/serve.yaml; `key=value` overrides them (`adaptermix serve LIB port=9000 router=arrow
max_batch_size=8`). The router for `model="auto"` is conf/serve.yaml's (retrieval_lexical: the project's default,
hybrid_confidence, needs a probe pass per prompt that the batched engine does not run yet) unless `router=` names
another file of conf/router/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from adaptermix.library import AdapterLibrary, AdaptermixError

__all__ = ["main", "load_serve_config", "build_app", "open_library", "ENGINES"]

USAGE = "usage: adaptermix serve LIBRARY [key=value ...]   (defaults: conf/serve.yaml)"
API_KEY_ENV = "ADAPTERMIX_API_KEY"


def load_serve_config(overrides: list[str]):
    """(config, router label): conf/serve.yaml with the overrides."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="adaptermix.conf", version_base="1.3"):
        cfg = compose(config_name="serve", overrides=overrides, return_hydra_config=True)
    return cfg, cfg.hydra.runtime.choices.router


def load_base_model(name: str, dtype: str):
    """(model, tokenizer) from a local folder, or SmolLM2 from the offline cache (nothing is downloaded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptermix.models import MODEL_NAME, load_smollm2

    torch_dtype = getattr(torch, dtype)
    if Path(name).is_dir():
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype).eval(), AutoTokenizer.from_pretrained(name)
    if Path(name).name == MODEL_NAME:
        return load_smollm2(dtype=torch_dtype)
    raise FileNotFoundError(f"base model {name!r} is not a local folder: pass model=<folder of the base model>")


def open_library(path: str, cfg) -> AdapterLibrary:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from adaptermix.library import LibraryConfig

    settings = OmegaConf.to_container(cfg.library, resolve=True)
    encoder = instantiate(settings.pop("encoder"))
    return AdapterLibrary.open(path, encoder=encoder, config=LibraryConfig(**settings))


def _router(cfg):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(cfg.router, resolve=True)
    if "min_similarity" in settings and settings["min_similarity"] is None:
        settings["min_similarity"] = cfg.min_similarity
    return instantiate(settings)


def _embedded(cfg, library, router, label):
    from .embedded import EmbeddedEngine

    model, tokenizer = load_base_model(cfg.model or library.base_model.name, cfg.dtype)
    return EmbeddedEngine(model, tokenizer, library, router, router_label=label,
                          adapter_names=list(cfg.adapters) if cfg.adapters else None,
                          max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue,
                          max_context=cfg.max_context, backend=cfg.backend)


def _vllm(cfg, library, router, label):
    """adaptermix routes, a vLLM server generates (serving/vllm_engine.py, docs/DEPLOY.md)."""
    from omegaconf import OmegaConf

    from .vllm_engine import VLLMEngine
    from .vllm_server import VLLMServerConfig

    settings = OmegaConf.to_container(cfg.vllm, resolve=True)
    cache_size, work_dir = settings.pop("cache_size"), settings.pop("work_dir")
    settings["extra_args"] = tuple(settings.get("extra_args") or ())
    return VLLMEngine(library, router, router_label=label, adapter_names=list(cfg.adapters) if cfg.adapters else None,
                      model_path=cfg.model, server=VLLMServerConfig(**settings), cache_size=cache_size,
                      work_dir=work_dir)


ENGINES = {"embedded": _embedded, "vllm": _vllm}   # name -> builder(cfg, library, router, router label) -> Engine


def build_app(library_path: str, cfg, label: str):
    """The FastAPI app for a library: the configured engine behind the HTTP layer."""
    from .app import create_app

    if cfg.engine not in ENGINES:
        raise ValueError(f"unknown engine {cfg.engine!r}; known: {sorted(ENGINES)}")
    library = open_library(library_path, cfg)
    engine = ENGINES[cfg.engine](cfg, library, _router(cfg), label)
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    return create_app(engine, api_key=api_key, default_max_tokens=cfg.default_max_tokens)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        from adaptermix.cli_options import config_options, format_options

        cfg, label = load_serve_config([])
        print(USAGE + "\n" + __doc__ + "\n" + format_options(config_options("serve", cfg, label)))
        return 0 if argv else 2
    library_path, overrides = argv[0], argv[1:]
    bad = [a for a in overrides if "=" not in a]
    if bad or "=" in library_path:
        print(f"error: {USAGE}; unexpected {bad or [library_path]}", file=sys.stderr)
        return 2
    if not (Path(library_path) / "catalog.sqlite").is_file():
        print(f"error: no adapter library at {library_path}", file=sys.stderr)
        return 1
    try:
        cfg, label = load_serve_config(overrides)
    except Exception as exc:  # Hydra's override and config errors
        print(f"error: bad override: {exc}", file=sys.stderr)
        return 2
    try:
        app = build_app(library_path, cfg, label)
    except (AdaptermixError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import uvicorn

    print(f"adaptermix: serving {library_path} on http://{cfg.host}:{cfg.port}/v1 ({cfg.engine} engine)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
