"""The large library's extra tasks (adaptermix.tasks.LARGE) and the adapter sets trained on demand into the
cache (adaptermix.trained_sets): splits, answers that follow the instructions, near neighbours, the unseen
tasks kept out, and a set that is missing or partial named with the make target that trains it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adaptermix.tasks import LARGE, LIBRARY_TASKS, SUITE, TASKS, TRAIN_POOL, UNSEEN, WORDS
from adaptermix.trained_sets import (LARGE_ADAPTERS, LARGE_STAGES, SETS, SetMissingError, complete, require,
                                     seed_index, task_of)

ROOT = Path(__file__).resolve().parents[1]


def test_large_library_is_forty_adapters_with_neighbours_and_no_unseen_task():
    assert LIBRARY_TASKS == SUITE + LARGE and len(set(LIBRARY_TASKS)) == len(LIBRARY_TASKS)
    assert not {task_of(a) for a in LARGE_ADAPTERS} & set(UNSEEN)
    assert sorted(task_of(a) for a in LARGE_ADAPTERS if seed_index(a) == 0) == sorted(LARGE)
    assert LARGE_STAGES[-1] == len(SUITE) + len(LARGE_ADAPTERS) >= 40
    families = {}
    for name in LIBRARY_TASKS:
        families.setdefault(TASKS[name].family, []).append(name)
    assert all(len(families[TASKS[name].family]) >= 3 for name in LARGE)    # each extra task is crowded
    # every stage but the first adds a neighbour of the suite's families
    second = {TASKS[task_of(a)].family for a in LARGE_ADAPTERS[:LARGE_STAGES[1] - len(SUITE)]}
    assert {TASKS[name].family for name in SUITE} <= second


@pytest.mark.parametrize("name", LARGE)
def test_large_tasks_have_disjoint_deterministic_splits(name):
    task = TASKS[name]
    train, validation, test = (task.examples("train", TRAIN_POOL), task.examples("validation", 16),
                               task.examples("test", 30))
    assert train == task.examples("train", TRAIN_POOL) and test[:10] == task.examples("test", 10)
    prompts = [{p for p, _ in split} for split in (train, validation, test)]
    assert [len(p) for p in prompts] == [TRAIN_POOL, 16, 30]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert task.description and task.example_prompts
    assert all(task.score(answer, answer) == 1.0 for _, answer in test)
    assert task.score(test[0][1] + "x", test[0][1]) == 0.0


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_large_answers_follow_the_instructions():
    checks = {
        "subtract": lambda p, a: int(a) == numbers(p)[0] - numbers(p)[1] >= 0,
        "multiply": lambda p, a: int(a) == numbers(p)[0] * numbers(p)[1],
        "double": lambda p, a: int(a) == 2 * numbers(p)[0],
        "min_number": lambda p, a: int(a) == min(numbers(p)),
        "sort_numbers": lambda p, a: numbers(a) == sorted(numbers(p)),
        "sum_list": lambda p, a: int(a) == sum(numbers(p)),
        "first_word": lambda p, a: a == p.split(": ")[1].split()[0],
        "second_word": lambda p, a: a == p.split(": ")[1].split()[1],
        "reverse_words": lambda p, a: a.split() == p.split(": ")[1].split()[::-1],
        "count_letters": lambda p, a: int(a) == len([w for w in p.rstrip("?").split() if w in WORDS][-1]),
        "spell_hyphens": lambda p, a: a.replace("-", "") in p and len(a) == 2 * len(a.replace("-", "")) - 1,
        "title_case": lambda p, a: a == p.split(": ")[1].title(),
        "camel_case": lambda p, a: a[0].islower() and a.lower() == "".join(p.split(": ")[1].split()),
        "pascal_case": lambda p, a: a == "".join(w.title() for w in p.split(": ")[1].split()),
        "date_ymd_slash": lambda p, a: a == p.split("date ")[1][:10].replace("-", "/"),
        "date_year": lambda p, a: a == p.split("date ")[1][:4],
        "date_month_name": lambda p, a: a[:3] in "JanFebMarAprMayJunJulAugSepOctNovDec"[
            3 * (int(p.split("date ")[1][5:7]) - 1):],
        "repeat_5": lambda p, a: len(a.split()) == 5 and len(set(a.split())) == 1 and a.split()[0] in p,
        "repeat_6": lambda p, a: len(a.split()) == 6 and len(set(a.split())) == 1 and a.split()[0] in p,
        "extract_phone": lambda p, a: re.fullmatch(r"\d{3}-\d{3}-\d{4}", a) and a in p,
        "extract_url": lambda p, a: a.startswith("https://www.") and a in p,
        "extract_time": lambda p, a: re.fullmatch(r"\d\d:\d\d", a) and a in p,
    }
    assert set(checks) == set(LARGE)
    for name, check in checks.items():
        for prompt, answer in TASKS[name].examples("test", 20):
            assert check(prompt, answer), (name, prompt, answer)


def test_adapter_names_map_to_their_task_and_seed():
    assert (task_of("date_dmy"), seed_index("date_dmy")) == ("date_dmy", 0)
    assert (task_of("date_dmy_seed2"), seed_index("date_dmy_seed2")) == ("date_dmy", 1)
    with pytest.raises(KeyError, match="names no task"):
        task_of("no_such_task_seed2")


def test_a_missing_or_partial_set_names_its_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERMIX_CACHE", str(tmp_path))
    with pytest.raises(SetMissingError, match=r"28 adapter\(s\) of the 'large' set.*make large-adapters"):
        require("large")
    folder = tmp_path / SETS["large"].folder
    recorded = {}
    for name in LARGE_ADAPTERS[:3]:                                      # three trained, one with other settings
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_model.safetensors").write_bytes(b"x")
        recorded[name] = {"settings": dict(SETS["large"].settings)}
    recorded[LARGE_ADAPTERS[2]]["settings"]["steps"] += 1
    (folder / "manifest.json").write_text(json.dumps({"adapters": recorded}))
    assert complete(SETS["large"]) == list(LARGE_ADAPTERS[2:])
    with pytest.raises(FileNotFoundError, match="26 adapter"):           # also a FileNotFoundError
        require("large")
    with pytest.raises(SetMissingError, match="make shared-seed-adapters"):
        require("shared_seed")


def test_train_suite_refuses_a_cache_folder_it_did_not_make(tmp_path):
    """A preset writes only into a cache folder train_suite.py created (its ownership marker): a user's folder
    of the same name is left alone, before any model is loaded."""
    folder = tmp_path / SETS["shared_seed"].folder
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    run = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "train_suite.py"), "preset=shared_seed"],
                         env={"ADAPTERMIX_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "was not made by train_suite.py" in run.stderr
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_no_set_trained_on_demand_is_committed():
    for trained in SETS.values():
        assert not (ROOT / "examples" / trained.folder).exists()
    committed = sum(f.stat().st_size for f in (ROOT / "examples").rglob("*") if f.is_file())
    assert committed <= 20 * 2 ** 20                                     # the size budget
