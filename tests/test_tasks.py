"""The example task suite: deterministic, disjoint splits; scoring; the committed example adapters."""

import json
from pathlib import Path

import pytest

from adaptermix.library.peft_format import load_peft_adapter
from adaptermix.tasks import BASE_SIGNAL, SUITE, TASKS, UNSEEN, normalise

ADAPTERS = Path(__file__).resolve().parents[1] / "examples" / "suite_adapters"


def test_suite_shape_and_families():
    assert len(SUITE) >= 12 and len(UNSEEN) >= 3 and not set(SUITE) & set(UNSEEN)
    families = {}
    for name in SUITE + UNSEEN:
        families.setdefault(TASKS[name].family, []).append(name)
    assert sum(len(v) >= 2 for v in families.values()) >= 3          # parametric families: near neighbours
    assert set(BASE_SIGNAL) < set(UNSEEN)
    for name in set(UNSEEN) - set(BASE_SIGNAL):                        # each unseen task has a library neighbour
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
    for prompt, answer in TASKS["person_age"].examples("test", 20) + TASKS["age_statement"].examples("test", 20):
        name = prompt.split("How old is ", 1)[1].split("?")[0]
        age = next(word for word in prompt.replace(",", " ").split() if word.isdigit())
        assert answer in (age, f"{name} is {age} years old") and prompt.count(name) >= 2
    for prompt, answer in TASKS["kebab_case"].examples("test", 10):
        assert answer == "-".join(prompt.split(": ", 1)[1].lower().split())


def test_scoring_normalises_whitespace_first_line_and_full_stop():
    assert normalise("  15/04/2023.\nmore text") == "15/04/2023"
    assert TASKS["add"].score(" 81\n", "81") == 1.0 and TASKS["add"].score("81 apples", "81") == 0.0
    with pytest.raises(ValueError, match="split must be"):
        TASKS["add"].examples("dev", 3)


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


def test_validation_split_is_disjoint_from_train_and_test():
    from adaptermix.tasks import TRAIN_POOL

    for name in SUITE + UNSEEN:
        task = TASKS[name]
        validation = {p for p, _ in task.examples("validation", 16)}
        assert len(validation) == 16
        assert not validation & {p for p, _ in task.examples("train", TRAIN_POOL)}
        assert not validation & {p for p, _ in task.examples("test", 60)}
    with pytest.raises(ValueError, match="train split holds"):
        TASKS["add"].examples("train", TRAIN_POOL + 1)


@pytest.mark.parametrize("name", SUITE + UNSEEN)
def test_paraphrases_keep_the_answers_and_share_no_template_with_the_library(name):
    from adaptermix.paraphrase import TEST_PHRASINGS, TRAIN_PHRASINGS, paraphrased

    assert len(set(TEST_PHRASINGS[name])) >= 6 and not set(TEST_PHRASINGS[name]) & set(TRAIN_PHRASINGS[name])
    task = TASKS[name]
    # the template's fixed words before the content, e.g. "Convert to upper case:", "Rewrite the date"
    heads = {p.split(":")[0] if ":" in p else " ".join(p.split()[:3]) for p, _ in task.examples("test", 30)}
    heads |= {e.split(":")[0] for e in task.example_prompts} | {task.description}
    for split in ("train", "test"):
        pairs = paraphrased(name, split, 24)
        assert [a for _, a in pairs] == [a for _, a in task.examples(split, 24)]
        phrasings = TEST_PHRASINGS[name] if split == "test" else TRAIN_PHRASINGS[name]
        assert len({p for p, _ in pairs}) >= 22           # a repeated word may come back in one phrasing
        for prompt, _ in pairs:
            assert not any(prompt.startswith(head) for head in heads), prompt
        assert all(any(f.split("{")[0] in p for p, _ in pairs) for f in phrasings)   # every phrasing asked
