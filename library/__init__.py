"""Adapter formats, the library store, its embeddings and its index.

Names load on first use (PEP 562), so that `adaptermix.library.catalog` and `.errors` read a library's
metadata without importing torch (the CLI's `list` and `show` start in well under a second)."""

# Imported under another top-level name (a checkout's root on sys.path, e.g. transformers probing for
# Hugging Face's `kernels` package): stay inert. Executing this folder's modules a second time would re-define
# the registered ops and destroy the real package's registrations.
if __name__ == "adaptermix.library":
    import importlib

    _HOMES = {
        "adapter": ["LoraAdapter", "LoraModule", "check_adapter_name", "linear_combination"],
        "base_model": ["BaseModelSpec"],
        "catalog": ["AdapterRecord"],
        "derived": ["ArrowPrototypes", "ParameterSketch", "TextEmbedding", "lora_svd"],
        "encoders": ["SentenceTransformerEncoder", "TextEncoder", "default_encoder"],
        "errors": ["AdapterFormatError", "AdaptermixError", "AdapterNotFoundError", "AdapterTextMissingError",
                   "AdapterValidationError", "CalibrationMismatchError",
                   "BaseModelMismatchError", "CorruptAdapterError", "CorruptCatalogError", "DuplicateAdapterError",
                   "FolderNotOwnedError", "LibraryBusyError", "LibraryError", "RouterOutputError",
                   "UnsafeCheckpointError", "UnsafeLibraryError", "UnsupportedAdapterError"],
        "learning": ["cluster_adapters", "clustered_library", "merge_cluster"],
        "store": ["AdapterLibrary", "LibraryConfig", "SearchHit"],
    }
    _HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
    __all__ = sorted(_HOME_OF)

    def __getattr__(name: str):
        if name not in _HOME_OF:
            raise AttributeError(f"module 'adaptermix.library' has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_HOME_OF[name]}", __name__), name)
        globals()[name] = value
        return value

    def __dir__():
        return sorted({*globals(), *__all__})
