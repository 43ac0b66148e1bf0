"""Property-based fuzzing (hypothesis) of what reads untrusted bytes: every input ends in success or an
`AdaptermixError` subclass naming the problem, never another exception, a hang (each case runs under a
120 s alarm), or a touch outside.

    counts = run_fuzz(workdir, examples={"safetensors": 2000, "peft_config": 300, "library": 100})

Targets:
    safetensors   the library's own reader (tensor_file.parse_safetensors) on mutated headers and bytes:
                  offsets, dtypes, shapes, huge sizes, duplicate keys, truncation, random bytes
    peft_config   load_peft_adapter on mutated adapter_config.json (types, ranks, patterns, unknown options)
    peft_weights  load_peft_adapter on mutated adapter_model.safetensors headers
    library       opening and using a library whose catalog rows are mutated (paths with traversal,
                  absolute paths, links, junk in every column, derived rows too), beside a sentinel folder
                  that must stay byte-identical and present
    cli           the `adaptermix` command's arguments: commands, paths, names, key=value options and flags,
                  valid and hostile, on a small library beside the same sentinel folder
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from adaptermix.library.errors import AdaptermixError

__all__ = ["run_fuzz", "fuzz_cli", "BAD_PATHS", "TARGETS"]

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


class FuzzCaseHung(BaseException):
    """A fuzz case ran past its time limit: a hang is a finding. A BaseException, so that no handler of the
    code under test (the CLI catches Exception) can take it for a clear error."""


def _bounded(case, seconds: int = 120):
    """Run each fuzz case under SIGALRM: a case that takes longer than `seconds` fails as a hang."""
    @functools.wraps(case)
    def bounded(*args, **kwargs):
        def expired(signum, frame):
            raise FuzzCaseHung(f"a fuzz case ran over {seconds} s: {args!r:.300}")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(seconds)
        try:
            return case(*args, **kwargs)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return bounded


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
    @_bounded
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
    @_bounded
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
    @_bounded
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
    sentinel, fingerprint = _sentinel(workdir)
    counts = {"library": 0, "outside_touched": 0}

    @_settings(examples)
    @given(st.sampled_from(_COLUMNS), st.one_of(st.sampled_from(BAD_PATHS), _json_leaf, st.text(max_size=40)),
           st.sampled_from(["none", "link_adapters", "link_file", "plant_index"]))
    @_bounded
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


def _sentinel(workdir: Path) -> tuple[Path, str]:
    """The folder outside the library that no input may touch (a victim adapter file and a note), and its digest."""
    sentinel = workdir / "outside"
    sentinel.mkdir(exist_ok=True)
    (sentinel / "victim.safetensors").write_bytes(_valid_file())
    (sentinel / "notes.txt").write_text("must survive")
    return sentinel, _tree_digest(sentinel)


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode() + (path.read_bytes() if path.is_file() else b"/"))
    return digest.hexdigest()


_CLI_OPTIONS = ["verify.deep=true", "verify.deep=maybe", "build.replace=true", "build.skip_invalid=true",
                "build.allow_pickle=true", "progress=false", "library.busy_timeout=-1", "library.busy_timeout=1e308",
                "library.busy_timeout=nan", "search.k=-5", "search.k=99999999999999999999", "k=2", "+x=1", "=",
                "a==b", "library=", "base_model=", "base_model=/nonexistent", "base_model=../../etc",
                "library.max_chunk_bytes=0", "${oc.env:HOME}", "x=${oc.env:HOME}", "library.encoder=null",
                "~library", "hydra.run.dir=/tmp/x", "--json", "--help", "-h", "--description", "--tags", "--",
                "--from-file", "-", "\x00", "é" * 3]
_CLI_COMMANDS = ["build", "add", "list", "show", "verify", "export", "remove", "describe", "Build", ""]
_CLI_ARITY = {"build": 1, "add": 1, "show": 1, "export": 2, "remove": 1, "describe": 1}   # positionals after LIB
_CLI_VALID = {"build": ["progress=false", "build.replace=true", "build.skip_invalid=true"],
              "add": ["build.replace=true"], "list": ["--json"], "verify": ["--json", "verify.deep=true"],
              "describe": ["--description=a new description", "--tags=x"]}   # the options each command takes


def _fitting_checkpoint(folder: Path) -> Path:
    """A PEFT checkpoint for the crash-test base model (the tiny Llama): `add` of it succeeds."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny-llama"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.randn(2, 64), f"{prefix}.lora_B.weight": torch.randn(64, 2)},
              str(folder / "adapter_model.safetensors"))
    return folder


def fuzz_cli(workdir: Path, examples: int) -> dict:
    """`adaptermix.cli.main(argv)` on arguments drawn from commands, paths (a library, absent, a file, a
    folder inside the library, the sentinel), adapter names and hostile options: it must return an exit
    code (0, 1, 2 or 130), a failure with a message, never raise, and never change the sentinel folder."""
    import contextlib
    import io

    from adaptermix.cli import main as cli
    from adaptermix.library.base_model import BaseModelSpec
    from adaptermix.reliability.crashtest import _make_before, _tiny_llama

    workdir = Path(workdir)
    pristine = workdir / "cli-pristine"
    _make_before(pristine, BaseModelSpec.from_model(_tiny_llama()))
    sentinel, fingerprint = _sentinel(workdir)
    play = workdir / "cli"
    library, junk = play / "lib", play / "file.txt"
    paths = [str(library), str(play / "absent"), str(junk), str(library / "adapters"), str(play / "empty"),
             str(sentinel), str(sentinel / "victim.safetensors"), "", "."]
    names = ["a0", "a1", "missing", "../a0", "a0/../a1", "a" * 300, "\x00", " "]
    checkpoints = workdir / "cli-checkpoints"
    paths += [str(_fitting_checkpoint(checkpoints / "fits")), str(_peft_checkpoint(checkpoints / "misfit")),
              str(checkpoints)]
    counts = {"cli": 0, "cli_outside_touched": 0}
    import adaptermix.cli_library as cli_library

    printed = cli_library.failure_message     # the CLI prints any OSError / ValueError / TypeError as one line:

    def clear_only(exc):                      # here only ours and the OS's count as clear
        if not isinstance(exc, (AdaptermixError, OSError)):
            raise AssertionError(f"an unclear {type(exc).__name__} reached the CLI: {exc}") from exc
        return printed(exc)

    @_settings(examples)
    @given(st.sampled_from(_CLI_COMMANDS), st.sampled_from(paths),
           st.lists(st.one_of(st.sampled_from(paths + names), st.text(max_size=12)), max_size=3),
           st.lists(st.one_of(st.sampled_from(sum(_CLI_VALID.values(), [])), st.sampled_from(_CLI_OPTIONS),
                              st.text(max_size=12).map(lambda t: f"{t}=1")), max_size=2),
           st.booleans())
    @_bounded
    def case(command, library_path, positionals, options, well_formed):
        counts["cli"] += 1
        if well_formed:     # half the cases get past argument parsing: as many positionals as the command takes
            positionals = (positionals + names[:3])[:_CLI_ARITY.get(command, 0)]
            options = [o for o in options if o in _CLI_VALID.get(command, [])]
            if command == "describe":
                options.append(_CLI_VALID["describe"][0])
            if command != "build":
                library_path = str(library)
        shutil.rmtree(play, ignore_errors=True)
        shutil.copytree(pristine, library)
        junk.write_text("not a library")
        (play / "empty").mkdir()
        argv = [a for a in [command, library_path, *positionals, *options] if a != "" or command == ""]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli(argv)
        assert code in (0, 1, 2, 130), (argv, code)
        if code in (1, 2):
            assert err.getvalue().strip(), (argv, "a failure without a message")
        if _tree_digest(sentinel) != fingerprint:
            counts["cli_outside_touched"] += 1
            raise AssertionError(f"a file outside the library changed: {argv!r}")

    cli_library.failure_message = clear_only
    cwd = os.getcwd()
    os.chdir(workdir)              # relative paths drawn (an export's `out`) land in the work folder
    try:
        case()
    finally:
        os.chdir(cwd)
        cli_library.failure_message = printed
    return counts


TARGETS = ("safetensors", "peft", "library", "cli")


def run_fuzz(workdir: Path, examples: dict[str, int]) -> dict:
    """Run the targets that `examples` names (peft_config / peft_weights for the PEFT loader)."""
    counts = {}
    if "safetensors" in examples:
        counts["safetensors"] = fuzz_safetensors(examples["safetensors"])
    if "peft_config" in examples or "peft_weights" in examples:
        counts.update(fuzz_peft(workdir, examples.get("peft_config", 10), examples.get("peft_weights", 10)))
    if "library" in examples:
        counts.update(fuzz_library(workdir, examples["library"]))
    if "cli" in examples:
        counts.update(fuzz_cli(workdir, examples["cli"]))
    return counts
