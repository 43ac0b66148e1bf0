"""Base-model identity: the inventory of adaptable modules, their shapes, and a fingerprint.

A library is bound to one base model. We never need its weights to check an adapter against it: the
inventory (module name -> (d_out, d_in)) is read from a live model, or from a config alone by building
the model on the meta device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import LibraryError

__all__ = ["BaseModelSpec", "module_shape", "model_display_name"]


def module_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_out, d_in, is_conv1d) of a LoRA-adaptable layer, or None for other modules.

    nn.Linear stores weight as (d_out, d_in); GPT-2's Conv1D stores it transposed, (d_in, d_out).
    """
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        d_in, d_out = module.weight.shape
        return int(d_out), int(d_in), True
    return None


def model_display_name(name: str | None) -> str:
    """The comparable part of a model name or path: its last component, lower-cased.

    'HuggingFaceTB/SmolLM2-135M-Instruct' and '/cache/smollm2-135m-instruct/' compare equal.
    """
    if not name:
        return ""
    return Path(str(name).rstrip("/\\")).name.lower()


@dataclass(frozen=True)
class BaseModelSpec:
    """What a library knows of its base model.

    Args:
        name: model name or path, as the user gave it.
        modules: adaptable module name -> (d_out, d_in), names as in `model.named_modules()`.
        conv1d: names of modules stored as GPT-2 Conv1D (PEFT's `fan_in_fan_out`).
    """

    name: str
    modules: dict[str, tuple[int, int]]
    conv1d: frozenset[str] = field(default_factory=frozenset)

    @property
    def fingerprint(self) -> str:
        return fingerprint_modules(self.modules)

    @classmethod
    def from_model(cls, model: nn.Module, name: str | None = None) -> "BaseModelSpec":
        modules, conv1d = {}, set()
        for module_name, module in model.named_modules():
            shape = module_shape(module)
            if shape is None or not module_name:
                continue
            modules[module_name] = (shape[0], shape[1])
            if shape[2]:
                conv1d.add(module_name)
        if name is None:  # unknown stays empty: the base-name check then relies on shapes alone
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        return cls(name=str(name), modules=modules, conv1d=frozenset(conv1d))

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "BaseModelSpec":
        """Build the model on the meta device (no memory, no weights) and read its inventory."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model, name=name or getattr(config, "_name_or_path", None))

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "BaseModelSpec":
        """From a local model folder, the shipped SmolLM2 by hub name or alias ('smollm2'), or a model in the
        offline HF cache: config only. Offline, any other name fails at once."""
        from transformers import AutoConfig

        from adaptermix.models import canonical_model_name, locate_model  # the shipped model's aliases

        try:
            config = AutoConfig.from_pretrained(locate_model(name_or_path))
        except (OSError, ValueError) as exc:
            raise LibraryError(
                f"cannot read the base model config of {name_or_path!r}: {exc}. Pass a local model "
                "folder, a transformers model or config, or a BaseModelSpec (no weights are downloaded)."
            ) from exc
        return cls.from_config(config, name=canonical_model_name(name_or_path))

    @classmethod
    def coerce(cls, base_model) -> "BaseModelSpec":
        """Accept a spec, an nn.Module, a transformers config, or a model name / folder."""
        if isinstance(base_model, BaseModelSpec):
            return base_model
        if isinstance(base_model, nn.Module):
            return cls.from_model(base_model)
        if isinstance(base_model, (str, Path)):
            return cls.from_pretrained(str(base_model))
        if hasattr(base_model, "model_type") and hasattr(base_model, "to_dict"):
            return cls.from_config(base_model)
        raise TypeError(
            f"base_model must be a BaseModelSpec, an nn.Module, a transformers config or a model "
            f"name/folder, got {type(base_model).__name__}"
        )

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "modules": {k: list(v) for k, v in self.modules.items()},
             "conv1d": sorted(self.conv1d)},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "BaseModelSpec":
        data = json.loads(text)
        modules = {k: (int(v[0]), int(v[1])) for k, v in data["modules"].items()}
        return cls(name=data["name"], modules=modules, conv1d=frozenset(data.get("conv1d", ())))


def fingerprint_modules(shapes: dict[str, tuple[int, int]]) -> str:
    """A short stable hash of module names and (d_out, d_in) shapes."""
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
