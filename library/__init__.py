"""Adapter formats, the library store, its embeddings and its index."""

# Imported under another top-level name (a checkout's root on sys.path, e.g. transformers probing for
# Hugging Face's `kernels` package): stay inert. Executing this folder's modules a second time would re-define
# the registered ops and destroy the real package's registrations.
if __name__ == "adaptermix.library":
    from .adapter import LoraAdapter, LoraModule, check_adapter_name, linear_combination
    from .base_model import BaseModelSpec
    from .catalog import AdapterRecord
    from .derived import ArrowPrototypes, ParameterSketch, TextEmbedding, lora_svd
    from .encoders import SentenceTransformerEncoder, TextEncoder, default_encoder
    from .errors import (AdapterFormatError, AdaptermixError, AdapterNotFoundError, AdapterTextMissingError,
                         AdapterValidationError, BaseModelMismatchError, CalibrationMismatchError, DuplicateAdapterError, LibraryBusyError, LibraryError,
                         UnsafeCheckpointError, UnsupportedAdapterError)
    from .learning import cluster_adapters, clustered_library, merge_cluster
    from .store import AdapterLibrary, LibraryConfig, SearchHit

    __all__ = [
        "AdapterFormatError", "AdapterLibrary", "AdapterNotFoundError", "AdapterRecord", "AdapterTextMissingError",
        "AdapterValidationError", "CalibrationMismatchError",
        "AdaptermixError", "ArrowPrototypes", "BaseModelMismatchError", "BaseModelSpec", "DuplicateAdapterError",
        "LibraryBusyError", "LibraryConfig", "LibraryError", "LoraAdapter", "LoraModule", "ParameterSketch",
        "SearchHit", "SentenceTransformerEncoder", "TextEmbedding", "TextEncoder", "UnsafeCheckpointError",
        "UnsupportedAdapterError", "check_adapter_name", "cluster_adapters", "clustered_library", "default_encoder",
        "linear_combination", "lora_svd", "merge_cluster",
    ]
