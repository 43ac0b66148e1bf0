"""adaptermix: build a library of LoRA adapters, route tokens among them, compose and fuse them.

    import adaptermix as am
    lib = am.AdapterLibrary.create("my-lib", base_model="path/to/base")
    lib.add_many("checkpoints/")
    lib.search("convert temperatures", k=3)
"""

from adaptermix.library import *  # noqa: F401,F403  (the public API is re-exported here)
from adaptermix.library import __all__ as _library_all

__version__ = "0.1.0"
__all__ = [*_library_all, "__version__"]
