"""The Triton backend's two primitives (kernels in triton_shrink.py and triton_expand.py)."""

from .triton_expand import expand
from .triton_shrink import shrink

__all__ = ["shrink", "expand"]
