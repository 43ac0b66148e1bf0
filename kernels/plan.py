"""The torch backend's routing plans: entries sorted by adapter (torch.sort), as segments.

    P = entries with an adapter (for one slot j: tokens with idx[:, j] >= 0, each at most once)

Sorted arrays keep all T entries, empty slots last: rows past offsets[-1] (= P) belong to no adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SlotPlan", "plan_slot", "sort_by_adapter", "accumulator_dtype", "slot_keys", "slot_scales",
           "accumulate_", "cast"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_keys(idx: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """idx (T, k) as keys in [0, N]: an adapter id, or N for an empty slot. Ids outside [-1, N) (possible
    when the caller skipped validation) count as empty too: no index past the stacks, on the CPU or the GPU.
    clamp sends them to -1 or N, and -1 mod (N + 1) = N."""
    return idx.clamp(-1, num_adapters).remainder_(num_adapters + 1)


def slot_scales(keys: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scales[e] per slot of (T, k) keys (`slot_keys`) in dtype, 0 on empty slots: (T, k). Two ops: the
    scales padded with the empty key's 0, then one take."""
    return torch.take(torch.nn.functional.pad(cast(scales, dtype), (0, 1)), keys)


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in dtype, skipping the call where it already is: each torch call costs several microseconds
    more right after the base GEMM than warm (the passes' hot paths avoid the no-op ones)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def accumulate_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """out += left @ right in left's dtype (right is cast to it), in place: one addmm_ where out has that
    dtype, else the product added with a cast."""
    right = right.to(left.dtype)
    if out.dtype == left.dtype:
        out.addmm_(left, right)
    else:
        out.add_(left @ right)


@dataclass(frozen=True)
class SlotPlan:
    tokens: torch.Tensor      # (M,) int64 entry ids sorted by adapter (stable); the first P are routed
    adapters: torch.Tensor    # (M,) int64 adapter of each sorted row (N past the first P)
    offsets: torch.Tensor     # (N,) int32 end of each adapter's segment in the sorted rows

    @property
    def rows(self) -> int:
        """An upper bound of P known without a device sync: T."""
        return self.tokens.shape[0]

    def routed(self) -> int:
        """P, the number of routed rows (syncs with the device)."""
        return int(self.offsets[-1]) if self.offsets.numel() else 0


def sort_by_adapter(keys: torch.Tensor, num_adapters: int) -> SlotPlan:
    """Sort the entries of a 1-D tensor of keys in [0, N] (`slot_keys`: N = empty) by adapter;
    the empty entries go last."""
    order = torch.sort(keys, stable=True).indices
    # scatter_add into a fixed-size buffer: bincount would read max(keys) on the host to size its output
    counts = torch.zeros(num_adapters + 1, dtype=torch.long, device=keys.device)
    counts = counts.scatter_add_(0, keys, torch.ones_like(keys))[:num_adapters]
    return SlotPlan(tokens=order, adapters=keys[order], offsets=torch.cumsum(counts, 0).int())


def plan_slot(keys: torch.Tensor, slot: int, num_adapters: int) -> SlotPlan:
    """The tokens of slot `slot` of (T, k) keys sorted by adapter (entry ids are token ids)."""
    return sort_by_adapter(keys[:, slot], num_adapters)
