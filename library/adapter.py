"""The adapter value type: a LoRA adapter as named factors per target module, plus its description.

    dW[m] = scale[m] * B[m] @ A[m]        A: (r, d_in), B: (d_out, r)
    scale = alpha / r                     (alpha / sqrt(r) with rsLoRA)

Factors keep the dtype they were trained in. Module names are paths inside the base model
(`model.layers.0.self_attn.q_proj`), never PEFT's `base_model.model.` prefixed keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .base_model import fingerprint_modules
from .errors import AdapterValidationError

__all__ = ["LoraModule", "LoraAdapter", "check_adapter_name", "linear_combination"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=@-]{0,127}$")


def check_adapter_name(name: str) -> str:
    """A safe adapter name: no path separators, no traversal, no leading dot, at most 128 chars."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise AdapterValidationError(
            f"unsafe adapter name {name!r}: use 1-128 letters, digits and _ . + = @ -, starting with a "
            "letter or digit, with no path separators and no '..'"
        )
    return name


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One target module's factors. A: (r, d_in), B: (d_out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense (d_out, d_in) update. For tests and small modules: it is what we avoid forming."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def problems(self) -> list[str]:
        """Shape and value problems of this module, as messages (empty when sound)."""
        out = []
        if self.A.dim() != 2 or self.B.dim() != 2:
            return [f"factors must be 2-D, got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}"]
        if self.rank < 1:
            out.append("rank must be >= 1")
        if self.B.shape[1] != self.rank:
            out.append(f"B has {self.B.shape[1]} columns but A has rank {self.rank}")
        if self.A.dtype != self.B.dtype or not self.A.dtype.is_floating_point:
            out.append(f"A and B must share one floating dtype, got {self.A.dtype} and {self.B.dtype}")
        elif not (torch.isfinite(self.A).all() and torch.isfinite(self.B).all()):
            out.append("factors contain NaN or Inf")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            out.append(f"lora_alpha must be finite and non-zero, got {self.alpha}")
        return out


@dataclass(eq=False)
class LoraAdapter:
    """A LoRA adapter: factors per target module plus what the library needs to know about it.

    Args:
        name: library name (see `check_adapter_name`).
        base_model: name or path of the base model it was trained on.
        modules: module path -> LoraModule.
        description, tags, examples: text used for retrieval and routing.
        source: where it came from (a checkpoint folder, "fuse(...)", ...).
    """

    name: str
    base_model: str
    modules: dict[str, LoraModule]
    description: str = ""
    tags: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    source: str = ""
    conv1d: frozenset[str] = field(default_factory=frozenset)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (d_out, d_in)."""
        return {k: (m.d_out, m.d_in) for k, m in self.modules.items()}

    @property
    def fingerprint(self) -> str:
        """Hash of target module names and shapes: the base-model identity this adapter needs."""
        return fingerprint_modules(self.shapes)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).A.dtype

    @property
    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def problems(self) -> list[str]:
        """Everything wrong with this adapter on its own (not yet against a base model)."""
        out = []
        if not self.modules:
            out.append("adapter has no modules")
        for module_name, module in self.modules.items():
            out += [f"{module_name}: {p}" for p in module.problems()]
        if len({m.A.dtype for m in self.modules.values()}) > 1:
            out.append("modules have different dtypes")
        return out

    def validate(self) -> "LoraAdapter":
        check_adapter_name(self.name)
        found = self.problems()
        if found:
            raise AdapterValidationError(f"adapter {self.name!r} is invalid: " + "; ".join(found))
        return self

    def content_hash(self) -> str:
        """sha256 over module names, factor bytes, dtypes, shapes and scales. Metadata is not content."""
        digest = hashlib.sha256()
        for module_name in sorted(self.modules):
            module = self.modules[module_name]
            digest.update(json.dumps([module_name, module.alpha, module.use_rslora]).encode())
            for factor in (module.A, module.B):
                digest.update(f"{factor.dtype}{tuple(factor.shape)}".encode())
                digest.update(factor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def with_metadata(self, **changes) -> "LoraAdapter":
        """A copy with other name / description / tags / examples / source (factors shared)."""
        return replace(self, **changes)

    def to(self, dtype: torch.dtype) -> "LoraAdapter":
        modules = {k: replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for k, m in self.modules.items()}
        return replace(self, modules=modules)

    # -- formats ---------------------------------------------------------------------------------

    @classmethod
    def from_peft(cls, path: str | Path, name: str | None = None, *, allow_pickle: bool = False,
                  **metadata) -> "LoraAdapter":
        """Read a PEFT LoRA checkpoint folder (adapter_config.json + adapter_model.safetensors)."""
        from .peft_format import load_peft_adapter

        return load_peft_adapter(path, name=name, allow_pickle=allow_pickle, **metadata)

    def save_peft(self, path: str | Path) -> Path:
        """Write a checkpoint that `peft.PeftModel.from_pretrained` loads."""
        from .peft_format import save_peft_adapter

        return save_peft_adapter(self, path)

    def __repr__(self) -> str:
        return (f"LoraAdapter(name={self.name!r}, base_model={self.base_model!r}, "
                f"modules={len(self.modules)}, max_rank={self.max_rank}, dtype={self.dtype})")


def linear_combination(terms: list[tuple[float, LoraModule]], dtype: torch.dtype | None = None) -> LoraModule:
    """Exactly Σ w_i·dW_i as one LoRA module, by concatenating ranks: A = [A_1; A_2; ...],
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], alpha = rank (scale 1: the weights live in B). Computed in float64."""
    A = torch.cat([m.A.double() for _, m in terms])
    B = torch.cat([w * m.scale * m.B.double() for w, m in terms], dim=1)
    dtype = dtype or terms[0][1].A.dtype
    return LoraModule(A.to(dtype), B.to(dtype), alpha=float(A.shape[0]))
