"""Work done once per weight set instead of once per call: results keyed by a tensor's identity and version.

An adapter stack (A, B, scales, ranks) is made once and read by every forward; what the op derives from it
(B's rows in the layout the CPU kernel reads, the check that scales are finite and ranks in range) is kept
beside the tensor and reused while

  - the tensor is alive: entries are held weakly by the tensor's identity (torch.utils.weak), so a freed
    tensor's entry goes with it and a new tensor at the same address never sees it;
  - its version counter is unchanged: any in-place write (to it or a view sharing its storage) bumps the
    counter and the next call recomputes.

Not cached (recomputed every call, as if there were no cache): inference tensors (they carry no version
counter), tensors seen while torch.compile traces (fake tensors) and writes through `.data`, which bypass the
version counter (the usual autograd caveat).
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["VersionedCache"]

V = TypeVar("V")


class VersionedCache:
    """derive(tensor) memoised per (tensor identity, tensor version, extra key)."""

    def __init__(self) -> None:
        self._entries = WeakIdKeyDictionary()
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor, derive: Callable[[torch.Tensor], V], key=None) -> V:
        if tensor.is_inference() or torch.compiler.is_compiling():
            return derive(tensor)
        stamp = (tensor._version, key)
        entry = self._entries.get(tensor)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        value = derive(tensor)
        with self._lock:
            self._entries[tensor] = (stamp, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
