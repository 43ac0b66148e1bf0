"""The CLI's library commands: build, add, list, show, search, verify, describe, export, remove.

`list` and `show` read the catalog alone (no torch); the others open an `AdapterLibrary`. Each takes the
parsed arguments and the composed config and returns the exit code; errors raise and `cli.main` prints them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adaptermix.cli_options import UsageError
from adaptermix.library.errors import AdaptermixError, AdapterNotFoundError, LibraryError

__all__ = ["build", "add", "list_", "show", "search", "verify", "describe", "export", "remove", "failure_message"]

CATALOG = "catalog.sqlite"


def failure_message(exc: BaseException) -> str | None:
    """The one line the CLI prints for a failure (exit 1), or None for a bug (the traceback is kept)."""
    if isinstance(exc, (AdaptermixError, OSError, ValueError, TypeError)):
        return str(exc) or type(exc).__name__
    return None


def _missing_library(path: str) -> LibraryError:
    return LibraryError(f"no adaptermix library at {path} (no {CATALOG}); create one with "
                        f"`adaptermix build {path} CHECKPOINTS... base_model=MODEL`")


def open_library(path: str, cfg, *, writable: bool = True, encoder: bool = True):
    """An AdapterLibrary with the configured settings; encoder=False for commands that embed no text (the
    sentence encoder is then never loaded)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from adaptermix.library import AdapterLibrary, LibraryConfig

    if not (Path(path) / CATALOG).is_file():
        raise _missing_library(path)
    settings = OmegaConf.to_container(cfg.library, resolve=True) if cfg is not None and "library" in cfg else {}
    encoder_cfg = settings.pop("encoder", None)
    encoder = instantiate(encoder_cfg) if encoder and encoder_cfg else None
    known = set(LibraryConfig.__dataclass_fields__)
    config = LibraryConfig(**{k: v for k, v in settings.items() if k in known})
    return AdapterLibrary.open(path, encoder=encoder, config=config, recover=writable)


def _catalog(path: str):
    """(catalog, base model name), read without torch."""
    from adaptermix.library.catalog import Catalog

    if not (Path(path) / CATALOG).is_file():
        raise _missing_library(path)
    catalog = Catalog(Path(path) / CATALOG)
    catalog.check_format()
    return catalog, json.loads(catalog.get_meta("base_model"))["name"]


def _no_adapter(name: str, names: list[str], library: str) -> AdapterNotFoundError:
    from difflib import get_close_matches

    close = get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; `adaptermix list {library}` lists them"
    return AdapterNotFoundError(f"no adapter named {name!r} in {library}{hint}")


def check_names(lib, names: list[str], library: str) -> None:
    """Every name is an adapter of the library, or the error names the closest one."""
    for name in names:
        if name not in lib:
            raise _no_adapter(name, lib.names(), library)


# -- reading -------------------------------------------------------------------------------------------


def list_(args, cfg) -> int:
    catalog, base = _catalog(args.library)
    records = catalog.records()
    if args.json:
        print(json.dumps({"base_model": base, "adapters": [r.as_dict() for r in records]}, indent=2))
        return 0
    for record in records:
        print(f"{record.name:32s} r<={record.max_rank:<3d} {record.num_modules:4d} modules  "
              f"{record.dtype:9s} {record.description}")
    print(f"{len(records)} adapter(s), base model {base}")
    return 0


def show(args, cfg) -> int:
    catalog, _ = _catalog(args.library)
    record = catalog.record(args.name)
    if record is None:
        raise _no_adapter(args.name, catalog.names(), args.library)
    print(json.dumps(record.as_dict(), indent=2))
    return 0


def search(args, cfg) -> int:
    with open_library(args.library, cfg, writable=False) as lib:
        hits = lib.search(args.query, k=cfg.search.k)
    if args.json:
        print(json.dumps([{"name": h.name, "score": h.score} for h in hits], indent=2))
    for hit in hits if not args.json else ():
        print(f"{hit.score:7.4f}  {hit.name}")
    return 0


def verify(args, cfg) -> int:
    if cfg.verify.deep:
        with open_library(args.library, cfg, writable=False, encoder=False) as lib:
            problems, count = lib.verify(deep=True), len(lib)
    else:  # the catalog, files and hashes alone: no torch
        from adaptermix.library.maintenance import verify_storage

        catalog, _ = _catalog(args.library)
        problems, count = verify_storage(Path(args.library), catalog), catalog.count()
    if args.json:
        print(json.dumps({"adapters": count, "deep": bool(cfg.verify.deep), "problems": problems}, indent=2))
    elif problems:
        print("\n".join(problems))
    else:
        scope = "every adapter loaded and re-hashed" if cfg.verify.deep else \
            "catalog, files and hashes; verify.deep=true also loads every adapter"
        print(f"ok: {count} adapter(s), no problems ({scope})")
    return 1 if problems else 0


# -- writing -------------------------------------------------------------------------------------------


def _checkpoint_folders(folders: list[str]) -> list[Path]:
    found = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise LibraryError(f"no folder {folder}; give folders of PEFT checkpoints: "
                               "`adaptermix build LIBRARY CHECKPOINTS...`")
        inside = sorted(p.parent for p in Path(folder).rglob("adapter_config.json"))
        if not inside:
            raise LibraryError(f"no PEFT checkpoints (adapter_config.json) under {folder}")
        found += inside
    return list(dict.fromkeys(found))


def _check_order(args) -> None:
    library = Path(args.library)
    if not (library / CATALOG).exists() and library.is_dir() and next(library.rglob("adapter_config.json"), None):
        raise UsageError(f"{library} holds PEFT checkpoints, not a library: the library comes first, "
                         f"`adaptermix build LIBRARY {library}`")


def _triage(lib, folders: list[Path], cfg) -> tuple[list[Path], list[str]]:
    """(the checkpoint folders to add, 'folder: why skipped' for those already in the library)."""
    from adaptermix.library import LoraAdapter

    todo, skipped = [], []
    for folder in folders:
        try:
            adapter = LoraAdapter.from_peft(folder, allow_pickle=cfg.build.allow_pickle)
        except (AdaptermixError, OSError, ValueError):
            todo.append(folder)  # add_many reports why
            continue
        twin = lib.catalog.record_by_content(adapter.content_hash())
        existing = lib.catalog.record(adapter.name)
        if twin is not None:
            skipped.append(f"{folder}: already in the library as {twin.name!r} (same content)")
        elif existing is not None and not cfg.build.replace:
            skipped.append(f"{folder}: the name {adapter.name!r} is taken by a different adapter "
                           "(build.replace=true replaces it)")
        else:
            todo.append(folder)
    return todo, skipped


def _add_folders(lib, folders: list[Path], cfg) -> tuple[list, list[str]]:
    from adaptermix.library import AdapterValidationError

    options = dict(replace=cfg.build.replace, allow_pickle=cfg.build.allow_pickle, progress=cfg.progress)
    try:
        return lib.add_many(folders, skip_invalid=False, **options), []
    except AdapterValidationError as exc:
        if not cfg.build.skip_invalid or not str(exc).startswith(tuple("0123456789")):
            raise AdapterValidationError(f"{exc}\n(build.skip_invalid=true adds the valid ones)") from None
        problems = str(exc).splitlines()[1:]
        return lib.add_many(folders, skip_invalid=True, **options), problems


def build(args, cfg) -> int:
    _check_order(args)
    folders = _checkpoint_folders(args.checkpoints)
    root = Path(args.library)
    created = not (root / CATALOG).exists()
    if created and not cfg.base_model:
        raise UsageError(f"a new library needs its base model: `adaptermix build {args.library} ... "
                         "base_model=MODEL` (a model folder, a hub name in the offline cache, or smollm2)")
    existed = root.exists()
    before = set(root.iterdir()) if existed else set()
    try:
        lib = _create(root, cfg) if created else open_library(args.library, cfg)
        with lib:
            todo, skipped = _triage(lib, folders, cfg)
            added, invalid = _add_folders(lib, todo, cfg) if todo else ([], [])
            total, base = len(lib), lib.base_model.name
    except BaseException:
        if created:  # leave no half-made library: remove exactly what this command made
            for path in (set(root.iterdir()) - before if existed else [root] if root.exists() else []):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    print(f"added {len(added)} adapter(s){': ' + ', '.join(r.name for r in added) if added else ''}")
    for line in skipped + invalid:
        print(f"skipped {line}")
    print(f"{total} adapter(s) in {root} (base model {base})")
    return 0


def _create(root: Path, cfg):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from adaptermix.library import AdapterLibrary, LibraryConfig

    settings = OmegaConf.to_container(cfg.library, resolve=True)
    encoder = instantiate(settings.pop("encoder"))
    return AdapterLibrary.create(root, base_model=cfg.base_model, encoder=encoder, config=LibraryConfig(**settings))


def add(args, cfg) -> int:
    with open_library(args.library, cfg) as lib:
        record = lib.add(args.checkpoint, allow_pickle=cfg.build.allow_pickle, replace=cfg.build.replace)
    print(f"added {record.name}")
    return 0


def _sidecar(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LibraryError(f"cannot read {path}: {exc}") from exc
    unknown = set(data) - {"description", "examples", "tags", "name", "source"} if isinstance(data, dict) else {0}
    if unknown:
        raise LibraryError(f"{path} must be a JSON object with description, examples and tags; "
                           f"found {sorted(map(str, unknown))}")
    return data


def describe(args, cfg) -> int:
    texts = _sidecar(args.from_file) if args.from_file else {}
    given = {"description": args.description, "examples": args.examples, "tags": args.tags}
    texts.update({k: v for k, v in given.items() if v is not None})
    texts = {k: texts[k] for k in ("description", "examples", "tags") if texts.get(k) is not None}
    if not texts:
        raise UsageError("nothing to change: give --description, --examples, --tags or --from-file")
    with open_library(args.library, cfg) as lib:
        check_names(lib, [args.name], args.library)
        record = lib.update(args.name, **texts)
    print(f"{record.name}: {record.description!r}; {len(record.examples)} example prompt(s); "
          f"tags {list(record.tags)}")
    return 0


def export(args, cfg) -> int:
    with open_library(args.library, cfg, writable=False, encoder=False) as lib:
        check_names(lib, [args.name], args.library)
        print(f"wrote {lib.get(args.name).save_peft(args.out)}")
    return 0


def remove(args, cfg) -> int:
    with open_library(args.library, cfg, encoder=False) as lib:
        check_names(lib, [args.name], args.library)
        lib.remove(args.name)
    print(f"removed {args.name}")
    return 0
