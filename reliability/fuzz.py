"""Property-based fuzzing (hypothesis) of what reads untrusted bytes: every input ends in success or an
`AdaptermixError` subclass naming the problem, never another exception, a hang, or a touch outside.

    counts = run_fuzz(workdir, examples={"safetensors": 2000, "peft_config": 300, "library": 100})

Targets:
    safetensors   the library's own reader (tensor_file.parse_safetensors) on mutated headers and bytes:
                  offsets, dtypes, shapes, huge sizes, duplicate keys, truncation, random bytes
    peft_config   load_peft_adapter on mutated adapter_config.json (types, ranks, patterns, unknown options)
    peft_weights  load_peft_adapter on mutated adapter_model.safetensors headers
    library       opening and using a library whose catalog rows are mutated (paths with traversal,
                  absolute paths, links, junk in every column), beside a sentinel folder that must stay
                  byte-identical and present
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from adaptermix.library.errors import AdaptermixError

__all__ = ["run_fuzz", "BAD_PATHS"]

# Path values tried in every path field (with random text besides).
BAD_PATHS = ["../x.safetensors", "../../outside/victim.safetensors", "/etc/passwd", "adapters/../../x.safetensors",
             "adapters/./a.safetensors", "adapters//a.safetensors", "adapters/link.safetensors", "adapters",
             "derived/../catalog.sqlite", "", ".", "adapters/a.safetensors\x00.txt", "adapters/" + "a" * 5000,
             "~/x.safetensors", "adapters\\..\\..\\x.safetensors", "ADAPTERS/a.safetensors"]

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                       st.floats(allow_nan=True), st.text(max_size=20))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)


def _settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


def _valid_file() -> bytes:
    from adaptermix.library.tensor_file import serialize

    tensors = {"m::A": torch.randn(2, 8), "m::B": torch.randn(8, 2), "n::A": torch.randn(2, 4).half()}
    return serialize(tensors, {"format": "adaptermix.lora/1", "alphas": json.dumps({"m": 4.0})})


def _mutated_header(data: bytes, draw) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata", "duplicate", "length"]))
    if field == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "Q4", "", 3]))
    elif field == "shape":
        header[name]["shape"] = draw(st.one_of(st.lists(st.integers(-3, 2**62), max_size=4), _json))
    elif field == "data_offsets":
        header[name]["data_offsets"] = draw(st.one_of(st.lists(st.integers(-5, 2**64), min_size=2, max_size=2),
                                                      _json))
    elif field == "entry":
        header[name] = draw(_json)
    elif field == "metadata":
        header["__metadata__"] = draw(_json)
    text = json.dumps(header)
    if field == "duplicate":
        text = text[:-1] + ", " + json.dumps(name) + ": " + json.dumps(header[name]) + "}"
    encoded = text.encode()
    declared = len(encoded) if field != "length" else draw(st.integers(0, 2**64 - 1))
    return declared.to_bytes(8, "little") + encoded + data[8 + length:]


@st.composite
def safetensors_bytes(draw) -> bytes:
    data = _valid_file()
    how = draw(st.sampled_from(["header", "flip", "truncate", "extend", "random"]))
    if how == "header":
        return _mutated_header(data, draw)
    if how == "flip":
        position = draw(st.integers(0, len(data) - 1))
        return data[:position] + bytes([data[position] ^ (1 << draw(st.integers(0, 7)))]) + data[position + 1:]
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "extend":
        return data + draw(st.binary(min_size=1, max_size=64))
    return draw(st.binary(max_size=256))


def fuzz_safetensors(examples: int) -> int:
    from adaptermix.library.tensor_file import parse_safetensors

    count = [0]

    @_settings(examples)
    @given(safetensors_bytes())
    def case(data):
        count[0] += 1
        try:
            parse_safetensors(bytearray(data), "fuzz")
        except AdaptermixError:
            pass

    case()
    return count[0]


def _peft_checkpoint(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny", "rank_pattern": {}, "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 2)},
              str(folder / "adapter_model.safetensors"))
    return folder


def fuzz_peft(workdir: Path, config_examples: int, weight_examples: int) -> dict:
    from adaptermix.library.peft_format import load_peft_adapter

    source = _peft_checkpoint(Path(workdir) / "peft-source")
    base_config = json.loads((source / "adapter_config.json").read_text())
    weights = (source / "adapter_model.safetensors").read_bytes()
    counts = {"peft_config": 0, "peft_weights": 0}

    def load(folder):
        try:
            load_peft_adapter(folder)
        except AdaptermixError:
            pass

    @_settings(config_examples)
    @given(st.dictionaries(st.sampled_from(sorted(base_config) + ["use_dora", "fan_in_fan_out", "use_rslora",
                                                                   "layer_replication", "modules_to_save"]),
                           _json, max_size=4), st.booleans())
    def config_case(changes, as_text):
        counts["peft_config"] += 1
        folder = Path(workdir) / "peft-config"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        text = json.dumps({**base_config, **changes}) if not as_text else json.dumps(changes)[:-1]
        (folder / "adapter_config.json").write_text(text)
        load(folder)

    @_settings(weight_examples)
    @given(st.data())
    def weights_case(data):
        counts["peft_weights"] += 1
        folder = Path(workdir) / "peft-weights"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        mutated = _mutated_header(weights, data.draw) if data.draw(st.booleans()) else \
            weights[:data.draw(st.integers(0, len(weights)))]
        (folder / "adapter_model.safetensors").write_bytes(mutated)
        load(folder)

    config_case()
    weights_case()
    return counts


_COLUMNS = [("adapters", c) for c in ("file", "file_check", "file_sha256", "tags", "examples", "name", "description",
                                       "text_hash", "content_hash", "max_rank", "source")]
_COLUMNS += [(f"derived {kind}", c) for kind in ("arrow", "sketch", "text")      # derived data, read by use
             for c in ("file", "data", "sha256", "file_check")]


def fuzz_library(workdir: Path, examples: int) -> dict:
    """Mutate one catalog row (and maybe plant links / an index file), then open and use the library."""
    from adaptermix.library.store import AdapterLibrary
    from adaptermix.reliability.crashtest import HashingEncoder, _make_before, _tiny_llama
    from adaptermix.library.base_model import BaseModelSpec

    workdir = Path(workdir)
    pristine = workdir / "pristine"
    _make_before(pristine, BaseModelSpec.from_model(_tiny_llama()))
    sentinel = workdir / "outside"
    sentinel.mkdir(exist_ok=True)
    (sentinel / "victim.safetensors").write_bytes(_valid_file())
    (sentinel / "notes.txt").write_text("must survive")
    fingerprint = _tree_digest(sentinel)
    counts = {"library": 0, "outside_touched": 0}

    @_settings(examples)
    @given(st.sampled_from(_COLUMNS), st.one_of(st.sampled_from(BAD_PATHS), _json_leaf, st.text(max_size=40)),
           st.sampled_from(["none", "link_adapters", "link_file", "plant_index"]))
    def case(table_column, value, plant):
        table, column = table_column
        counts["library"] += 1
        root = workdir / "mutated"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root)
        value = value.replace("VICTIM", str(sentinel / "victim.safetensors")) if isinstance(value, str) else value
        conn = sqlite3.connect(str(root / "catalog.sqlite"))
        try:
            if table == "adapters":
                conn.execute(f"UPDATE adapters SET {column} = ? WHERE name = 'a0'", (value,))
            else:
                conn.execute(f"UPDATE derived SET {column} = ? WHERE kind = ?", (value, table.split()[1]))
            conn.commit()
        except (sqlite3.IntegrityError, OverflowError):
            return                                   # the schema itself refuses this value
        finally:
            conn.close()
        _plant(root, sentinel, plant)
        try:
            library = AdapterLibrary.open(root, encoder=HashingEncoder())
            try:
                for action in (library.names, lambda: library.verify(deep=True), lambda: library.search("task", k=2),
                               lambda: [library.get(n) for n in library.names()],
                               lambda: library.prototypes(library.names()[0]), library.parameter_embeddings,
                               lambda: library.rename(library.names()[0], "renamed"),
                               lambda: library.remove(library.names()[-1])):
                    try:
                        action()
                    except AdaptermixError:
                        pass
            finally:
                library.close()
        except AdaptermixError:
            pass
        if _tree_digest(sentinel) != fingerprint:
            counts["outside_touched"] += 1
            raise AssertionError(f"a file outside the library changed: {table}.{column} = {value!r}, {plant}")

    case()
    return counts


def _plant(root: Path, sentinel: Path, plant: str) -> None:
    if plant == "link_adapters":
        shutil.rmtree(root / "adapters")
        (root / "adapters").symlink_to(sentinel, target_is_directory=True)
    elif plant == "link_file":
        target = next((root / "adapters").iterdir())
        target.unlink()
        target.symlink_to(sentinel / "victim.safetensors")
    elif plant == "plant_index":
        for index_file in (root / "index").iterdir():
            index_file.write_bytes(b"IxFI" + bytes(range(256)) * 8)


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode() + (path.read_bytes() if path.is_file() else b"/"))
    return digest.hexdigest()


def run_fuzz(workdir: Path, examples: dict[str, int]) -> dict:
    counts = {"safetensors": fuzz_safetensors(examples.get("safetensors", 500))}
    counts.update(fuzz_peft(workdir, examples.get("peft_config", 100), examples.get("peft_weights", 100)))
    counts.update(fuzz_library(workdir, examples.get("library", 30)))
    return counts
