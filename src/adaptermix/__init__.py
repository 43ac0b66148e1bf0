"""adaptermix: build a library of LoRA adapters, route tokens among them, compose and fuse them.

    import adaptermix as am
    lib = am.AdapterLibrary.open("my-lib")
    model = am.compose(model, lib, router=am.ArrowRouter(top_k=2))
    model.generate(**inputs, max_new_tokens=32)
    am.routing_trace(model); am.unload(model)
"""

from adaptermix.composer import *  # noqa: F401,F403  (the public API is re-exported here)
from adaptermix.composer import __all__ as _composer_all
from adaptermix.kernels import lora_mixture
from adaptermix.library import *  # noqa: F401,F403
from adaptermix.library import __all__ as _library_all
from adaptermix.routers import *  # noqa: F401,F403
from adaptermix.routers import __all__ as _routers_all

__version__ = "0.1.0"
__all__ = [*_library_all, *_routers_all, *_composer_all, "lora_mixture", "__version__"]
