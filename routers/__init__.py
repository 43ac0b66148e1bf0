"""Routers: per-token choice and weighting of library adapters."""

# Imported under another top-level name (a checkout's root on sys.path, e.g. transformers probing for
# Hugging Face's `kernels` package): stay inert. Executing this folder's modules a second time would re-define
# the registered ops and destroy the real package's registrations.
if __name__ == "adaptermix.routers":
    from .arrow import ArrowRouter
    from .base import ROUTERS, Router, build_router
    from .fixed import BASE, FixedRouter, PerSequenceRouter
    from .hypernetwork import LoraGenerator, generate_adapter, train_generator
    from .moe_gate import MoEGateRouter
    from .retrieval import RetrievalRouter
    from .routing import Routing, RoutingContext
    from .sequence_arrow import HybridRouter, SequenceArrowRouter
    from .token_level import TokenLevelRouter

    __all__ = ["ArrowRouter", "BASE", "FixedRouter",
               "HybridRouter", "LoraGenerator", "MoEGateRouter", "PerSequenceRouter", "ROUTERS", "RetrievalRouter",
               "Router", "Routing", "RoutingContext", "SequenceArrowRouter", "TokenLevelRouter", "build_router", "generate_adapter",
               "train_generator"]
