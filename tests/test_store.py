"""The library store: CRUD, validation, derived data, search, verify."""

import numpy as np
import pytest
import torch

import adaptermix as am


def random_adapter(spec: am.BaseModelSpec, name: str, *, seed: int, ranks=(2, 3, 5), modules=None,
                   dtype=torch.float32, description="") -> am.LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    chosen = modules or list(spec.modules)[:6]
    out = {}
    for i, module_name in enumerate(chosen):
        d_out, d_in = spec.modules[module_name]
        r = ranks[i % len(ranks)]
        out[module_name] = am.LoraModule(torch.randn(r, d_in, generator=gen, dtype=dtype),
                                         torch.randn(d_out, r, generator=gen, dtype=dtype),
                                         alpha=float(2 * r), use_rslora=bool(i % 2))
    return am.LoraAdapter(name, spec.name, out, description=description)


def test_crud(library, checkpoints, h):
    assert len(library) == 0 and "reverse" not in library
    records = library.add_many(checkpoints["reverse"].parent, progress=False)
    assert sorted(r.name for r in records) == ["celsius", "reverse", "sql"]
    assert len(library) == 3 and "reverse" in library and list(library) == library.names()
    assert library.record("celsius").description.startswith("Convert temperatures")
    assert library.get("sql").max_rank == 4

    library.rename("sql", "text_to_sql")
    assert "sql" not in library and library.get("text_to_sql").max_rank == 4
    library.update("text_to_sql", description="Translate questions into SQL", tags=["code"])
    assert library.record("text_to_sql").tags == ("code",)
    library.remove("reverse")
    assert library.names() == ["celsius", "text_to_sql"]
    with pytest.raises(am.AdapterNotFoundError, match="reverse"):
        library.get("reverse")
    assert library.verify(deep=True) == []

    reopened = am.AdapterLibrary.open(library.root)
    assert reopened.names() == ["celsius", "text_to_sql"]
    assert reopened.get("celsius").content_hash() == library.get("celsius").content_hash()


def test_duplicates_and_replace(library, checkpoints, h):
    library.add(checkpoints["reverse"])
    with pytest.raises(am.DuplicateAdapterError, match="already exists"):
        library.add(checkpoints["celsius"], name="reverse")
    with pytest.raises(am.DuplicateAdapterError, match="same content as existing adapter 'reverse'"):
        library.add(checkpoints["reverse"], name="reverse_again")
    old_file = library.root / library.record("reverse").file
    library.add(checkpoints["celsius"], name="reverse", replace=True)
    assert library.get("reverse").content_hash() == am.LoraAdapter.from_peft(checkpoints["celsius"]).content_hash()
    assert not old_file.exists() and len(library) == 1 and library.verify() == []
    library.add(checkpoints["sql"])
    with pytest.raises(am.DuplicateAdapterError, match="'reverse' already exists"):
        library.rename("sql", "reverse")


def test_add_many_is_all_or_nothing_unless_skipping(library, checkpoints, tmp_path, h):
    bad = checkpoints["sql"].parent / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    before = h.snapshot(library.root)
    with pytest.raises(am.AdapterValidationError, match="(?s)1 invalid adapter.*broken.*peft_type"):
        library.add_many(checkpoints["sql"].parent, progress=False)
    assert h.snapshot(library.root) == before
    added = library.add_many(checkpoints["sql"].parent, skip_invalid=True, progress=False)
    assert len(added) == 3


def test_add_many_takes_adapter_objects(tmp_path, llama, h):
    # A small byte budget forces one transaction per adapter; the result is the same.
    library = am.AdapterLibrary.create(tmp_path / "lib", base_model=llama, config=am.LibraryConfig(max_chunk_bytes=1))
    spec = library.base_model
    adapters = [random_adapter(spec, f"obj{i}", seed=20 + i) for i in range(5)]
    clash = random_adapter(spec, "obj0", seed=99)
    before = h.snapshot(library.root)
    with pytest.raises(am.AdapterValidationError, match="(?s)obj0.*same name or content"):
        library.add_many([*adapters, clash], progress=False)
    assert h.snapshot(library.root) == before
    assert [r.name for r in library.add_many(adapters, chunk_size=2, progress=False)] == [a.name for a in adapters]
    assert library.verify() == []


def test_add_many_progress_moves_per_adapter_before_its_chunk_commits(tmp_path, llama, monkeypatch):
    """The bar advances as each adapter is prepared, not only when a long transaction ends."""
    from adaptermix.library import store

    events = []

    class Bar:
        def __init__(self, *args, total=None, desc="", disable=False, **kwargs):
            self.items, self.desc = args[0] if args else None, desc

        def __iter__(self):
            return iter(self.items)

        def update(self, n=1):
            events.append(f"{self.desc} +{n}")

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    library = am.AdapterLibrary.create(tmp_path / "lib", base_model=llama)
    commit = library._commit
    monkeypatch.setattr(store, "tqdm", Bar)
    monkeypatch.setattr(library, "_commit", lambda items, replace: (events.append(f"commit {len(items)}"),
                                                                     commit(items, replace))[1])
    adapters = [random_adapter(library.base_model, f"bar{i}", seed=40 + i) for i in range(5)]
    library.add_many(adapters, chunk_size=3)
    assert events == ["add +1"] * 3 + ["commit 3"] + ["add +1"] * 2 + ["commit 2"]


@pytest.mark.parametrize("case, error, words", [
    ("unknown_module", am.BaseModelMismatchError, "not in the base model"),
    ("wrong_shape", am.BaseModelMismatchError, "shape mismatch"),
    ("other_base_name", am.BaseModelMismatchError, "trained on 'org/some-other-model'"),
    ("nan", am.AdapterValidationError, "NaN"),
    ("traversal", am.AdapterValidationError, "unsafe adapter name"),
    ("separator", am.AdapterValidationError, "unsafe adapter name"),
    ("examples_not_text", am.AdapterValidationError, "examples must be a list of strings"),
])
def test_invalid_adapters_leave_the_library_unchanged(library, case, error, words, h):
    spec = library.base_model
    library.add(random_adapter(spec, "keep", seed=0))
    before = h.snapshot(library.root)
    adapter = random_adapter(spec, "new", seed=1)
    module_name = next(iter(adapter.modules))
    module = adapter.modules[module_name]
    kwargs = {}
    if case == "unknown_module":
        adapter.modules["model.layers.9.self_attn.q_proj"] = module
    elif case == "wrong_shape":
        adapter.modules[module_name] = am.LoraModule(module.A[:, :-1], module.B, module.alpha)
    elif case == "other_base_name":
        adapter = adapter.with_metadata(base_model="org/some-other-model")
    elif case == "nan":
        module.A[0, 0] = float("nan")
    elif case == "traversal":
        kwargs["name"] = "../evil"
    elif case == "separator":
        kwargs["name"] = "a/b"
    elif case == "examples_not_text":
        kwargs["examples"] = ["fine", 3]
    with pytest.raises(error, match=words):
        library.add(adapter, **kwargs)
    assert h.snapshot(library.root) == before and library.verify() == []


def test_arrow_prototypes_match_dense_float64_svd(library):
    spec = library.base_model
    for seed in range(3):
        adapter = random_adapter(spec, f"a{seed}", seed=seed, ranks=(1, 2, 4, 7))
        library.add(adapter)
        prototypes = library.prototypes(adapter.name)
        assert set(prototypes) == set(adapter.modules)
        for module_name, module in adapter.modules.items():
            vectors, values = prototypes[module_name]
            assert vectors.shape == (module.rank, module.d_in)
            _, S, Vh = torch.linalg.svd(module.delta_weight(torch.float64), full_matrices=False)
            cos = torch.nn.functional.cosine_similarity(vectors[0].double(), Vh[0], dim=0).abs()
            assert cos > 0.9999, (module_name, cos)
            torch.testing.assert_close(values.double(), S[:module.rank], rtol=1e-5, atol=1e-6)


def test_derived_data_is_recomputed_only_for_a_new_config(library):
    spec = library.base_model
    library.add(random_adapter(spec, "x", seed=4, ranks=(4,)))
    assert library.ensure_derived(progress=False) == 0          # computed on add
    other = am.AdapterLibrary.open(library.root, config=am.LibraryConfig(arrow_directions=1, sketch_dim=3))
    assert other.ensure_derived(kinds=("arrow", "sketch"), progress=False) == 2
    assert other.ensure_derived(kinds=("arrow", "sketch"), progress=False) == 0
    vectors, values = other.prototypes("x")[next(iter(spec.modules))]
    assert vectors.shape[0] == 1 and values.shape == (1,)
    assert library.prototypes("x")[next(iter(spec.modules))][0].shape[0] == 4
    assert other.verify() == [] and library.verify() == []
    untargeted = list(spec.modules)[-1]
    assert set(library.prototypes("x", modules=[next(iter(spec.modules)), untargeted])) == {next(iter(spec.modules))}
    with pytest.raises(ValueError, match="not in the base model"):
        library.prototypes("x", modules=["model.nowhere"])


def test_parameter_embedding_tracks_the_update_not_the_factorisation(library):
    spec = library.base_model
    a = random_adapter(spec, "a", seed=5, ranks=(4,))
    # Same dW, other factors: A' = M·A, B' = B·M^-1 for a random invertible M.
    gen = torch.Generator().manual_seed(0)
    twin_modules = {}
    for module_name, module in a.modules.items():
        M = torch.randn(4, 4, generator=gen, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
        twin_modules[module_name] = am.LoraModule((M @ module.A.double()).float(),
                                                  (module.B.double() @ torch.linalg.inv(M)).float(),
                                                  module.alpha, module.use_rslora)
    library.add(a)
    library.add(am.LoraAdapter("twin", spec.name, twin_modules))
    library.add(random_adapter(spec, "other", seed=6, ranks=(4,)))
    names, vectors = library.parameter_embeddings()
    sim = vectors @ vectors.T
    assert sim[0, 1] > 0.999 and abs(sim[0, 2]) < 0.5
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_search_ranks_by_description_and_stays_in_step(library, checkpoints):
    library.add_many(checkpoints["sql"].parent, progress=False)
    assert library.search("turn degrees celsius into fahrenheit", k=1)[0].name == "celsius"
    assert library.search("SELECT count(*) FROM users", k=3)[0].name == "sql"
    hits = library.search("reverse word order", k=10)
    assert [h.name for h in hits][0] == "reverse" and len(hits) == 3
    assert hits[0].score >= hits[1].score >= hits[2].score

    library.rename("celsius", "temperature")
    assert library.search("celsius to fahrenheit", k=1)[0].name == "temperature"
    library.remove("sql")
    assert "sql" not in [h.name for h in library.search("SQL query", k=5)]
    library.update("reverse", description="Summarise a news article in one line")
    assert library.search("summary of an article", k=1)[0].name == "reverse"

    # Another handle sees the same answers through the persisted (or rebuilt) index.
    reopened = am.AdapterLibrary.open(library.root)
    assert reopened.search("celsius to fahrenheit", k=1)[0].name == "temperature"
    vector = reopened.encoder.encode(["celsius to fahrenheit"])[0]
    assert reopened.search(vector, k=1)[0].name == "temperature"


def test_search_bad_input(library, checkpoints):
    library.add(checkpoints["sql"])
    with pytest.raises(ValueError, match="empty"):
        library.search("   ")
    with pytest.raises(ValueError, match="positive"):
        library.search("x", k=0)
    with pytest.raises(ValueError, match="shape"):
        library.search(np.ones(7, np.float32))


def test_ivf_index_for_large_libraries(tmp_path, llama):
    config = am.LibraryConfig(ivf_threshold=40, nprobe=64)
    library = am.AdapterLibrary.create(tmp_path / "big", base_model=llama, config=config)
    spec = library.base_model
    topics = ["weather", "chess", "poetry", "sql", "french", "algebra", "recipes", "music"]
    for i in range(48):
        library.add(random_adapter(spec, f"{topics[i % 8]}_{i}", seed=100 + i, ranks=(1,), modules=list(spec.modules)[:1],
                                   description=f"Answer questions about {topics[i % 8]}, variant {i}"))
    assert library.build_index() == "ivf"
    small = am.AdapterLibrary.open(library.root, config=am.LibraryConfig(ivf_threshold=10_000))
    assert small.build_index() == "flat"
    assert small.search("a question about chess openings", k=1)[0].name.startswith("chess")
    assert library.search("a question about chess openings", k=1)[0].name.startswith("chess")


def test_verify_finds_corruption_missing_and_orphan_files(library, checkpoints):
    library.add_many(checkpoints["sql"].parent, progress=False)
    assert library.verify(deep=True) == []
    record = library.record("sql")
    path = library.root / record.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (library.root / library.record("celsius").file).unlink()
    (library.root / "adapters" / "stray.safetensors").write_bytes(b"x")
    problems = "\n".join(library.verify())
    assert "sql: adapter file" in problems and "does not match" in problems
    assert "celsius: adapter file" in problems and "missing" in problems
    assert "orphan file not in the catalog: adapters/stray.safetensors" in problems


def test_create_and_open_errors(tmp_path, llama, library):
    with pytest.raises(am.LibraryError, match="no adaptermix library"):
        am.AdapterLibrary.open(tmp_path / "nowhere")
    with pytest.raises(am.LibraryError, match="already exists"):
        am.AdapterLibrary.create(library.root, base_model=llama)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(am.LibraryError, match="not empty"):
        am.AdapterLibrary.create(tmp_path / "full", base_model=llama)
    with pytest.raises(am.LibraryError, match="cannot read the base model config"):
        am.AdapterLibrary.create(tmp_path / "new", base_model="no-such-org/no-such-model")
    with pytest.raises(TypeError, match="base_model"):
        am.AdapterLibrary.create(tmp_path / "new2", base_model=42)


def test_base_model_from_a_local_folder_reads_only_the_config(tmp_path, llama):
    llama.config.save_pretrained(tmp_path / "model")  # no weights at all
    spec = am.BaseModelSpec.from_pretrained(str(tmp_path / "model"))
    assert spec.fingerprint == am.BaseModelSpec.from_model(llama).fingerprint
    assert spec.modules["model.layers.0.mlp.down_proj"] == (64, 96)
