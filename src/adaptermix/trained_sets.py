"""Adapter sets that are trained on demand and cached, not committed: the example suite from one shared seed
and the large library (the `large` routing condition). `benchmarks/train_suite.py preset=NAME` (or
`make shared-seed-adapters` / `make large-adapters`) trains what is missing into the cache folder and records
each adapter in its manifest.json; a set is complete when every adapter is recorded with the preset's
settings and its checkpoint is on disk.

    folder = require("large")               # the cached folder, or a clear error naming the make target
    task_of("date_dmy_seed2")               # 'date_dmy': a second seed of a task routes like the task
    LARGE_STAGES                            # (12, 24, 40): the library sizes the evaluation grows through

The committed example library (examples/suite_adapters, 12 adapters) stays the first 12 of the large one; the
large set's folder holds the other 28 (22 more tasks, a second seed of 6).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from adaptermix.library.errors import AdaptermixError
from adaptermix.tasks import LARGE, SUITE, TASKS

__all__ = ["TrainedSet", "SETS", "LARGE_ADAPTERS", "LARGE_STAGES", "SECOND_SEED", "cache_dir", "task_of",
           "complete", "require", "SetMissingError"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "suite_adapters"
# Growth order of the large library: the first 12 extra tasks include a neighbour of each suite family, the
# rest crowd them further; then a second seed of six suite tasks.
GROWTH = ("subtract", "min_number", "first_word", "title_case", "camel_case", "date_ymd_slash", "date_year",
          "repeat_5", "extract_phone", "count_letters", "multiply", "reverse_words",
          "double", "sort_numbers", "sum_list", "second_word", "spell_hyphens", "pascal_case", "date_month_name",
          "repeat_6", "extract_url", "extract_time")
SECOND_SEED = ("date_dmy", "date_mdy", "repeat_3", "snake_case", "add", "extract_email")
LARGE_ADAPTERS = GROWTH + tuple(f"{name}_seed2" for name in SECOND_SEED)     # in the large set's folder
LARGE_STAGES = (12, 24, len(SUITE) + len(LARGE_ADAPTERS))                    # library sizes evaluated


class SetMissingError(AdaptermixError, FileNotFoundError):
    """A trained-on-demand adapter set is absent or incomplete in the cache."""


@dataclass(frozen=True)
class TrainedSet:
    name: str                      # the preset: train_suite.py preset=NAME, make NAME-adapters
    folder: str                    # under the cache folder
    adapters: tuple[str, ...]      # adapter (folder) names: a task, or TASK_seedK for the K-th seed of a task
    seeds: str = "own"             # 'own': one seed per adapter; 'shared': one seed for all
    make_target: str = ""
    settings: dict = field(default_factory=dict)   # overrides of train_suite.SETTINGS (recorded in the manifest)


SETS = {
    "shared_seed": TrainedSet("shared_seed", "suite_adapters_shared_seed", SUITE, seeds="shared",
                              make_target="shared-seed-adapters"),
    # 30 steps of 4 examples at a higher rate instead of 100 of 8 for the 28 extra adapters: about 2 min each
    # on a machine shared by four jobs (the routing evaluation measures what they learnt: the oracle's row)
    "large": TrainedSet("large", "large_adapters", LARGE_ADAPTERS, make_target="large-adapters",
                        settings={"steps": 30, "batch_size": 4, "lr": 5e-3, "warmup": 5}),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTERMIX_CACHE", Path.home() / ".cache" / "adaptermix"))


def task_of(adapter: str) -> str:
    """The task an adapter was trained on: its name without a `_seedK` suffix."""
    task = re.sub(r"_seed\d+$", "", adapter)
    if task not in TASKS:
        raise KeyError(f"adapter {adapter!r} names no task of adaptermix.tasks")
    return task


def seed_index(adapter: str) -> int:
    """0 for a task's first seed, K - 1 for TASK_seedK."""
    found = re.search(r"_seed(\d+)$", adapter)
    return int(found.group(1)) - 1 if found else 0


def complete(trained: TrainedSet, folder: Path | None = None) -> list[str]:
    """The adapters of a set missing from its folder (not recorded in manifest.json with the set's settings,
    or without a checkpoint); [] when the set is complete."""
    folder = Path(folder or cache_dir() / trained.folder)
    path = folder / "manifest.json"
    recorded = json.loads(path.read_text()).get("adapters", {}) if path.is_file() else {}
    missing = []
    for name in trained.adapters:
        record = recorded.get(name)
        same = record is not None and all(record.get("settings", {}).get(k) == v for k, v in trained.settings.items())
        if not same or not (folder / name / "adapter_model.safetensors").is_file():
            missing.append(name)
    return missing


def require(name: str, first: int | None = None) -> Path:
    """The cached folder of a complete set (or of its first `first` adapters); SetMissingError naming the make
    target otherwise."""
    trained = SETS[name]
    folder = cache_dir() / trained.folder
    missing = [a for a in complete(trained, folder) if first is None or trained.adapters.index(a) < first]
    if missing:
        raise SetMissingError(f"{len(missing)} adapter(s) of the {name!r} set are not trained in {folder} "
                              f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
                              f"run `make {trained.make_target}` (python benchmarks/train_suite.py preset={name})")
    return folder
