"""adaptermix: build a library of LoRA adapters, route tokens among them, compose and fuse them.

    import adaptermix as am
    lib = am.AdapterLibrary.open("my-lib")
    model = am.compose(model, lib, router=am.ArrowRouter(top_k=2))
    model.generate(**inputs, max_new_tokens=32)
    am.routing_trace(model); am.unload(model)

The public names load on first use (PEP 562): `import adaptermix` and the CLI's `--help` do not pay for
torch, transformers and faiss until something needs them.
"""

import importlib

__version__ = "0.1.0"

# where each public name lives; the subpackages' own __all__ lists are the source of truth (test_cli checks)
_HOMES = ("adaptermix.library", "adaptermix.routers", "adaptermix.composer")
_EXTRA = {"lora_mixture": "adaptermix.kernels"}


def _names() -> dict[str, str]:
    names = {}
    for home in _HOMES:
        names.update(dict.fromkeys(importlib.import_module(home).__all__, home))
    return {**names, **_EXTRA}


def __getattr__(name: str):
    if name == "__all__":  # `from adaptermix import *`
        return [*_names(), "__version__"]
    if name.startswith("__"):
        raise AttributeError(name)
    home = _EXTRA.get(name)
    if home is None:
        home = _names().get(name)
    if home is None:
        raise AttributeError(f"module 'adaptermix' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_names()})

