"""Kernels: the LoRA-mixture op and its backends (reference, torch, triton)."""

# Imported under another top-level name (a checkout's root on sys.path, e.g. transformers probing for
# Hugging Face's `kernels` package): stay inert. Executing this folder's modules a second time would re-define
# the registered ops and destroy the real package's registrations.
if __name__ == "adaptermix.kernels":
    from .mixture import BACKENDS, lora_mixture, resolve_backend
    from .reference import lora_mixture_reference

    __all__ = ["BACKENDS", "lora_mixture", "lora_mixture_reference", "resolve_backend"]
