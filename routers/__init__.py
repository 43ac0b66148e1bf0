"""Routers: per-token choice and weighting of library adapters."""

from .arrow import ArrowRouter
from .base import ROUTERS, Router, build_router
from .fixed import BASE, FixedRouter, PerSequenceRouter
from .retrieval import RetrievalRouter
from .routing import Routing, RoutingContext

__all__ = ["ArrowRouter", "BASE", "FixedRouter", "PerSequenceRouter", "ROUTERS", "RetrievalRouter", "Router",
           "Routing", "RoutingContext", "build_router"]
