"""docs/YOUR_ADAPTERS.md, run: every command of its `bash` blocks and its Python snippet, in order, on tiny
models (the guide's `my-adapters` are the tiny Llama's PEFT checkpoints, its `smollm2` the tiny Llama's
folder), so the guide cannot go stale."""

import re
import shlex
import shutil
import subprocess
import sys

from adaptermix.cli import main

GUIDE = "docs/YOUR_ADAPTERS.md"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_guide_runs_on_tiny_models(h, tmp_path, checkpoints, llama_folder, monkeypatch, capsys):
    text = (h.repo / GUIDE).read_text()
    shutil.copytree(checkpoints["sql"].parent, tmp_path / "work" / "my-adapters")
    monkeypatch.chdir(tmp_path / "work")
    commands = [line.strip() for block in blocks(text, "bash") for line in block.splitlines()
                if line.strip().startswith(("adaptermix ", "python examples/demo.py"))]
    assert len(commands) >= 12
    for command in commands:
        argv = [a.replace("base_model=smollm2", f"base_model={llama_folder}") for a in shlex.split(command)]
        if argv[0] == "python":
            result = subprocess.run([sys.executable, "-P", str(h.repo / argv[1]), *argv[2:]], capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, (command, result.stderr[-3000:])
            assert "routed:" in result.stdout and (tmp_path / "work" / "demo_out" / "routing.png").is_file()
            continue
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, (command, err)
        assert out.strip(), command
    (snippet,) = [b for b in blocks(text, "python") if "PeftModel" in b]
    exec(snippet.replace('"smollm2"', repr(str(llama_folder))), {})
