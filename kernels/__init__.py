"""Kernels: the LoRA-mixture op and its backends (reference, torch, triton)."""

from .mixture import BACKENDS, lora_mixture, resolve_backend
from .reference import lora_mixture_reference

__all__ = ["BACKENDS", "lora_mixture", "lora_mixture_reference", "resolve_backend"]
