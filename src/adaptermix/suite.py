"""The example library on SmolLM2-135M-Instruct: built once from the committed PEFT checkpoints (through
the `adaptermix build` command), cached, and reused; batched greedy generation for the demo and the
evaluation.

    library = suite_library()                    # ~/.cache/adaptermix/suite-library (ADAPTERMIX_CACHE)
    answers = generate(model, tokenizer, ["Rewrite the date 2021-03-09 as day/month/year."])
    exact, similarity = score_task(model, tokenizer, "date_dmy", 10)      # on the held-out split
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptermix.library import AdapterLibrary
from adaptermix.library.owned import publish_folder, remove_owned
from adaptermix.tasks import SUITE, TASKS, chat_prompt

__all__ = ["ADAPTERS", "bare_adapters", "suite_library", "generate", "answer_example", "score_task",
           "compose_adapter"]

ADAPTERS = Path(__file__).resolve().parents[2] / "examples" / "suite_adapters"   # the checkout's copy


PURPOSE = "example library"   # the ownership marker's purpose: what suite_library may replace


def _cache() -> Path:
    return Path(os.environ.get("ADAPTERMIX_CACHE", Path.home() / ".cache" / "adaptermix"))


def _complete(path: Path, adapters: Path) -> bool:
    """The cached library holds every suite adapter, each with the content of its checkpoint."""
    if not (path / "catalog.sqlite").is_file():
        return False
    from adaptermix.library.peft_format import load_peft_adapter

    with AdapterLibrary.open(path) as library:
        if set(library.names()) != set(SUITE):
            return False
        stored = library.content_hashes(list(SUITE))
        return stored == [load_peft_adapter(adapters / name).content_hash() for name in SUITE]


def suite_library(path: str | Path | None = None, adapters: str | Path | None = None,
                  rebuild: bool = False) -> AdapterLibrary:
    """Open the example library, (re)building it with the CLI when missing, stale or incomplete."""
    from adaptermix.models import smollm2_path

    adapters = Path(adapters or ADAPTERS)
    missing = [name for name in SUITE if not (adapters / name / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"the example adapters {missing} are missing from {adapters}; "
                                f"train them with `python benchmarks/train_suite.py`")
    default = "suite-library" if adapters.resolve() == ADAPTERS.resolve() else f"suite-library-{adapters.name}"
    path = Path(path or _cache() / default)
    if rebuild or not _complete(path, adapters):
        _build(path, adapters, smollm2_path())
    return AdapterLibrary.open(path)


def _build(path: Path, adapters: Path, base_model: Path) -> None:
    """Build the example library beside `path` and rename it into place. An existing `path` is replaced only
    if this function made it (its ownership marker); a user's folder raises FolderNotOwnedError untouched."""
    from adaptermix.cli import main as cli

    def build(folder: Path) -> None:
        code = cli(["build", str(folder), str(adapters), f"base_model={base_model}"])
        if code:
            raise RuntimeError(f"`adaptermix build` failed with exit code {code}")

    if path.is_symlink() or (path.exists() and any(path.iterdir())):
        remove_owned(path, PURPOSE)
    print(f"building the example library at {path} from {adapters}")
    publish_folder(path, build, PURPOSE)


def bare_adapters(adapters: str | Path | None = None) -> Path:
    """The same checkpoints without their adaptermix.json sidecars (no description, no example prompts: a
    folder of checkpoints from a hub), as a cached copy; `suite_library(adapters=bare_adapters())` opens it."""
    from adaptermix.library.peft_format import SIDECAR

    source = Path(adapters or ADAPTERS)
    bare = _cache() / f"{source.name}_bare"
    for name in SUITE:
        target = bare / name
        target.mkdir(parents=True, exist_ok=True)
        for file in (source / name).iterdir():
            if file.name != SIDECAR and not (target / file.name).is_file():
                shutil.copyfile(file, target / file.name)
        (target / SIDECAR).unlink(missing_ok=True)
    return bare


@torch.no_grad()
def generate(model, tokenizer, instructions: list[str], *, max_new_tokens: int = 20, batch_size: int = 16,
             before_batch=None, after_batch=None, progress: str | None = None) -> list[str]:
    """Greedy answers to chat-formatted instructions, in left-padded batches.

    before_batch(instructions) runs before each batch (e.g. `set_prompts`); after_batch(inputs, output
    ids) after it (e.g. to read the routing trace)."""
    tokenizer.padding_side = "left"
    answers = []
    starts = range(0, len(instructions), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        chunk = instructions[start:start + batch_size]
        if before_batch is not None:
            before_batch(chunk)
        inputs = tokenizer([chat_prompt(tokenizer, i) for i in chunk], return_tensors="pt", padding=True,
                           add_special_tokens=False)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new = output[:, inputs.input_ids.shape[1]:]
        if after_batch is not None:
            after_batch(inputs, new)
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def answer_example(tokenizer, instruction: str, answer: str) -> dict[str, torch.Tensor]:
    """A teacher-forced example: the chat-formatted instruction, then the answer and the end of turn; labels
    -100 on the prompt (loss on the answer only). Pad a list with `composer.training.pad_examples`."""
    prompt = tokenizer(chat_prompt(tokenizer, instruction), add_special_tokens=False).input_ids
    target = tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
    return {"input_ids": torch.tensor(prompt + target), "labels": torch.tensor([-100] * len(prompt) + target)}


def score_task(model, tokenizer, task: str, n: int, *, split: str = "test", max_new_tokens: int = 20,
               batch_size: int = 20, before_batch=None, after_batch=None, pairs=None) -> tuple[float, float]:
    """(exact match, string similarity) of greedy answers to the first n prompts of a task's split, or to
    the given (instruction, answer) pairs of that task (e.g. adaptermix.paraphrase's)."""
    pairs = TASKS[task].examples(split, n) if pairs is None else pairs
    answers = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, before_batch=before_batch, after_batch=after_batch)
    exact = sum(TASKS[task].score(a, y) for a, (_, y) in zip(answers, pairs)) / len(pairs)
    similar = sum(TASKS[task].similarity(a, y) for a, (_, y) in zip(answers, pairs)) / len(pairs)
    return exact, similar


def compose_adapter(adapter, library):
    """The base model with one adapter that is not in `library` (generated, fused): held in a scratch library
    of the same base model, composed at weight 1."""
    from adaptermix.composer import compose
    from adaptermix.models import load_smollm2
    from adaptermix.routers import FixedRouter

    scratch = AdapterLibrary.create(Path(tempfile.mkdtemp(prefix="am-scratch-")) / "lib",
                                    base_model=library.base_model, encoder=library.encoder)
    scratch.add(adapter)
    return compose(load_smollm2()[0].eval(), scratch, FixedRouter({adapter.name: 1.0}), adapters=[adapter.name])
