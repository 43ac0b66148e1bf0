"""Work done once per weight set instead of once per call: results keyed by a tensor's identity and version.

An adapter stack (A, B, scales, ranks) is made once and read by every forward; what the op derives from it
(B's rows in the layout the CPU kernel reads, the check that scales are finite and ranks in range) is kept
beside the tensor and reused while

  - the tensor is alive: an entry is keyed by the tensor's identity and holds only a weak reference to it,
    whose callback drops the entry when the tensor is freed, so a new tensor at the same address never
    sees it;
  - its version counter is unchanged: any in-place write (to it or a view sharing its storage) bumps the
    counter and the next call recomputes.

Not cached (recomputed every call, as if there were no cache): inference tensors (they carry no version
counter) and tensors seen while torch.compile traces (fake tensors). Not detected: writes through `.data`,
which bypass the version counter (the usual autograd caveat).
"""

from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

__all__ = ["VersionedCache"]

V = TypeVar("V")


class VersionedCache:
    """derive(tensor) memoised per (tensor identity, tensor version, extra key). derive's value must not refer
    to the tensor (it would keep it alive).

    A plain dict keyed by id(tensor) with a weak reference beside each value: a lookup is ~0.1 us (a
    WeakIdKeyDictionary makes a weak reference per lookup, ~1-3 us). The reference's callback drops the entry
    when the tensor dies, before its id can be reused; a lookup also checks the reference still points at
    the tensor asked about.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def get(self, tensor: torch.Tensor, derive: Callable[[torch.Tensor], V], key=None) -> V:
        if tensor.is_inference() or torch.compiler.is_compiling():
            return derive(tensor)
        stamp = (tensor._version, key)
        entry = self._entries.get(id(tensor))
        if entry is not None and entry[1] == stamp and entry[0]() is tensor:
            return entry[2]
        value = derive(tensor)
        self._entries[id(tensor)] = (weakref.ref(tensor, self._forget(id(tensor))), stamp, value)
        return value

    def _forget(self, tensor_id: int):
        entries = self._entries

        def forget(ref) -> None:
            if entries.get(tensor_id, (None,))[0] is ref:
                del entries[tensor_id]
        return forget

    def __len__(self) -> int:
        return len(self._entries)
