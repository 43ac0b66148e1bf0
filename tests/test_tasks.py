"""The example task suite: deterministic, disjoint splits; scoring; the committed example adapters."""

import json
from pathlib import Path

import pytest

from adaptermix.library.peft_format import load_peft_adapter
from adaptermix.tasks import SUITE, TASKS, UNSEEN, normalise

ADAPTERS = Path(__file__).resolve().parents[1] / "examples" / "suite_adapters"


def test_suite_shape_and_families():
    assert len(SUITE) >= 12 and len(UNSEEN) >= 3 and not set(SUITE) & set(UNSEEN)
    families = {}
    for name in SUITE + UNSEEN:
        families.setdefault(TASKS[name].family, []).append(name)
    assert sum(len(v) >= 2 for v in families.values()) >= 3          # parametric families: near neighbours
    for name in UNSEEN:                                                # each unseen task has a library neighbour
        assert any(TASKS[other].family == TASKS[name].family for other in SUITE)


@pytest.mark.parametrize("name", SUITE + UNSEEN)
def test_splits_are_deterministic_disjoint_and_answers_right(name):
    task = TASKS[name]
    train, test = task.examples("train", 200), task.examples("test", 30)
    assert train == task.examples("train", 200) and test[:10] == task.examples("test", 10)
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert len({p for p, _ in train}) == 200
    assert all(task.score(answer, answer) == 1.0 for _, answer in test)


def test_answers_follow_the_instructions():
    formats = {"date_dmy": "{d}/{m}/{y}", "date_mdy": "{m}/{d}/{y}", "date_dotted": "{d}.{m}.{y}"}
    for name, pattern in formats.items():
        for prompt, answer in TASKS[name].examples("test", 20):
            y, m, d = prompt.split("date ")[1][:10].split("-")
            assert answer == pattern.format(y=y, m=m, d=d)
    for prompt, answer in TASKS["add"].examples("test", 20):
        x, y = prompt.removeprefix("What is ").removesuffix("?").split(" plus ")
        assert int(answer) == int(x) + int(y)
    for prompt, answer in TASKS["repeat_3"].examples("test", 10):
        words = answer.split()
        assert len(words) == 3 and len(set(words)) == 1 and words[0] in prompt
    for prompt, answer in TASKS["kebab_case"].examples("test", 10):
        assert answer == "-".join(prompt.split(": ", 1)[1].lower().split())


def test_scoring_normalises_whitespace_first_line_and_full_stop():
    assert normalise("  15/04/2023.\nmore text") == "15/04/2023"
    assert TASKS["add"].score(" 81\n", "81") == 1.0 and TASKS["add"].score("81 apples", "81") == 0.0
    with pytest.raises(ValueError, match="split must be"):
        TASKS["add"].examples("validation", 3)


def test_committed_example_adapters_load_and_record_their_seeds():
    manifest = json.loads((ADAPTERS / "manifest.json").read_text())
    seeds = [manifest["adapters"][name]["seed"] for name in SUITE]
    assert len(set(seeds)) == len(SUITE)                               # each adapter from its own seed
    total = 0
    for name in SUITE:
        adapter = load_peft_adapter(ADAPTERS / name)
        assert adapter.description == TASKS[name].description and adapter.examples
        total += sum(f.stat().st_size for f in (ADAPTERS / name).iterdir())
    assert total <= 20 * 2 ** 20                                       # the committed library stays small
