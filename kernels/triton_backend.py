"""The Triton backend: four forward strategies, chosen per shape by configs.triton_strategy.

- fused (small stacks, N·r_max <= configs.FUSED_MAX_COLUMNS): one token-major launch that gates every
  adapter's rank activations by the routing (triton_fused.py); no plan, x read once, out written once.
- cluster (mid-size stacks, pinned only until timed on a GPU): tokens ordered by their adapters, then the
  fused kernel's pass over each token block's own adapters, in two launches (triton_cluster.py).
- bgmv (small batches): the two per-entry kernels of triton_bgmv.py.
- plan (the grouped GEMM): 3 plan kernels (triton_plan.py) + 1 shrink for all slots + 1 expand per slot.
None syncs with the host or does Python work per adapter, so CUDA graphs capture any of them.
Backward (adapters frozen): the fused kernels for small stacks (triton_fused.fused_backward), else (cluster
included) on the plan:
    g = grad @ B[e]             shrink with B's transposed view
    dweights[t, j] = s_e · <x[t] @ A[e].T, g>      (a second shrink, only when weights need a gradient)
    dx[t] += w[t, j] · s_e · g @ A[e]              expand with A's transposed view, into a float32 dx
"""

from __future__ import annotations

import torch

from .configs import block_m, triton_strategy
from .triton_bgmv import bgmv_forward_
from .triton_cluster import cluster_forward_
from .triton_expand import expand
from .triton_fused import fused_backward, fused_forward_
from .triton_plan import GroupPlan, group_by_adapter
from .triton_shrink import shrink

__all__ = ["forward_", "backward", "shrink", "expand", "group_by_adapter"]


def plan_for(idx, A) -> GroupPlan:
    T, k = idx.shape
    N, r_max, _ = A.shape
    return group_by_adapter(idx, N, block_m(r_max, T * k / min(N, T * k)))


def forward_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture, in place, by the strategy configs.triton_strategy picks for this shape."""
    if idx.numel() == 0:
        return
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    strategy = triton_strategy(idx.shape[0], A.shape[0], A.shape[1], capturing)
    if strategy == "fused":
        fused_forward_(out, x, A, B, scales, idx, weights, ranks)
        return
    if strategy == "bgmv":
        bgmv_forward_(out, x, A, B, scales, idx, weights, ranks)
        return
    if strategy == "cluster":
        cluster_forward_(out, x, A, B, scales, idx, weights, ranks)
        return
    plan = plan_for(idx, A)
    h = shrink(x, A, ranks, plan, weights, scales)
    expand(h, B, plan, out)


def _rows(plan: GroupPlan, idx, weights, scales):
    """Per plan row: (valid, entry id, weights[t, j], scales[e]); padding rows read entry 0 and are masked."""
    valid = plan.sorted >= 0
    entry = plan.sorted.long().clamp_min(0)
    adapter = idx.reshape(-1)[entry].clamp(0, scales.shape[0] - 1)      # padding rows may read any id
    return valid, entry, weights.reshape(-1)[entry].float(), scales[adapter].float()


def backward(grad, x, A, B, scales, idx, weights, ranks, need_x: bool, need_weights: bool):
    """(dx or None, dweights or None)."""
    dx = dweights = None
    if idx.numel() == 0:
        return (torch.zeros_like(x) if need_x else None), (torch.zeros_like(weights) if need_weights else None)
    if triton_strategy(idx.shape[0], A.shape[0], A.shape[1]) == "fused":
        return fused_backward(grad, x, A, B, scales, idx, weights, ranks, need_x, need_weights)
    plan = plan_for(idx, A)
    valid, entry, w, s = _rows(plan, idx, weights, scales)
    g = shrink(grad, B.transpose(1, 2), ranks, plan)                          # (rows, BR): grad @ B[e]
    if need_weights:
        h = shrink(x, A, ranks, plan)                                          # (rows, BR): x @ A[e].T
        value = torch.where(valid, (h * g).sum(1) * s, 0.0)                   # padding rows: 0, not garbage
        dweights = torch.zeros(weights.numel(), dtype=torch.float32, device=x.device)
        dweights.index_add_(0, entry, value)
        dweights = dweights.view(weights.shape).to(weights.dtype)
    if need_x:
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        expand(torch.where(valid[:, None], g * (w * s)[:, None], 0.0), A.transpose(1, 2), plan, dx)
        dx = dx.to(x.dtype)
    return dx, dweights
