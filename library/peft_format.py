"""PEFT LoRA checkpoints in and out, without importing PEFT.

Reads `adapter_config.json` + `adapter_model.safetensors` as PEFT writes them: keys
`base_model.model.<module>.lora_{A,B}[.<adapter>].weight`, `rank_pattern` / `alpha_pattern` matched the way
PEFT matches them, `use_rslora`, `fan_in_fan_out` (GPT-2 Conv1D). Anything that is not plain LoRA is refused
by name, before a single tensor becomes part of an adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save as st_save

from .adapter import LoraAdapter, LoraModule
from .errors import AdapterFormatError, UnsafeCheckpointError, UnsupportedAdapterError
from .files import fsync_dir, write_temp

__all__ = ["load_peft_adapter", "save_peft_adapter", "SIDECAR"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
SIDECAR = "adaptermix.json"  # our description / tags / examples, beside a PEFT checkpoint

# PEFT options that change what the weights mean: an adapter using any of them is not plain LoRA.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora=True)",
    "lora_bias": "LoRA bias (lora_bias=True)",
    "use_qalora": "QA-LoRA (use_qalora=True)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PREFIX = "base_model.model."


def match_pattern(patterns: dict, module_name: str, default):
    """PEFT's rule: the first pattern key that matches a dotted suffix of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"no {CONFIG_NAME} in {folder}: not a PEFT checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"malformed {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"malformed {config_path}: expected a JSON object")
    if "peft_type" not in config:
        raise AdapterFormatError(f"malformed {config_path}: no 'peft_type' (is this a PEFT adapter config?)")
    peft_type = str(config["peft_type"]).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{folder}: PEFT type {config.get('peft_type')!r} is not supported; only plain LoRA is")
    for option, label in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise UnsupportedAdapterError(f"{folder}: {label} is not supported; only plain LoRA is")
    for option in ("r", "lora_alpha"):
        if not isinstance(config.get(option), (int, float)) or isinstance(config.get(option), bool):
            raise AdapterFormatError(f"malformed {config_path}: '{option}' must be a number")
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(option) or {}
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"malformed {config_path}: '{option}' must be an object")
        for key, value in patterns.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise AdapterFormatError(f"malformed {config_path}: {option}[{key!r}] must be a number")
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterFormatError(f"malformed {config_path}: {option} key {key!r} is not a regex: {exc}") from exc
    return config


def _read_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights = folder / SAFETENSORS_NAME
    if weights.is_file():
        try:
            return load_file(str(weights))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise AdapterFormatError(f"unreadable {weights}: {exc}") from exc
    pickles = [folder / n for n in PICKLE_NAMES if (folder / n).is_file()]
    if not pickles:
        raise AdapterFormatError(f"no {SAFETENSORS_NAME} in {folder}")
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{pickles[0]} is a pickle checkpoint; pickles can run code when loaded. Convert it to "
            "safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)")
    try:
        state = torch.load(pickles[0], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFormatError(f"cannot load {pickles[0]} with weights_only=True: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{pickles[0]} is not a flat dict of tensors")
    return state


def _group_factors(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if "lora_embedding_" in bare:
            raise UnsupportedAdapterError(f"{folder}: LoRA on embedding layers ({key}) is not supported")
        if "lora_magnitude_vector" in bare:
            raise UnsupportedAdapterError(f"{folder}: DoRA magnitude vectors ({key}) are not supported")
        match = _KEY_RE.match(bare)
        if match is None:
            raise AdapterFormatError(f"{folder}: unexpected tensor {key!r} in a LoRA checkpoint")
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    if not factors:
        raise AdapterFormatError(f"{folder}: the checkpoint holds no LoRA tensors")
    for module_name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            have = "lora_A" if "A" in pair else "lora_B"
            raise AdapterFormatError(f"{folder}: module {module_name} has {have} but not its partner")
    return factors


def load_peft_adapter(path, name=None, *, allow_pickle=False, **metadata) -> LoraAdapter:
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder} is not a folder")
    config = _read_config(folder)
    factors = _group_factors(_read_tensors(folder, allow_pickle), folder)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    modules = {}
    for module_name in sorted(factors):
        A, B = factors[module_name]["A"], factors[module_name]["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise AdapterFormatError(f"{folder}: {module_name} has factor shapes A {tuple(A.shape)}, "
                                     f"B {tuple(B.shape)}; expected A (r, d_in), B (d_out, r)")
        expected_rank = match_pattern(rank_pattern, module_name, config["r"])
        if A.shape[0] != expected_rank:
            raise AdapterFormatError(f"{folder}: {module_name} has rank {A.shape[0]} but the config "
                                     f"(r / rank_pattern) says {expected_rank}")
        alpha = float(match_pattern(alpha_pattern, module_name, config["lora_alpha"]))
        modules[module_name] = LoraModule(A, B, alpha, use_rslora)
    sidecar = _read_sidecar(folder)
    sidecar.update({k: v for k, v in metadata.items() if v is not None})
    conv1d = frozenset(modules) if config.get("fan_in_fan_out") else frozenset()
    return LoraAdapter(
        name=name or sidecar.pop("name", None) or folder.resolve().name,
        base_model=str(config.get("base_model_name_or_path") or ""),
        modules=modules,
        description=str(sidecar.get("description") or ""),
        tags=tuple(sidecar.get("tags") or ()),
        examples=tuple(sidecar.get("examples") or ()),
        source=str(sidecar.get("source") or folder.resolve()),
        conv1d=conv1d,
    )


def _read_sidecar(folder: Path) -> dict:
    path = folder / SIDECAR
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"malformed {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"malformed {path}: expected a JSON object")
    return data


def peft_config_for(adapter: LoraAdapter) -> dict:
    """The adapter_config.json PEFT needs: the commonest rank / alpha, the rest as patterns."""
    rslora = {m.use_rslora for m in adapter.modules.values()}
    if len(rslora) > 1:
        raise AdapterFormatError(f"adapter {adapter.name!r} mixes rsLoRA and plain scaling; PEFT has one flag")
    if adapter.conv1d and set(adapter.conv1d) != set(adapter.modules):
        raise AdapterFormatError(f"adapter {adapter.name!r} mixes Conv1D and Linear targets; PEFT's "
                                 "fan_in_fan_out is one flag")
    ranks = {k: m.rank for k, m in adapter.modules.items()}
    alphas = {k: m.alpha for k, m in adapter.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    as_int = lambda v: int(v) if float(v).is_integer() else v  # noqa: E731  (PEFT writes ints)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model or None,
        "r": r,
        "lora_alpha": as_int(alpha),
        "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(k): as_int(v) for k, v in alphas.items() if v != alpha},
        "target_modules": sorted(adapter.modules),
        "use_rslora": rslora.pop(),
        "fan_in_fan_out": bool(adapter.conv1d),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def save_peft_adapter(adapter: LoraAdapter, path) -> Path:
    """Write config, weights and our sidecar into a new folder, atomically (temp folder, then rename)."""
    adapter.validate()
    target = Path(path)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    config = peft_config_for(adapter)
    tensors = {}
    for module_name, module in adapter.modules.items():
        tensors[f"{_PREFIX}{module_name}.lora_A.weight"] = module.A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{module_name}.lora_B.weight"] = module.B.detach().contiguous().cpu()
    sidecar = {"name": adapter.name, "description": adapter.description, "tags": list(adapter.tags),
               "examples": list(adapter.examples), "source": adapter.source}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        for file_name, data in ((CONFIG_NAME, json.dumps(config, indent=2).encode()),
                                (SAFETENSORS_NAME, st_save(tensors, metadata={"format": "pt"})),
                                (SIDECAR, json.dumps(sidecar, indent=2).encode())):
            os.replace(write_temp(staging, data), staging / file_name)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
