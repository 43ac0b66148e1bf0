"""Adapter formats, the library store, its embeddings and its index."""

from .adapter import LoraAdapter, LoraModule, check_adapter_name, linear_combination
from .base_model import BaseModelSpec
from .catalog import AdapterRecord
from .derived import ArrowPrototypes, ParameterSketch, TextEmbedding, lora_svd
from .encoders import SentenceTransformerEncoder, TextEncoder, default_encoder
from .errors import (AdapterFormatError, AdaptermixError, AdapterNotFoundError, AdapterValidationError,
                     BaseModelMismatchError, DuplicateAdapterError, LibraryBusyError, LibraryError,
                     UnsafeCheckpointError, UnsupportedAdapterError)
from .store import AdapterLibrary, LibraryConfig, SearchHit

__all__ = [
    "AdapterFormatError", "AdapterLibrary", "AdapterNotFoundError", "AdapterRecord", "AdapterValidationError",
    "AdaptermixError", "ArrowPrototypes", "BaseModelMismatchError", "BaseModelSpec", "DuplicateAdapterError",
    "LibraryBusyError", "LibraryConfig", "LibraryError", "LoraAdapter", "LoraModule", "ParameterSketch",
    "SearchHit", "SentenceTransformerEncoder", "TextEmbedding", "TextEncoder", "UnsafeCheckpointError",
    "UnsupportedAdapterError", "check_adapter_name", "default_encoder", "linear_combination", "lora_svd",
]
