"""Pointing a library at a base model: the shipped SmolLM2 by hub name or alias with no network attempt,
other names failing fast offline, the base-name policy a library remembers, fused adapters carrying the
library's base."""

import socket
import time

import pytest

import adaptermix as am
from adaptermix.cli import main
from adaptermix.models import SMOLLM2, smollm2_path


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


@pytest.mark.parametrize("name", [SMOLLM2, "smollm2", "SmolLM2-135M-Instruct"])
def test_the_shipped_smollm2_by_hub_name_or_alias_with_no_network_attempt(name, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    am.BaseModelSpec.from_pretrained(str(smollm2_path()))  # converted once, transformers imported: not timed
    start = time.perf_counter()
    spec = am.BaseModelSpec.from_pretrained(name)
    assert time.perf_counter() - start < 5 and no_network == []
    assert spec.name == SMOLLM2 and len(spec.modules) == 30 * 7 + 1  # 7 linears per layer, and lm_head


def test_the_cli_builds_on_smollm2_by_alias(tmp_path, h, capsys, no_network):
    lib = tmp_path / "lib"
    acronym = h.repo / "examples" / "suite_adapters" / "acronym"
    assert main(["build", str(lib), str(acronym), "base_model=smollm2", "progress=false"]) == 0
    assert f"base model {SMOLLM2}" in capsys.readouterr().out   # its checkpoint names the cache path: accepted


def test_another_name_fails_fast_offline_and_says_what_to_pass(tmp_path, no_network, monkeypatch, capsys):
    am.BaseModelSpec.from_pretrained(str(smollm2_path()))  # transformers imported: not timed
    for offline in ("1", None):  # declared offline, or just no network
        if offline is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        start = time.perf_counter()
        with pytest.raises(am.LibraryError, match="smollm2"):
            am.BaseModelSpec.from_pretrained("someone/not-a-model-here")
        assert time.perf_counter() - start < 5
    code = main(["build", str(tmp_path / "lib"), str(tmp_path), "base_model=someone/not-a-model-here"])
    assert code in (1, 2) and not (tmp_path / "lib").exists()


def test_a_library_remembers_its_base_name_policy(tmp_path, llama, checkpoints):
    spec = am.BaseModelSpec.from_model(llama, name="/models/my-llama-copy")   # same weights, another name
    strict = am.AdapterLibrary.create(tmp_path / "strict", base_model=spec)
    with pytest.raises(am.BaseModelMismatchError, match="library.check_base_name=false"):
        strict.add(checkpoints["sql"])
    am.AdapterLibrary.create(tmp_path / "lenient", base_model=spec,
                             config=am.LibraryConfig(check_base_name=False)).close()
    with am.AdapterLibrary.open(tmp_path / "lenient") as lenient:      # a default handle: the policy holds
        lenient.add(checkpoints["sql"])
        lenient.add(checkpoints["celsius"])
        fused = am.fuse(lenient, ["sql", "celsius"], method="ties", name="both")
        assert fused.base_model == "/models/my-llama-copy"
        lenient.add(fused)
    strict.add(fused)   # carries the library's base identity: accepted by the strict library of that base too
    assert "both" in strict
