"""Train the example library: one PEFT LoRA per task of `adaptermix.tasks.SUITE` on SmolLM2-135M-Instruct.

Each adapter starts from its own seed (recorded), trains on CPU on the task's train split (loss on the
answer tokens only), is checked by greedy exact match on its validation split (prompts neither trained on nor
reported by the evaluation, which reads the test split), and is saved as a PEFT
checkpoint in float16 with an `adaptermix.json` sidecar (description, example prompts, tags). The
committed adapters in examples/suite_adapters/ were made by this script; rerun it to reproduce them:

    python benchmarks/train_suite.py                           # every task (about 2 min each on 2 cores)
    python benchmarks/train_suite.py tasks=date_dmy,add out=/tmp/adapters
    python benchmarks/train_suite.py preset=shared_seed      # make shared-seed-adapters: one seed for all
    python benchmarks/train_suite.py preset=large            # make large-adapters: the 28 extra adapters

`seeds=shared` starts every adapter from the same seed (what a fixed-seed training script does: the LoRA A
matrices start equal), the hard case for weight-based routing (docs/ROUTING.md).

A preset (adaptermix.trained_sets.SETS) is a set trained on demand into the cache folder
(~/.cache/adaptermix/<set>, ADAPTERMIX_CACHE), not committed: the adapters already recorded in its
manifest.json with the preset's settings are kept, only the missing ones are trained (one torch thread,
what is fastest on a shared machine). An adapter named TASK_seedK is the task trained from its K-th seed.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from adaptermix.composer.training import pad_examples  # noqa: E402
from adaptermix.library.owned import check_replaceable, is_owned, make_owned, remove_owned  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.suite import answer_example, generate  # noqa: E402
from adaptermix.tasks import LIBRARY_TASKS, SUITE, TASKS, TRAIN_POOL  # noqa: E402
from adaptermix.trained_sets import SETS, cache_dir, complete, seed_index, task_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                steps=100, batch_size=8, lr=3e-3, warmup=10, train_examples=TRAIN_POOL, check_examples=16,
                base_seed=1000)
OWNED = "trained adapter"   # the marker (library/owned.py) on each folder this script writes; no other is replaced


def answer_loss(causal_lm, batch):
    """Cross-entropy of the answer tokens; logits only where needed (the vocabulary is 49k wide)."""
    ids = batch["input_ids"]
    hidden = causal_lm.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state  # (b, L, d)
    predict = batch["labels"][:, 1:] != -100                                             # token i from i-1
    logits = causal_lm.lm_head(hidden[:, :-1][predict])
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][predict])


def train_one(base, tokenizer, adapter: str, seed: int, out: Path, settings: dict) -> dict:
    task_name = task_of(adapter)
    task = TASKS[task_name]
    torch.manual_seed(seed)                          # the LoRA A init comes from this adapter's own seed
    config = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=0.0,
                        target_modules=settings["target_modules"])
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / settings["warmup"]) * max(0.05, 1 - step / settings["steps"]))
    train = [answer_example(tokenizer, *pair) for pair in task.examples("train", settings["train_examples"])]
    rng = random.Random(seed)
    causal_lm = model.base_model.model
    start = time.perf_counter()
    losses = []
    for _ in tqdm(range(settings["steps"]), desc=f"train {adapter}", leave=False):
        loss = answer_loss(causal_lm, pad_examples(rng.sample(train, settings["batch_size"]), tokenizer.pad_token_id))
        loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    model.eval()
    check = task.examples("validation", settings["check_examples"])     # not the test split the evaluation reports
    generated = generate(model, tokenizer, [p for p, _ in check], max_new_tokens=16, batch_size=16)
    accuracy = sum(task.score(g, a) for g, (_, a) in zip(generated, check)) / len(check)
    staging = out.with_name(out.name + ".partial")
    remove_owned(staging, OWNED)                             # a killed run's leftover, if it is ours
    make_owned(staging, OWNED)
    lora_state = {k: v.detach().half() for k, v in model.state_dict().items() if "lora_" in k}
    model.save_pretrained(staging, state_dict=lora_state)   # float16 on disk: the committed library stays small
    (staging / "README.md").unlink(missing_ok=True)          # PEFT's model-card template
    (staging / "adaptermix.json").write_text(json.dumps({
        "description": task.description, "examples": list(task.example_prompts), "tags": [task.family]}, indent=2))
    remove_owned(out, OWNED)                                 # FolderNotOwnedError for a folder not ours
    staging.rename(out)
    model.unload()
    return dict(task=task_name, seed=seed, settings=dict(settings), train_seconds=round(seconds, 1),
                loss_first10=round(sum(losses[:10]) / 10, 4), loss_last10=round(sum(losses[-10:]) / 10, 4),
                check_split="validation", check_exact_match=accuracy)


PURPOSE = "trained adapter set"   # the cache folder's ownership marker (adaptermix.library.owned)


def seed_of(adapter: str, seeds: str) -> int:
    """An adapter's own seed: one per task (the suite's unchanged), + 1000 per further seed; or one shared."""
    if seeds == "shared":
        return SETTINGS["base_seed"]
    return SETTINGS["base_seed"] + LIBRARY_TASKS.index(task_of(adapter)) + 1000 * seed_index(adapter)


def preset_run(preset: str) -> tuple[list[str], Path, str, dict]:
    """(adapters still to train, cache folder, seeds, settings) of a trained-on-demand set."""
    if preset not in SETS:
        raise ValueError(f"preset must be one of {sorted(SETS)}, got {preset!r}")
    trained = SETS[preset]
    folder = cache_dir() / trained.folder
    if not folder.exists():
        make_owned(folder, PURPOSE)
    elif not is_owned(folder, PURPOSE):
        raise ValueError(f"{folder} exists and was not made by train_suite.py; move it away or set ADAPTERMIX_CACHE")
    torch.set_num_threads(1)
    return complete(trained, folder), folder, trained.seeds, dict(SETTINGS, **trained.settings)


def main(tasks: str = ",".join(SUITE), out: str = str(ROOT / "examples" / "suite_adapters"),
         steps: str = "", seeds: str = "own", preset: str = ""):
    if seeds not in ("own", "shared"):
        raise ValueError(f"seeds must be 'own' (one seed per adapter) or 'shared', got {seeds!r}")
    settings = dict(SETTINGS)
    if preset:
        names, out_dir, seeds, settings = preset_run(preset)
        if not names:
            print(f"{out_dir}: every adapter of the {preset!r} set is trained (manifest.json)")
            return
    else:
        names, out_dir = tasks.split(","), Path(out)
        torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in names:
        task_of(name)                                    # an unknown task fails before any training
    if steps:
        settings["steps"] = int(steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks.split(","):                     # refuse a folder not ours before any training
        check_replaceable(out_dir / name, OWNED)
        check_replaceable(out_dir / f"{name}.partial", OWNED)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"adapters": {}}
    base, tokenizer = load_smollm2()
    for p in base.parameters():
        p.requires_grad_(False)
    for name in tqdm(names, desc="adapters"):
        record = train_one(base, tokenizer, name, seed_of(name, seeds), out_dir / name, settings)
        print(json.dumps(record), flush=True)
        manifest["adapters"][name] = record
        manifest.update(settings=settings, seeds=seeds, machine=machine(), base_model="SmolLM2-135M-Instruct")
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main(**dict(a.split("=", 1) for a in sys.argv[1:]))
