"""`compose` puts a library's adapters on a Hugging Face model behind a router; `unload` takes them off.

    model = am.compose(model, library, router=am.ArrowRouter(top_k=2))
    model.generate(...)                    # every token routed at every target module
    am.routing_trace(model)                # what the router chose
    am.unload(model)                       # the original modules, the very same objects
"""

from __future__ import annotations

import torch
from torch import nn

from ..library.base_model import BaseModelSpec, module_shape
from ..library.errors import AdapterNotFoundError, BaseModelMismatchError, LibraryError
from ..routers.base import Router
from .layer import MixtureLinear
from .state import ComposerState

__all__ = ["compose", "unload", "set_prompts", "composer_state"]

ATTRIBUTE = "_adaptermix"


def composer_state(model: nn.Module) -> ComposerState:
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        raise ValueError("this model is not composed with adaptermix (call adaptermix.compose first)")
    return state


def _targets(adapters, spec: BaseModelSpec, target_modules) -> list[str]:
    found = sorted({m for a in adapters for m in a.modules})
    if target_modules is not None:
        wanted = list(target_modules)
        found = [m for m in found if any(m == t or m.endswith("." + t) for t in wanted)]
    if not found:
        raise ValueError(f"no target modules: the adapters target none of {target_modules}")
    return found


def _check_fits(adapters, spec: BaseModelSpec) -> None:
    for adapter in adapters:
        for module, shape in adapter.shapes.items():
            if spec.modules.get(module) != shape:
                raise BaseModelMismatchError(
                    f"adapter {adapter.name!r} does not fit this model: module {module} is "
                    f"{spec.modules.get(module, 'missing')} here, {shape} in the adapter")


def _stack(adapters, module: str, d_out: int, d_in: int, dtype, device):
    """(A (N, r_max, d_in), B (N, d_out, r_max), scales (N,), ranks (N,), available (N,) bool).

    B is stored by rows, (N, r_max, d_out) contiguous, and returned as its transposed view: the kernels read
    each rank's d_out values with unit stride (kernels/cpu_backend.py; coalesced loads in Triton's expand).
    """
    N = len(adapters)
    r_max = max(a.modules[module].rank for a in adapters if module in a.modules)
    A = torch.zeros(N, r_max, d_in, dtype=dtype)
    B_rows = torch.zeros(N, r_max, d_out, dtype=dtype)
    B = B_rows.transpose(1, 2)
    scales, ranks = torch.zeros(N), torch.ones(N, dtype=torch.int32)
    available = torch.zeros(N, dtype=torch.bool)
    for e, adapter in enumerate(adapters):
        factors = adapter.modules.get(module)
        if factors is None:
            continue  # no contribution at this module (zeros), and routers that mask never pick it
        A[e, :factors.rank] = factors.A.to(dtype)
        B[e, :, :factors.rank] = factors.B.to(dtype)
        scales[e], ranks[e], available[e] = factors.scale, factors.rank, True
    return A.to(device), B_rows.to(device).transpose(1, 2), scales.to(device), ranks.to(device), available


def compose(model: nn.Module, library, router: Router, *, adapters: list[str] | None = None,
            target_modules: list[str] | None = None, tokenizer=None, trace: bool = True,
            backend: str = "auto") -> nn.Module:
    """Replace the target linears of `model` (in place) with mixture layers over the library's adapters.

    Args:
        adapters: names to compose (default: the whole library); their order is the routers' index space.
        target_modules: module names or suffixes ("q_proj") to adapt (default: every module an adapter targets).
        tokenizer: lets prompt-level routers read the prompts' text (or use `set_prompts`).
        trace: keep each forward's routing for `routing_trace`.
        backend: `lora_mixture` backend ('auto': Triton on CUDA, the native cpu kernels on a CPU for
            fp32 / fp64, torch otherwise).
    Adapters lacking some target modules are fine: those modules get no contribution from them.
    """
    if hasattr(model, ATTRIBUTE):
        raise ValueError("this model is already composed; call adaptermix.unload(model) first")
    names = library.names() if adapters is None else list(adapters)
    if not names:
        raise LibraryError(f"nothing to compose: the library at {library.root} is empty")
    missing = [n for n in names if n not in library]
    if missing:
        raise AdapterNotFoundError(f"no adapter(s) {missing} in the library at {library.root}")
    spec = BaseModelSpec.from_model(model)
    loaded = [library.get(n) for n in names]
    _check_fits(loaded, spec)
    loaded = router.prepare_adapters(library, loaded)
    modules = _targets(loaded, spec, target_modules)
    for adapter in loaded:
        adapter.modules = {m: f for m, f in adapter.modules.items() if m in modules}
    if not all(adapter.modules for adapter in loaded):
        empty = [a.name for a in loaded if not a.modules]
        raise ValueError(f"adapter(s) {empty} target none of the chosen modules {target_modules}")
    parameter = next(model.parameters())
    state = ComposerState(router, names, tokenizer=tokenizer, trace=trace)
    named = dict(model.named_modules())
    stacks, available = {}, {}
    for module in modules:
        d_out, d_in, _ = module_shape(named[module])
        *stack, available[module] = _stack(loaded, module, d_out, d_in, parameter.dtype, parameter.device)
        stacks[module] = stack
    router.bind(library, names, available)
    for module, (A, B, scales, ranks) in stacks.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        state.originals[module] = original
        setattr(parent, child, MixtureLinear(original, module, A=A, B=B, scales=scales, ranks=ranks,
                                             state=state, backend=backend))
    state.hook = model.register_forward_pre_hook(state.pre_forward, with_kwargs=True)
    setattr(model, ATTRIBUTE, state)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put the original modules back (the same objects, untouched) and remove the hook and state."""
    state = composer_state(model)
    for module, original in state.originals.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, original)
    state.hook.remove()
    delattr(model, ATTRIBUTE)
    return model


def set_prompts(model: nn.Module, prompts: list[str]) -> None:
    """The prompt texts for the next prefill (for prompt-level routers when no tokenizer was given)."""
    composer_state(model).pending_prompts = list(prompts)
