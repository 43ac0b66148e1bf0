"""`AdapterLibrary`: adapters on disk, bound to one base model, indexed by embeddings.

Layout of a library folder:

    catalog.sqlite                          metadata, hashes, derived blobs, generation counter (WAL)
    adapters/<content hash>.safetensors     one file per adapter, factors in their own dtype
    derived/<kind>/<config hash>/<key>.safetensors   large derived data (Arrow prototypes)
    index/text-<config hash>-<kind>.safetensors   search index over text embeddings (a checked cache)
    tmp/                                    files being written; only ever non-empty under the write lock

Every change is one catalog transaction holding the writer lock: temp file, fsync, rename into place, rows,
COMMIT. A process killed anywhere in it leaves files the catalog does not reference; `open()` removes them
under the same lock, so the library reads exactly as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from .adapter import LoraAdapter, check_adapter_name
from .base_model import BaseModelSpec
from .catalog import AdapterRecord, Catalog
from .derived import ArrowPrototypes, ParameterSketch, TextEmbedding, adapter_texts, text_hash
from .derived_store import DerivedStore, PendingFile
from .encoders import TextEncoder, default_encoder
from .errors import (AdapterFormatError, AdapterNotFoundError, AdapterValidationError, BaseModelMismatchError,
                     CorruptAdapterError, DuplicateAdapterError, LibraryError, UnsafeLibraryError)
from .files import adapter_file_bytes, check_layout, fsync_dir, library_file, read_adapter_file, write_atomic
from .index import IndexConfig, TextIndex
from .owned import MARKER
from .tensor_file import content_check, parse_safetensors, read_checked
from .validation import check_against_base, coerce_texts

__all__ = ["AdapterLibrary", "LibraryConfig", "SearchHit"]

CATALOG = "catalog.sqlite"


@dataclass(frozen=True)
class LibraryConfig:
    """Settings of a library handle; derived data is keyed by the parts that change its content."""

    arrow_directions: int | None = None
    sketch_dim: int = 4
    sketch_seed: int = 0
    ivf_threshold: int = 20_000
    nprobe: int = 32
    busy_timeout: float = 60.0
    check_base_name: bool = True
    max_chunk_bytes: int = 256 << 20  # add_many commits before prepared adapters exceed this much memory


@dataclass(frozen=True)
class SearchHit:
    name: str
    score: float


@dataclass
class _Prepared:
    """An adapter ready to commit: everything computed, nothing written."""

    adapter: LoraAdapter
    content_hash: str
    texts: list[str]
    file: PendingFile
    content_derived: dict  # kind -> tensors
    text_derived: dict | None = None


class AdapterLibrary:
    """A library of LoRA adapters for one base model. Not thread-safe; one handle per process or thread."""

    def __init__(self, root: Path, catalog: Catalog, *, encoder: TextEncoder | None, config: LibraryConfig):
        if catalog.get_meta("check_base_name") == "false":  # the library's policy, set once at create
            config = dataclasses.replace(config, check_base_name=False)
        self.root, self.catalog, self.config = Path(root), catalog, config
        self.base_model = BaseModelSpec.from_json(catalog.get_meta("base_model"))
        self.derived = DerivedStore(self.root, catalog)
        self._encoder = encoder
        self.arrow = ArrowPrototypes(config.arrow_directions)
        self.sketch = ParameterSketch(config.sketch_dim, config.sketch_seed)
        self._text_kind: TextEmbedding | None = None
        self._index: TextIndex | None = None

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path, base_model, *, encoder: TextEncoder | None = None,
               config: LibraryConfig = LibraryConfig(), exist_ok: bool = False) -> "AdapterLibrary":
        """Create an empty library bound to `base_model` (a model, config, folder, name or BaseModelSpec).

        `config.check_base_name` is remembered as the library's policy: created with False, every later
        handle accepts checkpoints whose `base_model_name_or_path` names other paths of the same weights."""
        root = Path(path)
        spec = BaseModelSpec.coerce(base_model)
        if (root / CATALOG).exists():
            if not exist_ok:
                raise LibraryError(f"a library already exists at {root}")
            library = cls.open(root, encoder=encoder, config=config)
            if library.base_model.fingerprint != spec.fingerprint:
                raise BaseModelMismatchError(f"the library at {root} is bound to {library.base_model.name!r}")
            return library
        if root.exists() and any(p.name != MARKER for p in root.iterdir()):  # its own ownership marker is fine
            raise LibraryError(f"{root} exists and is not empty; pick a new folder for the library")
        for sub in ("adapters", "derived", "index", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        catalog = Catalog(root / CATALOG, config.busy_timeout)
        catalog.initialise({"base_model": spec.to_json(),
                            "check_base_name": "true" if config.check_base_name else "false"})
        fsync_dir(root)
        return cls(root, catalog, encoder=encoder, config=config)

    @classmethod
    def open(cls, path, *, encoder: TextEncoder | None = None, config: LibraryConfig = LibraryConfig(),
             recover: bool = True) -> "AdapterLibrary":
        """Open a library. `recover` removes what an interrupted write left behind (under the lock)."""
        root = Path(path)
        check_layout(root)
        if not (root / CATALOG).is_file():
            raise LibraryError(f"no adaptermix library at {root} (missing {CATALOG})")
        catalog = Catalog(root / CATALOG, config.busy_timeout)
        catalog.check_format()
        library = cls(root, catalog, encoder=encoder, config=config)
        if recover and os.access(root, os.W_OK):
            library._recover()
        return library

    def close(self) -> None:
        if self._index is not None:
            self._index.save()
        self.catalog.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = default_encoder()
        return self._encoder

    @property
    def text_kind(self) -> TextEmbedding:
        if self._text_kind is None:
            self._text_kind = TextEmbedding(self.encoder)
        return self._text_kind

    # -- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return self.catalog.names()

    def records(self) -> list[AdapterRecord]:
        return self.catalog.records()

    def record(self, name: str) -> AdapterRecord:
        record = self.catalog.record(name)
        if record is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
        return record

    def __len__(self) -> int:
        return self.catalog.count()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.catalog.record(name) is not None

    def __iter__(self):
        return iter(self.names())

    def get(self, name: str, modules: list[str] | None = None) -> LoraAdapter:
        """Load one adapter, its bytes checked against the catalog first (size + checksum, see tensor_file.py):
        CorruptAdapterError if they differ. With `modules`, only those become part of the adapter."""
        record = self.record(name)
        path = library_file(self.root, record.file)
        try:
            return read_adapter_file(path, modules, expected_check=record.file_check,
                                     expected_sha256=record.file_sha256, name=record.name,
                                     description=record.description, tags=record.tags,
                                     examples=record.examples, source=record.source)
        except FileNotFoundError:
            if self.catalog.record(name) != record:   # another process removed or replaced it meanwhile
                raise AdapterNotFoundError(f"adapter {name!r} was removed or replaced while being read") from None
            raise CorruptAdapterError(f"{path}, the file of adapter {name!r}, is missing; run verify()") from None

    def prototypes(self, name: str, modules: list[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (right singular vectors (k, d_in), singular values (k,)) of the adapter's dW, for the
        requested modules (default: all) that the adapter targets."""
        record = self.record(name)
        unknown = sorted(set(modules or ()) - set(self.base_model.modules))
        if unknown:
            raise ValueError(f"module(s) {unknown[:3]} are not in the base model {self.base_model.name!r}")
        self.ensure_derived(kinds=("arrow",), names=[name], progress=False)
        wanted = None if modules is None else [f"{m}::{p}" for m in modules for p in ("vectors", "values")]
        try:
            tensors = self.derived.get(self.arrow, record.content_hash, wanted)
        except CorruptAdapterError:
            if self.catalog.record(name) != record:   # another process removed or replaced it meanwhile
                raise AdapterNotFoundError(f"adapter {name!r} was removed or replaced while being read") from None
            raise
        if tensors is None:
            if self.catalog.record(name) != record:
                raise AdapterNotFoundError(f"adapter {name!r} was removed or replaced while being read")
            raise CorruptAdapterError(f"the Arrow prototypes of adapter {name!r} are missing; run verify()")
        present = sorted({k.split("::")[0] for k in tensors})  # modules the adapter does not target are absent
        return {m: (tensors[f"{m}::vectors"], tensors[f"{m}::values"]) for m in present}

    def parameter_embeddings(self, names: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(names, (n, D) unit rows): sketches of each adapter's dW, for clustering."""
        return self._vectors(self.sketch, "content_hash", names)

    def text_embeddings(self, names: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(names, (n, dim) unit rows): pooled embeddings of description + example prompts."""
        return self._vectors(self.text_kind, "text_hash", names)

    def _vectors(self, kind, key_field: str, names):
        names = self.names() if names is None else list(names)
        self.ensure_derived(kinds=(kind.kind,), names=names)
        with self.catalog.snapshot():                # records and their vectors from one committed state
            return names, self._read_vectors(kind, key_field, [self.record(n) for n in names])

    def _read_vectors(self, kind, key_field: str, records) -> np.ndarray:
        stored = [self.derived.get(kind, getattr(r, key_field), ["vector"]) for r in records]
        missing = [r.name for r, row in zip(records, stored) if not row]
        if missing:
            raise LibraryError(f"no {kind.kind} data for {missing[:3]} in {self.root}; run ensure_derived()")
        rows = [row["vector"] for row in stored]
        matrix = torch.stack(rows).numpy() if rows else np.zeros((0, 0), np.float32)
        return matrix.astype(np.float32, copy=False)

    # -- search ----------------------------------------------------------------------------------

    def search(self, query: str | np.ndarray | torch.Tensor, k: int = 5) -> list[SearchHit]:
        """Adapters whose descriptions and example prompts are nearest the query, best first."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        vector = self._query_vector(query)
        index = self._current_index()
        if index.size == 0:
            return []
        scores, ids = index.search(vector, min(k, index.size))
        by_id = self.catalog.names_by_id([int(i) for i in ids[0] if i >= 0])
        return [SearchHit(by_id[int(i)], float(s)) for s, i in zip(scores[0], ids[0]) if int(i) in by_id]

    def _query_vector(self, query) -> np.ndarray:
        if isinstance(query, str):
            if not query.strip():
                raise ValueError("search query is empty")
            return self.encoder.encode([query])[0]
        vector = np.asarray(query.detach().cpu() if isinstance(query, torch.Tensor) else query, np.float32)
        if vector.ndim != 1 or vector.shape[0] != self.encoder.dim or not np.isfinite(vector).all():
            raise ValueError(f"query vector must be finite with shape ({self.encoder.dim},), got {vector.shape}")
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def _current_index(self) -> TextIndex:
        """The index at the catalog's current generation: in memory, loaded from disk, or rebuilt."""
        config = IndexConfig(self.config.ivf_threshold, self.config.nprobe)
        kind = "ivf" if len(self) >= config.ivf_threshold else "flat"
        generation = int(self.catalog.get_meta("generation"))
        if self._index is not None and self._index.generation == generation and self._index.kind_wanted == kind:
            return self._index
        self.ensure_derived(kinds=("text",))
        if self._index is None or self._index.kind_wanted != kind:
            self._index = TextIndex(self.root / "index", self.text_kind.config_hash, kind, config)
        with self.catalog.snapshot():                # generation, ids and vectors of one committed state
            generation = int(self.catalog.get_meta("generation"))
            loaded = self._index.load(generation, self.catalog.ids())
            if not loaded:
                records = self.records()
                vectors = self._read_vectors(self.text_kind, "text_hash", records)
                self._index.build(np.asarray([r.id for r in records], np.int64), vectors, generation)
        if not loaded:
            self._index.save()
        return self._index

    def build_index(self) -> str:
        """Build (or load) the search index now; returns its kind, 'flat' or 'ivf'."""
        return self._current_index().kind

    # -- writing ---------------------------------------------------------------------------------

    def add(self, source, name: str | None = None, *, description: str | None = None,
            examples=None, tags=None, replace: bool = False, allow_pickle: bool = False) -> AdapterRecord:
        """Add a PEFT checkpoint folder or a LoraAdapter. Validated fully before anything is written."""
        prepared = self._prepare(source, name=name, description=description, examples=examples,
                                 tags=tags, allow_pickle=allow_pickle)
        self._attach_text([prepared])
        self._commit([prepared], replace=replace)
        return self.record(prepared.adapter.name)

    def add_many(self, source, *, replace: bool = False, skip_invalid: bool = False,
                 allow_pickle: bool = False, chunk_size: int = 64, progress: bool = True) -> list[AdapterRecord]:
        """Add every PEFT checkpoint under a folder (any depth), or every LoraAdapter of an iterable.

        All are validated first; with an invalid one, nothing is written and the error lists every
        problem (or, with skip_invalid=True, the invalid ones are skipped). Then adapters are committed
        in transactions of `chunk_size`, text embeddings computed in one batch per transaction.
        """
        sources = self._sources(source)
        problems, valid, seen = [], [], {}
        for item in tqdm(sources, desc="validate", disable=not progress):
            label = item if isinstance(item, Path) else getattr(item, "name", item)
            try:
                prepared = self._prepare(item, allow_pickle=allow_pickle, serialise=False)
                self._check_new(prepared, replace)
                for key in (prepared.adapter.name, prepared.content_hash):
                    if key in seen:
                        raise DuplicateAdapterError(f"same name or content as {seen[key]}")
                    seen[key] = label
                valid.append(item)
            except (AdapterValidationError, DuplicateAdapterError, ValueError, TypeError) as exc:
                problems.append(str(exc) if str(exc).startswith(str(label)) else f"{label}: {exc}")
        if problems and not skip_invalid:
            raise AdapterValidationError(f"{len(problems)} invalid adapter(s), nothing added:\n" + "\n".join(problems))
        names, chunk, chunk_bytes = [], [], 0
        bar = tqdm(total=len(valid), desc="add", disable=not progress)
        for position, item in enumerate(valid):
            chunk.append(self._prepare(item, allow_pickle=allow_pickle))
            chunk_bytes += len(chunk[-1].file.data)
            bar.update(1)                            # per adapter prepared: the bar moves while a chunk fills
            full = chunk_bytes >= self.config.max_chunk_bytes
            if len(chunk) == chunk_size or full or position == len(valid) - 1:
                self._attach_text(chunk)
                self._commit(chunk, replace=replace)  # each chunk is one transaction: a kill keeps those before
                names += [p.adapter.name for p in chunk]
                bar.set_postfix(committed=len(names))
                chunk, chunk_bytes = [], 0
        bar.close()
        if self._index is not None:
            self._index.save()
        return [self.record(n) for n in names]

    @staticmethod
    def _sources(source) -> list:
        if isinstance(source, (str, Path)):
            folders = sorted(p.parent for p in Path(source).rglob("adapter_config.json"))
            if not folders:
                raise LibraryError(f"no PEFT checkpoints (adapter_config.json) under {source}")
            return folders
        return list(source)

    def remove(self, name: str) -> None:
        record = self.record(name)
        path = library_file(self.root, record.file)   # a hostile row is refused before anything changes
        with self.catalog.write():
            self.catalog.delete_adapter(name)
            garbage = self.derived.collect_garbage()
            generation = self.catalog.bump_generation()
        self._after_commit([path, *garbage], generation, removed=[record.id])

    def rename(self, old: str, new: str) -> AdapterRecord:
        check_adapter_name(new)
        record = self.record(old)
        if new != old and new in self:
            raise DuplicateAdapterError(f"an adapter named {new!r} already exists")
        return self._update_metadata(record, name=new)

    def update(self, name: str, *, description: str | None = None, examples=None, tags=None,
               source: str | None = None) -> AdapterRecord:
        """Change an adapter's metadata; its text embedding is recomputed if its texts change."""
        record = self.record(name)
        changes = {k: v for k, v in dict(description=description, source=source).items() if v is not None}
        if examples is not None:
            changes["examples"] = coerce_texts(examples, "examples")
        if tags is not None:
            changes["tags"] = coerce_texts(tags, "tags")
        return self._update_metadata(record, **changes)

    # -- internals -------------------------------------------------------------------------------

    def _prepare(self, source, *, name=None, description=None, examples=None, tags=None,
                 allow_pickle=False, serialise=True) -> _Prepared:
        if isinstance(source, LoraAdapter):
            adapter = source
        elif isinstance(source, (str, Path)):
            adapter = LoraAdapter.from_peft(source, allow_pickle=allow_pickle)
        else:
            raise TypeError(f"add() takes a PEFT checkpoint folder or a LoraAdapter, got {type(source).__name__}")
        changes = {"name": name, "description": description}
        changes = {k: v for k, v in changes.items() if v is not None}
        if examples is not None:
            changes["examples"] = coerce_texts(examples, "examples")
        if tags is not None:
            changes["tags"] = coerce_texts(tags, "tags")
        adapter = adapter.with_metadata(**changes)
        adapter.validate()
        check_against_base(adapter, self.base_model, check_name=self.config.check_base_name)
        adapter = adapter.with_metadata(conv1d=frozenset(adapter.modules) & self.base_model.conv1d)
        texts = adapter_texts(adapter.name, adapter.description, adapter.examples)
        if not serialise:
            return _Prepared(adapter, adapter.content_hash(), texts, None, {})
        derived = {kind: kind.compute(adapter, self.base_model) for kind in (self.arrow, self.sketch)}
        file = PendingFile.of("", adapter_file_bytes(adapter))
        content_hash = adapter.content_hash()
        file.relpath = f"adapters/{content_hash[:32]}.safetensors"
        return _Prepared(adapter, content_hash, texts, file, derived)

    def _attach_text(self, prepared: list[_Prepared]) -> None:
        todo = [p for p in prepared if self.derived.missing(self.text_kind, {text_hash(p.texts)})]
        for item, tensors in zip(todo, self.text_kind.compute_many([p.texts for p in todo])):
            item.text_derived = tensors

    def _check_new(self, item: _Prepared, replace: bool) -> AdapterRecord | None:
        """Raise if `item` may not be committed; return the record it replaces, if any."""
        name = item.adapter.name
        existing = self.catalog.record(name)
        if existing is not None and not replace:
            raise DuplicateAdapterError(f"an adapter named {name!r} already exists (pass replace=True)")
        twin = self.catalog.record_by_content(item.content_hash)
        if twin is not None and twin.name != name:
            raise DuplicateAdapterError(f"{name!r} has the same content as existing adapter {twin.name!r}")
        return existing

    def _commit(self, items: list[_Prepared], replace: bool) -> None:
        if len({p.adapter.name for p in items}) != len(items):
            raise DuplicateAdapterError("the same adapter name appears twice in one batch")
        stale, removed, added = [], [], {}
        with self.catalog.write():
            for item in items:
                existing = self._check_new(item, replace)
                if existing is not None:
                    self.catalog.delete_adapter(existing.name)
                    removed.append(existing.id)
                    if existing.file != item.file.relpath:
                        stale.append(library_file(self.root, existing.file))
                self.derived.place(item.file)
                adapter_id = self.catalog.insert_adapter(self._row(item))
                for kind, tensors in item.content_derived.items():
                    self.derived.put(kind, item.content_hash, tensors)
                if item.text_derived is None and self.derived.missing(self.text_kind, {text_hash(item.texts)}):
                    # its twin's text data was collected by another writer since _attach_text looked
                    item.text_derived = self.text_kind.compute_many([item.texts])[0]
                if item.text_derived is not None:
                    self.derived.put(self.text_kind, text_hash(item.texts), item.text_derived)
                added[adapter_id] = self._text_vector(text_hash(item.texts))
            stale += self.derived.collect_garbage()
            generation = self.catalog.bump_generation()
        self._after_commit(stale, generation, removed=removed, added=added)

    def _text_vector(self, key: str) -> np.ndarray:
        """Inside a write: the stored pooled text embedding of `key`, for the in-memory index."""
        return self.derived.get(self.text_kind, key, ["vector"])["vector"].numpy()

    def _row(self, item: _Prepared) -> dict:
        a = item.adapter
        return dict(name=a.name, content_hash=item.content_hash, text_hash=text_hash(item.texts),
                    file=item.file.relpath, file_sha256=item.file.sha256, file_check=content_check(item.file.data),
                    fingerprint=a.fingerprint,
                    base_model=a.base_model, dtype=str(a.dtype).replace("torch.", ""), max_rank=a.max_rank,
                    num_modules=len(a.modules), num_parameters=a.num_parameters, description=a.description,
                    tags=a.tags, examples=a.examples, source=a.source)

    def _update_metadata(self, record: AdapterRecord, **changes) -> AdapterRecord:
        merged = {**dataclasses.asdict(record), **changes}
        texts = adapter_texts(merged["name"], merged["description"], merged["examples"])
        new_hash = text_hash(texts)
        text_tensors = None
        if self.derived.missing(self.text_kind, {new_hash}):
            text_tensors = self.text_kind.compute_many([texts])[0]
        with self.catalog.write():
            if "name" in changes and changes["name"] != record.name and self.catalog.record(changes["name"]):
                raise DuplicateAdapterError(f"an adapter named {changes['name']!r} already exists")
            self.catalog.update_adapter(record.name, {**changes, "text_hash": new_hash})
            if text_tensors is None and self.derived.missing(self.text_kind, {new_hash}):
                text_tensors = self.text_kind.compute_many([texts])[0]   # collected since we looked
            if text_tensors is not None:
                self.derived.put(self.text_kind, new_hash, text_tensors)
            vector = self._text_vector(new_hash)
            garbage = self.derived.collect_garbage()
            generation = self.catalog.bump_generation()
        self._after_commit(garbage, generation, removed=[record.id], added={record.id: vector})
        return self.record(merged["name"])

    def _after_commit(self, files: list[Path], generation: int, removed=(), added=None) -> None:
        """Delete files the commit made unreferenced (under the lock); bring the in-memory index to `generation`."""
        from .maintenance import delete_unreferenced

        delete_unreferenced(self, files)
        if self._index is not None:
            self._index.update(list(removed), added or {}, generation - 1, generation)

    # -- router artifacts (e.g. trained gates), saved with the library ------------------------------

    def save_artifact(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
        """Atomically write routers/<name>.safetensors with a JSON metadata header."""
        check_adapter_name(name)
        data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                       metadata={"adaptermix": json.dumps(metadata)})
        path = self.root / "routers" / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, data)
        return path

    def load_artifact(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """A saved router artifact, read like every library file: no link followed, every header field checked
        (AdapterFormatError names what is wrong), tensors owned by the caller."""
        path = self.root / "routers" / f"{check_adapter_name(name)}.safetensors"
        if path.is_symlink():
            raise UnsafeLibraryError(f"{path} is a symbolic link; a library may not hold links (they can point "
                                     "anywhere), so it is not followed")
        if not path.is_file():
            raise LibraryError(f"no router artifact {name!r} in {self.root}")
        header, tensors = parse_safetensors(read_checked(path), str(path))
        try:
            metadata = json.loads(header.get("adaptermix", "{}"))
        except ValueError as exc:
            raise AdapterFormatError(f"{path}: its adaptermix metadata is not JSON: {exc}") from exc
        if not isinstance(metadata, dict):
            raise AdapterFormatError(f"{path}: its adaptermix metadata is not a JSON object")
        return tensors, metadata

    def content_hashes(self, names: list[str]) -> list[str]:
        return [self.record(n).content_hash for n in names]

    def ensure_derived(self, kinds=("arrow", "sketch", "text"), names: list[str] | None = None,
                       progress: bool = True) -> int:
        """Compute derived data that is missing for the current configs. Returns how many items were made."""
        from .maintenance import ensure_derived

        return ensure_derived(self, kinds, names, progress)

    def verify(self, deep: bool = False) -> list[str]:
        """Cross-check catalog, files and hashes. Returns the problems found; empty when sound."""
        from .maintenance import verify

        return verify(self, deep)

    def _recover(self) -> None:
        from .maintenance import recover

        recover(self)

    def __repr__(self) -> str:
        return f"AdapterLibrary({str(self.root)!r}, base_model={self.base_model.name!r}, adapters={len(self)})"
