"""Composer: model surgery (compose / unload), routing traces, static fusion, merge / unmerge."""

# Imported under another top-level name (a checkout's root on sys.path, e.g. transformers probing for
# Hugging Face's `kernels` package): stay inert. Executing this folder's modules a second time would re-define
# the registered ops and destroy the real package's registrations.
if __name__ == "adaptermix.composer":
    from .compose import compose, set_prompts, unload
    from .fusion import FUSION_METHODS, fuse
    from .layer import MixtureLinear
    from .lorahub import search_fusion_weights
    from .merge import merge_adapter, unmerge_adapter
    from .trace import RoutingTrace, routing_trace
    from .training import train_router

    __all__ = ["FUSION_METHODS", "MixtureLinear", "RoutingTrace", "compose", "fuse", "merge_adapter", "routing_trace",
               "search_fusion_weights", "set_prompts", "train_router", "unload", "unmerge_adapter"]
