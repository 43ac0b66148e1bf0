"""The multi_skill prompt set: answers right by construction (recomputed here from the prompt's own content
by each skill's rule), disjoint deterministic splits, several phrasings, nothing in the library's template."""

import re

import pytest

from adaptermix.multi_skill import COMPOSITES, MULTI_SKILL, Composite
from adaptermix.tasks import SUITE, TASKS, WORDS


def _listed_words(prompt: str) -> list[str]:
    """The longest run of consecutive words of the task vocabulary: the list the prompt is about."""
    runs, run = [], []
    for token in re.findall(r"[a-z]+", prompt):
        run = run + [token] if token in WORDS else []
        runs.append(run)
    return max(runs, key=len)


def _solve(name: str, prompt: str) -> str:
    """The composite's answer recomputed from the instruction alone, by the two skills' rules."""
    if name == "last_word_upper":
        return _listed_words(prompt)[-1].upper()
    if name == "acronym_repeat2":
        letters = "".join(w[0] for w in _listed_words(prompt)).upper()
        return f"{letters} {letters}"
    if name == "email_upper":
        return re.search(r"[a-z]+\.[a-z]+@[a-z]+\.[a-z]+", prompt).group(0).upper()
    listed = re.search(r"\d+(?:, \d+)+", prompt)
    if name == "max_repeat2":
        top = max(int(v) for v in listed.group(0).split(", "))
        return f"{top} {top}"
    if name == "max_add":
        extra = re.findall(r"\d+", prompt.replace(listed.group(0), ""))
        assert len(extra) == 1
        return str(max(int(v) for v in listed.group(0).split(", ")) + int(extra[0]))
    if name == "price_add":
        price = re.search(r"(?:for|was) \$(\d+)", prompt).group(1)
        extra = re.findall(r"\d+", prompt.replace(f"${price}", ""))
        assert len(extra) == 1
        return str(int(price) + int(extra[0]))
    raise AssertionError(name)


@pytest.mark.parametrize("name", MULTI_SKILL)
def test_answers_are_the_two_skills_applied_in_order(name):
    for split in ("train", "test"):
        for prompt, answer in COMPOSITES[name].examples(split, 24):
            assert _solve(name, prompt) == answer, prompt


@pytest.mark.parametrize("name", MULTI_SKILL)
def test_splits_are_deterministic_disjoint_and_phrased_several_ways(name):
    composite = COMPOSITES[name]
    test, train = composite.examples("test", 24), composite.examples("train", 24)
    assert test == composite.examples("test", 24) and test[:6] == composite.examples("test", 6)
    assert not {p for p, _ in test} & {p for p, _ in train}
    assert len(composite.test_phrasings) >= 6 and len(composite.train_phrasings) >= 3
    assert not set(composite.test_phrasings) & set(composite.train_phrasings)
    for pairs, phrasings in ((test, composite.test_phrasings), (train, composite.train_phrasings)):
        assert len({p for p, _ in pairs}) == 24
        assert all(any(f.split("{")[0] in p for p, _ in pairs) for f in phrasings)     # every phrasing asked
    assert set(composite.skills) <= set(SUITE) and composite.skills[0] != composite.skills[1]
    with pytest.raises(ValueError, match="split must be"):
        composite.examples("validation", 2)


@pytest.mark.parametrize("name", MULTI_SKILL)
def test_no_prompt_uses_the_library_template_or_text(name):
    heads = set()
    for task in SUITE:
        heads |= {p.split(":")[0] if ":" in p else " ".join(p.split()[:3]) for p, _ in TASKS[task].examples("test", 30)}
        heads |= {e.split(":")[0] for e in TASKS[task].example_prompts} | {TASKS[task].description}
    for split in ("train", "test"):
        for prompt, _ in COMPOSITES[name].examples(split, 24):
            assert not any(head in prompt for head in heads), prompt


def test_a_composite_of_unknown_skills_is_refused():
    with pytest.raises(ValueError, match="not library tasks"):
        Composite("bad", ("uppercase", "date_dotted"), lambda rng: ({}, ""), ("{x}",), ("{x}",))
