"""The `adaptermix` CLI over real libraries and tiny models (in process, through `main(argv)`; start-up and
`python -m` in subprocesses)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import adaptermix as am
from adaptermix.cli import COMMANDS, main
from adaptermix.cli_options import load_config


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def lib(tmp_path, checkpoints, llama_folder, capsys):
    path = tmp_path / "lib"
    code, out, err = cli(capsys, "build", path, checkpoints["sql"].parent, f"base_model={llama_folder}",
                         "progress=false")
    assert code == 0, err
    return path


def test_build_list_show_search_verify_export_remove(tmp_path, lib, checkpoints, capsys):
    code, out, _ = cli(capsys, "list", lib)
    assert code == 0 and "celsius" in out and "Convert temperatures" in out and "3 adapter(s)" in out

    code, out, _ = cli(capsys, "show", lib, "sql")
    assert code == 0 and json.loads(out)["max_rank"] == 4

    code, out, _ = cli(capsys, "search", lib, "fahrenheit from celsius", "search.k=2")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].split()[-1] == "celsius"

    code, out, _ = cli(capsys, "verify", lib, "verify.deep=true")
    assert code == 0 and "no problems" in out

    out_dir = tmp_path / "exported"
    assert cli(capsys, "export", lib, "reverse", out_dir)[0] == 0
    exported, original = am.LoraAdapter.from_peft(out_dir), am.LoraAdapter.from_peft(checkpoints["reverse"])
    assert exported.content_hash() == original.content_hash()

    assert cli(capsys, "remove", lib, "reverse")[0] == 0
    code, out, _ = cli(capsys, "list", lib, "--json")
    assert code == 0 and sorted(a["name"] for a in json.loads(out)["adapters"]) == ["celsius", "sql"]


def test_build_again_adds_what_is_new_and_says_what_it_skipped(tmp_path, lib, checkpoints, h, capsys):
    folder = checkpoints["sql"].parent
    code, out, _ = cli(capsys, "build", lib, folder, "progress=false")
    assert code == 0 and "added 0 adapter(s)" in out
    assert out.count("already in the library") == 3 and "3 adapter(s) in" in out

    h.make_peft_checkpoint(h.tiny_llama, folder / "fresh", seed=99)
    h.make_peft_checkpoint(h.tiny_llama, tmp_path / "other" / "sql", seed=98)   # a different 'sql'
    code, out, _ = cli(capsys, "build", lib, folder, tmp_path / "other", "progress=false")
    assert code == 0 and "added 1 adapter(s): fresh" in out
    assert "name 'sql' is taken by a different adapter (build.replace=true replaces it)" in out
    assert "4 adapter(s) in" in out


def test_build_refuses_bad_input_and_leaves_no_library(tmp_path, checkpoints, llama_folder, capsys):
    folder, new = checkpoints["sql"].parent, tmp_path / "new"
    code, _, err = cli(capsys, "build", new, tmp_path / "missing", f"base_model={llama_folder}")
    assert code == 1 and "no folder" in err and len(err.strip().splitlines()) == 1 and not new.exists()

    code, _, err = cli(capsys, "build", new, folder)
    assert code == 2 and "base_model=MODEL" in err and not new.exists()

    code, _, err = cli(capsys, "build", folder, new, f"base_model={llama_folder}")     # the old order
    assert code == 2 and "the library comes first" in err and not new.exists()

    code, _, err = cli(capsys, "build", new, folder, f"base_model={tmp_path / 'no-such-model'}")
    assert code == 1 and "no-such-model" in err and len(err.strip().splitlines()) == 1 and not new.exists()

    (folder / "sql" / "adapter_model.safetensors").write_bytes(b"junk")
    code, _, err = cli(capsys, "build", new, folder, f"base_model={llama_folder}", "progress=false")
    assert code == 1 and "sql" in err and "build.skip_invalid=true" in err and not new.exists()
    code, out, _ = cli(capsys, "build", new, folder, f"base_model={llama_folder}", "progress=false",
                       "build.skip_invalid=true")
    assert code == 0 and "added 2 adapter(s)" in out and "skipped" in out and "sql" in out


def test_ctrl_c_is_one_line_exit_130_and_keeps_no_new_library(tmp_path, checkpoints, llama_folder, capsys,
                                                               monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(am.AdapterLibrary, "add_many", interrupted)
    new = tmp_path / "new"
    code, out, err = cli(capsys, "build", new, checkpoints["sql"].parent, f"base_model={llama_folder}")
    assert code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err
    assert not new.exists()


def test_usage_errors_name_the_fix_and_exit_2(lib, capsys):
    code, _, err = cli(capsys, "search", lib, "query", "k=2")
    assert code == 2 and "did you mean search.k=" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "build", lib, lib, "+replace=true")
    assert code == 2 and "did you mean build.replace=" in err
    code, _, err = cli(capsys, "search", lib, "query", "serch.k=2")
    assert code == 2 and "search.k" in err
    code, _, err = cli(capsys, "list", lib, "search.k=2")
    assert code == 2 and "takes no key=value options" in err
    code, _, err = cli(capsys, "route", lib, "hi", "router=nope")
    assert code == 2 and "unknown router 'nope'" in err
    code, _, err = cli(capsys, "list")
    assert code == 2 and "--help" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "frobnicate")
    assert code == 2
    code, _, err = cli(capsys, "show", lib, "sqll")
    assert code == 1 and "did you mean 'sql'" in err
    for wrong in (["fuse", lib, "sql", "celsiuss", "--name", "x"], ["export", lib, "sqll", lib.parent / "out"],
                  ["remove", lib, "sqll"], ["describe", lib, "sqll", "--description", "d"]):
        code, _, err = cli(capsys, *wrong)
        assert code == 1 and "did you mean" in err and len(err.strip().splitlines()) == 1, wrong
    code, _, err = cli(capsys, "fuse", lib, "sql", "celsius", "--method", "tie", "--name", "x")
    assert code == 2 and "ties" in err and "--method" in err
    code, _, err = cli(capsys, "fuse", lib, "sql", "celsius", "--weights", "0.5", "--name", "x")
    assert code == 2 and "one weight per adapter" in err
    code, _, err = cli(capsys, "list", lib.parent / "missing")
    assert code == 1 and "no adaptermix library" in err and "adaptermix build" in err


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "serve"])
def test_help_lists_every_option_with_its_default(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    from omegaconf import OmegaConf

    flat = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            walk(value, f"{prefix}{key}.") if isinstance(value, dict) and value else flat.update({prefix + key: value})

    walk(OmegaConf.to_container(load_config([]), resolve=False))
    sections = COMMANDS[command].sections
    wanted = [k for k in flat if any(k == s or k.startswith(s + ".") for s in sections) and not k.endswith("_target_")
              or k == "library.encoder._target_" and "library.encoder" in sections]
    for key in wanted:
        value = flat[key]
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        assert f"{key}={shown}" in text, key
    for positional, _, _ in COMMANDS[command].positionals:
        assert positional in text


def test_version_module_entry_and_startup_without_torch(lib):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-P", "-m", "adaptermix", "--version"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0 and out.stdout.strip() == f"adaptermix {am.__version__}"
    probe = ("import sys; from adaptermix.cli import main; codes = [main(a) for a in "
             f"(['list', {str(lib)!r}], ['show', {str(lib)!r}, 'sql'], ['verify', {str(lib)!r}], ['--help'], "
             "['search', '--help'])]; "
             "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0, 0] False", out.stderr


def test_describe_sets_texts_that_search_reads(tmp_path, lib, capsys):
    code, out, _ = cli(capsys, "describe", lib, "reverse", "--description", "Turn a list of words around",
                       "--examples", "words in reverse order", "flip the words")
    assert code == 0
    record = json.loads(cli(capsys, "show", lib, "reverse")[1])
    assert record["description"] == "Turn a list of words around"
    assert record["examples"] == ["words in reverse order", "flip the words"]
    sidecar = tmp_path / "sql.json"
    sidecar.write_text(json.dumps({"description": "Answer questions about tables with SQL", "tags": ["code"]}))
    assert cli(capsys, "describe", lib, "sql", "--from-file", sidecar)[0] == 0
    assert json.loads(cli(capsys, "show", lib, "sql")[1])["tags"] == ["code"]
    assert cli(capsys, "search", lib, "questions about tables", "search.k=1")[1].split()[-1] == "sql"
    assert cli(capsys, "describe", lib, "sql")[0] == 2
    sidecar.write_text(json.dumps({"descripton": "typo"}))
    code, _, err = cli(capsys, "describe", lib, "sql", "--from-file", sidecar)
    assert code == 1 and "descripton" in err


def _peft_answer(llama_folder, checkpoint, prompt, max_new_tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_folder), checkpoint).eval()
    inputs = tokenizer([prompt + " "], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_route_and_generate_match_peft_on_the_chosen_adapter(lib, checkpoints, llama_folder, capsys):
    prompts = ["convert celsius to fahrenheit", "count the users in the table"]
    code, out, err = cli(capsys, "route", lib, *prompts, "--router", "retrieval", "--json")
    assert code == 0, err
    routed = json.loads(out)
    assert [r["adapters"][0]["name"] for r in routed] == ["celsius", "sql"]
    assert all(abs(r["adapters"][0]["weight"] - 1) < 1e-6 and r["router"].startswith("RetrievalRouter") for r in routed)

    code, out, err = cli(capsys, "generate", lib, *prompts, "--router", "retrieval", "--max-new-tokens", 5, "--json")
    assert code == 0, err
    for row, name in zip(json.loads(out), ["celsius", "sql"]):
        expected = _peft_answer(llama_folder, checkpoints[name], row["prompt"], 5)
        assert len(expected.split()) == 5 and row["answer"] == expected

    code, out, _ = cli(capsys, "route", lib, "tell me something nice", "--router", "retrieval",
                       "router.min_similarity=0.99")
    assert code == 0 and "note:" in out and "no adapter (base model)" in out and "adapters: none" in out

    code, out, _ = cli(capsys, "route", lib, "the date", "router.top_k=3", "route.layers=2")
    assert code == 0 and "ArrowRouter(top_k=3" in out and "layers:   0 " in out and out.count("|") == 1


def test_fuse_adds_to_the_library_or_writes_peft(tmp_path, lib, capsys):
    code, out, err = cli(capsys, "fuse", lib, "sql", "celsius", "--method", "ties", "--weights", 0.7, 0.3,
                         "--name", "sql_celsius", "progress=false")
    assert code == 0, err
    with am.AdapterLibrary.open(lib) as library:
        record = library.record("sql_celsius")
        assert record.base_model == library.base_model.name
        assert "ties fusion of sql (0.7), celsius (0.3)" in record.description
        expected = am.fuse(library, ["sql", "celsius"], [0.7, 0.3], method="ties").to(torch.float32)
        got = library.get("sql_celsius")
    for module, factors in expected.modules.items():
        torch.testing.assert_close(got.modules[module].delta_weight(), factors.delta_weight())

    out_dir = tmp_path / "fused"
    assert cli(capsys, "fuse", lib, "sql", "reverse", "--out", out_dir, "--method", "svd", "--rank", 2)[0] == 0
    from peft import LoraConfig

    assert LoraConfig.from_pretrained(out_dir).r == 2
    code, _, err = cli(capsys, "fuse", lib, "sql", "nope", "--name", "x")
    assert code == 1 and "nope" in err
    code, _, err = cli(capsys, "fuse", lib, "sql", "celsius", "--method", "avg")
    assert code == 2 and "unknown fusion method" in err and "--method" in err


def test_every_option_of_every_router_has_a_meaning():
    from adaptermix.cli_options import options, router_names

    for router in router_names():
        for command, spec in COMMANDS.items():
            blank = [k for k, o in options(spec.sections, [f"router={router}"]).items() if not o.meaning]
            assert not blank, (router, command, blank)


def test_serve_dispatches_to_the_server_cli(capsys, tmp_path):
    assert main(["serve", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "adaptermix serve LIBRARY" in shown
    options = [line.split()[0] for line in shown.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    assert {"port=8000", "engine=embedded", "max_batch_size=16", "vllm.max_loras=4"} <= set(options)
    blank = [line for line in shown.splitlines() if line.startswith("  ") and len(line.split()) == 1]
    assert not blank, blank    # every option says what it means
    assert main(["serve", str(tmp_path / "nothing-here")]) == 1
    assert "no adapter library" in capsys.readouterr().err



@pytest.mark.parametrize("config", ["demo", "evaluate", "evaluate_shared_seed"])
def test_demo_and_evaluate_take_your_library_path(config, tmp_path):
    """`library_path=DIR` points the demo and the evaluation at your library (`library=` would name the
    `library` config group, which Hydra refuses to override outside a defaults list)."""
    cfg = load_config([f"library_path={tmp_path}"], config_name=config)
    assert cfg.library_path == str(tmp_path)
    if config != "demo":                                                 # the key the evaluation scripts read
        assert cfg.library == str(tmp_path)
