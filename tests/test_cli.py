"""The `adaptermix` CLI over a real library (in process, through `main(argv)`)."""

import json

import pytest

import adaptermix as am
from adaptermix.cli import main


@pytest.fixture
def base_folder(tmp_path, llama):
    folder = tmp_path / "tiny-llama"  # the checkpoints name their base model 'tiny-llama'
    llama.config.save_pretrained(folder)
    return folder


def test_build_list_show_search_verify_export_remove(tmp_path, checkpoints, base_folder, capsys):
    lib = str(tmp_path / "lib")
    folder = str(checkpoints["sql"].parent)
    assert main(["build", folder, lib, f"base_model={base_folder}", "progress=false"]) == 0
    assert "added 3 adapter(s)" in capsys.readouterr().out

    assert main(["list", lib]) == 0
    listing = capsys.readouterr().out
    assert "celsius" in listing and "Convert temperatures" in listing and "3 adapter(s)" in listing

    assert main(["show", lib, "sql"]) == 0
    assert json.loads(capsys.readouterr().out)["max_rank"] == 4

    assert main(["search", lib, "fahrenheit from celsius", "search.k=2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[-1] == "celsius"

    assert main(["verify", lib, "verify.deep=true"]) == 0
    assert "no problems" in capsys.readouterr().out

    out = tmp_path / "exported"
    assert main(["export", lib, "reverse", str(out)]) == 0
    assert am.LoraAdapter.from_peft(out).content_hash() == am.LoraAdapter.from_peft(checkpoints["reverse"]).content_hash()

    assert main(["remove", lib, "reverse"]) == 0
    capsys.readouterr()
    assert main(["list", lib]) == 0 and "2 adapter(s)" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, checkpoints, base_folder, capsys):
    lib = str(tmp_path / "lib")
    with pytest.raises(SystemExit, match="base_model"):
        main(["build", str(checkpoints["sql"].parent), lib])
    assert main(["build", str(checkpoints["sql"].parent), lib, f"base_model={base_folder}", "progress=false"]) == 0
    capsys.readouterr()
    assert main(["show", lib, "nope"]) == 1
    assert "no adapter named 'nope'" in capsys.readouterr().err
    assert main(["list", lib, "no.such.key=1"]) == 2
    assert "bad override" in capsys.readouterr().err
    assert main(["list", lib, "stray"]) == 2
    assert main(["list", str(tmp_path / "missing")]) == 1
    assert "no adaptermix library" in capsys.readouterr().err

    victim = tmp_path / "lib" / am.AdapterLibrary.open(lib).record("sql").file
    victim.write_bytes(b"corrupt")
    assert main(["verify", lib]) == 1
    assert "sql: adapter file" in capsys.readouterr().out
