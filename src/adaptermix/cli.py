"""The `adaptermix` command. Defaults come from the Hydra configs in `adaptermix.conf`;
`key=value` arguments override them (`adaptermix search LIB "query" search.k=3`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptermix.library import AdapterLibrary, AdaptermixError, LibraryConfig

COMMANDS = {
    "build": ("Build (or extend) a library from a folder of PEFT checkpoints", ["checkpoints", "library"]),
    "add": ("Add one PEFT checkpoint", ["library", "checkpoint"]),
    "list": ("List the adapters of a library", ["library"]),
    "show": ("Show one adapter", ["library", "name"]),
    "search": ("Search adapters by text", ["library", "query"]),
    "verify": ("Cross-check catalog, files and hashes", ["library"]),
    "export": ("Export an adapter as a PEFT checkpoint", ["library", "name", "out"]),
    "remove": ("Remove an adapter", ["library", "name"]),
}


def load_config(overrides: list[str], config_name: str = "config"):
    """Compose `conf/<config_name>.yaml` with `key=value` overrides (Hydra's compose API)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="adaptermix.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def library_settings(cfg):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(cfg.library, resolve=True)
    encoder_cfg = settings.pop("encoder")
    return LibraryConfig(**settings), instantiate(encoder_cfg)


def open_library(args, cfg, create: bool = False) -> AdapterLibrary:
    config, encoder = library_settings(cfg)
    if create and not (Path(args.library) / "catalog.sqlite").exists():
        if not cfg.base_model:
            raise SystemExit("error: a new library needs base_model=<model folder or name>")
        return AdapterLibrary.create(args.library, base_model=cfg.base_model, encoder=encoder, config=config)
    return AdapterLibrary.open(args.library, encoder=encoder, config=config)


def run(args, cfg) -> int:
    command = args.command
    with open_library(args, cfg, create=command == "build") as lib:
        if command == "build":
            added = lib.add_many(args.checkpoints, replace=cfg.build.replace, skip_invalid=cfg.build.skip_invalid,
                                 allow_pickle=cfg.build.allow_pickle, progress=cfg.progress)
            print(f"added {len(added)} adapter(s); {len(lib)} in {lib.root}")
        elif command == "add":
            print(f"added {lib.add(args.checkpoint, allow_pickle=cfg.build.allow_pickle, replace=cfg.build.replace).name}")
        elif command == "list":
            for record in lib.records():
                print(f"{record.name:32s} r<={record.max_rank:<3d} {record.num_modules:4d} modules  "
                      f"{record.dtype:9s} {record.description[:60]}")
            print(f"{len(lib)} adapter(s), base model {lib.base_model.name}")
        elif command == "show":
            print(json.dumps(lib.record(args.name).as_dict(), indent=2))
        elif command == "search":
            for hit in lib.search(args.query, k=cfg.search.k):
                print(f"{hit.score:7.4f}  {hit.name}")
        elif command == "verify":
            problems = lib.verify(deep=cfg.verify.deep)
            print("\n".join(problems) if problems else f"ok: {len(lib)} adapter(s), no problems")
            return 1 if problems else 0
        elif command == "export":
            print(f"wrote {lib.get(args.name).save_peft(args.out)}")
        elif command == "remove":
            lib.remove(args.name)
            print(f"removed {args.name}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="adaptermix", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    for name, (text, positionals) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text + ". Extra key=value args override conf/.")
        for positional in positionals:
            command.add_argument(positional)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:   # the server's own CLI (serving/cli.py), imported only when asked for
        from adaptermix.serving.cli import main as serve

        return serve(argv[1:])
    args, extra = parser().parse_known_args(argv)
    bad = [a for a in extra if "=" not in a]
    if bad:
        print(f"error: unexpected argument(s) {bad}; overrides look like key=value", file=sys.stderr)
        return 2
    try:
        cfg = load_config(extra)
    except Exception as exc:  # Hydra's override and config errors
        print(f"error: bad override: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args, cfg)
    except (AdaptermixError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
