"""The `adaptermix` command (also `python -m adaptermix`). The library comes first in every command:

    adaptermix build LIB CHECKPOINTS... base_model=smollm2      adaptermix route LIB "prompt"... --router arrow
    adaptermix list LIB                                         adaptermix generate LIB "prompt"... --json
    adaptermix search LIB "query" search.k=3                    adaptermix fuse LIB A B --method ties --name AB
    adaptermix describe LIB NAME --description "..." --examples "..."

Defaults come from the Hydra configs in `adaptermix.conf`; `key=value` arguments override them, and
`adaptermix COMMAND --help` lists every key a command reads. Exit codes: 0 success, 1 failure, 2 misuse,
130 interrupted. Your own adapters, step by step: docs/YOUR_ADAPTERS.md.
"""

# The commands' work lives in cli_library and cli_routing, imported only when run: --help, list and show
# never import torch.

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field

from adaptermix.cli_options import (UsageError, check_overrides, format_options, load_config, options,
                                    own_config, reads_groups, split_overrides)

__all__ = ["main", "COMMANDS", "load_config"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, positionals (name, nargs, meaning), flags (flag, override key or None,
    argparse keywords), the config sections whose keys it reads, and `module:function` that runs it."""

    help: str
    positionals: list[tuple[str, str | None, str]]
    sections: tuple[str, ...] = ()
    flags: list[tuple[str, str | None, dict]] = field(default_factory=list)
    run: str = ""


LIB = ("library", None, "the library folder")
JSON = ("--json", None, dict(action="store_true", help="print JSON for scripts"))
ROUTER = ("--router", "router", dict(metavar="NAME", help="the router (same as router=NAME)"))
ROUTING = ("router", "base_model", "library.busy_timeout", "library.encoder", "route", "progress")

COMMANDS: dict[str, Command] = {
    "build": Command("Build a library, or extend one, from folders of PEFT checkpoints (any depth)",
                     [LIB, ("checkpoints", "+", "folders holding PEFT checkpoints (adapter_config.json)")],
                     ("base_model", "progress", "build", "library"), run="cli_library:build"),
    "add": Command("Add one PEFT checkpoint", [LIB, ("checkpoint", None, "a PEFT checkpoint folder")],
                   ("build.replace", "build.allow_pickle", "library"), run="cli_library:add"),
    "list": Command("List the adapters of a library", [LIB], flags=[JSON], run="cli_library:list_"),
    "show": Command("Show one adapter's record as JSON", [LIB, ("name", None, "the adapter")],
                    run="cli_library:show"),
    "search": Command("Search adapters by what they do (descriptions and example prompts)",
                      [LIB, ("query", None, "what you want done, in words")], ("search", "library.encoder"),
                      flags=[JSON], run="cli_library:search"),
    "verify": Command("Cross-check catalog, files and hashes", [LIB], ("verify",), flags=[JSON],
                      run="cli_library:verify"),
    "describe": Command("Set an adapter's description, example prompts and tags (what retrieval routing reads)",
                        [LIB, ("name", None, "the adapter")], ("library.encoder",),
                        flags=[("--description", None, dict(help="what the adapter does, in one sentence")),
                               ("--examples", None, dict(nargs="+", metavar="PROMPT", help="example prompts")),
                               ("--tags", None, dict(nargs="+", metavar="TAG", help="tags")),
                               ("--from-file", None, dict(metavar="JSON", help="an adaptermix.json sidecar: "
                                                          '{"description": ..., "examples": [...], "tags": [...]}'))],
                        run="cli_library:describe"),
    "export": Command("Export an adapter as a PEFT checkpoint",
                      [LIB, ("name", None, "the adapter"), ("out", None, "a new folder")], run="cli_library:export"),
    "remove": Command("Remove an adapter", [LIB, ("name", None, "the adapter")], run="cli_library:remove"),
    "route": Command("Show how each prompt is routed (adapters, weights, fallbacks, per layer); no generation",
                     [LIB, ("prompts", "+", "prompts, each one argument")], ROUTING, flags=[ROUTER, JSON],
                     run="cli_routing:route"),
    "generate": Command("Answer each prompt with the routed mixture, and show its routing",
                        [LIB, ("prompts", "+", "prompts, each one argument")], (*ROUTING, "generate"),
                        flags=[ROUTER, ("--max-new-tokens", "generate.max_new_tokens",
                                        dict(type=int, metavar="N", help="same as generate.max_new_tokens=N")),
                               JSON], run="cli_routing:generate"),
    "fuse": Command("Fuse adapters into one: add it to the library (--name) or write a PEFT checkpoint (--out)",
                    [LIB, ("adapters", "+", "the adapters to fuse")], ("fuse", "progress", "library"),
                    flags=[("--method", "fuse.method", dict(help="same as fuse.method=...")),
                           ("--weights", "fuse.weights", dict(nargs="+", type=float, metavar="W",
                                                              help="one per adapter (same as fuse.weights=[...])")),
                           ("--rank", "fuse.rank", dict(type=int, help="same as fuse.rank=...")),
                           ("--density", "fuse.density", dict(type=float, help="same as fuse.density=...")),
                           ("--name", None, dict(help="the fused adapter's name (default fused_A_B...)")),
                           ("--out", None, dict(metavar="DIR", help="write a PEFT checkpoint there instead of "
                                                "adding to the library")),
                           ("--description", None, dict(help="its description"))],
                    run="cli_routing:fuse"),
    "serve": Command("Serve the library over an OpenAI-compatible HTTP API (see `adaptermix serve --help`)",
                     [], run="serving.cli:main"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, naming the fix; exit code 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adaptermix")
    except PackageNotFoundError:
        return importlib.import_module("adaptermix").__version__


def parser(command: str | None = None, overrides: list[str] = ()) -> argparse.ArgumentParser:
    """The top parser; with `command`, that subcommand's parser, its --help listing its key=value options."""
    top = _Parser(prog="adaptermix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"adaptermix {_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, spec in COMMANDS.items():
        epilog = format_options(options(spec.sections, list(overrides))) if name == command else None
        cmd = sub.add_parser(name, help=spec.help, description=spec.help, epilog=epilog, add_help=name != "serve",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        for positional, nargs, meaning in spec.positionals:
            cmd.add_argument(positional, nargs=nargs, help=meaning)
        for flag, key, kwargs in spec.flags:
            cmd.add_argument(flag, **kwargs)
    return top


def _flag_overrides(spec: Command, args) -> list[str]:
    found = []
    for flag, key, _ in spec.flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if key and value is not None:
            found.append(f"{key}=[{','.join(map(str, value))}]" if isinstance(value, list) else f"{key}={value}")
    return found


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _compose(overrides: list[str]):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return load_config(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(f"bad key=value option: {str(exc).splitlines()[0]}") from exc


def _run(argv: list[str]) -> int:
    command = _command_of(argv)
    if command == "serve":  # its own parser and options (adaptermix.serving)
        module, function = COMMANDS["serve"].run.split(":")
        return getattr(importlib.import_module(f"adaptermix.{module}"), function)(argv[argv.index("serve") + 1:])
    rest, overrides = split_overrides(argv)
    wants_help = any(a in ("-h", "--help") for a in rest)   # the options block composes the config: only then
    args = parser(command if command in COMMANDS and wants_help else None, overrides).parse_args(rest)
    spec = COMMANDS[args.command]
    overrides = overrides + _flag_overrides(spec, args)     # `--router NAME` decides which router keys are valid
    overrides = check_overrides(args.command, overrides, options(spec.sections, overrides))
    if not spec.sections:
        cfg = None
    elif reads_groups(spec.sections):
        cfg = _compose(overrides)
    else:                                                   # no config group: no Hydra
        cfg = own_config(overrides)
    module, function = spec.run.split(":")
    return getattr(importlib.import_module(f"adaptermix.{module}"), function)(args, cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except UsageError as exc:
        print(f"adaptermix: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse's --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("adaptermix: interrupted; nothing half-written is kept", file=sys.stderr)
        return 130
    except Exception as exc:
        from adaptermix.cli_library import failure_message  # lazy: knows the library's error classes

        message = failure_message(exc)
        if message is None:
            raise
        print(f"adaptermix: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
