"""Routers: per-token choice and weighting of library adapters."""

from .arrow import ArrowRouter
from .base import ROUTERS, Router, build_router
from .fixed import BASE, FixedRouter, PerSequenceRouter
from .moe_gate import MoEGateRouter
from .retrieval import RetrievalRouter
from .routing import Routing, RoutingContext
from .token_level import TokenLevelRouter

__all__ = ["ArrowRouter", "BASE", "FixedRouter", "MoEGateRouter", "PerSequenceRouter", "ROUTERS", "RetrievalRouter",
           "Router", "Routing", "RoutingContext", "TokenLevelRouter", "build_router"]
