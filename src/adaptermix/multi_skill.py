"""Prompts that need two skills of the example library in sequence (the `multi_skill` condition of
benchmarks/evaluate_routing.py): take the last word, then write it in capitals; find the largest number,
then say it twice; ... Each composite's answer is computed from its slots by the two skills' own rules, so it
is right by construction and scored by exact match (adaptermix.tasks.normalise).

No single adapter of the library was trained on these: the first skill's adapter answers the first step,
the second's the second, and a method earns its place only if it does both (a fused pair, a router that
mixes per token, or one that picks per prompt).

    pairs = COMPOSITES["max_repeat2"].examples("test", 10)    # [(instruction, answer)], phrasing i % 6
    COMPOSITES["max_repeat2"].skills                          # ('max_number', 'repeat_2'): library tasks

Splits: each composite's slot draws go to 'test' by their hash (one in four) and to 'train' otherwise, so
the two never share content; the test split is asked in TEST phrasings (>= 6 per composite), the train split
in 3 others. Nothing is phrased like the library's descriptions or example prompts (tested).
Written before any router ran on them; the test split is never tuned on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from adaptermix.tasks import DOMAINS, NAMES, SUITE, WORDS

__all__ = ["Composite", "COMPOSITES", "MULTI_SKILL"]


@dataclass(frozen=True)
class Composite:
    """A two-step request: `skills` are library tasks applied in order; `make` draws the slots and the
    answer; the phrasings hold the slots as {placeholders}."""
    name: str
    skills: tuple[str, str]
    make: Callable[[random.Random], tuple[dict[str, str], str]]     # rng -> (slots, answer)
    test_phrasings: tuple[str, ...]
    train_phrasings: tuple[str, ...]

    def __post_init__(self):
        unknown = [s for s in self.skills if s not in SUITE]
        if unknown:
            raise ValueError(f"composite {self.name!r}: skills {unknown} are not library tasks")

    def examples(self, split: str, n: int) -> list[tuple[str, str]]:
        """The first n (instruction, answer) pairs of a split ('train' | 'test'), prompt i asked in the
        split's phrasing i mod the number of phrasings."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        phrasings = self.test_phrasings if split == "test" else self.train_phrasings
        rng = random.Random(int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16))
        seen, out = set(), []
        for _ in range(200 * n + 2000):
            slots, answer = self.make(rng)
            key = repr(sorted(slots.items()))
            if key in seen:
                continue
            seen.add(key)
            in_test = int(hashlib.sha256(key.encode()).hexdigest()[:4], 16) % 4 == 0
            if in_test == (split == "test"):
                out.append((phrasings[len(out) % len(phrasings)].format(**slots), answer))
                if len(out) == n:
                    return out
        raise ValueError(f"composite {self.name!r} cannot produce {n} distinct {split} examples")


# -- slots and answers: the second skill applied to the first skill's answer --------------------------------

def _words(rng, lo, hi):
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _numbers(rng):
    return rng.sample(range(1, 100), rng.randint(3, 5))


def last_word_upper(rng):
    words = _words(rng, 3, 5)
    return {"text": " ".join(words)}, words[-1].upper()


def max_repeat2(rng):
    numbers = _numbers(rng)
    return {"text": ", ".join(map(str, numbers))}, f"{max(numbers)} {max(numbers)}"


def email_upper(rng):
    name, other = rng.sample(NAMES, 2)
    address = f"{name}.{rng.choice(WORDS)}@{rng.choice(DOMAINS)}"
    text = rng.choice([f"You can reach {other.title()} at {address} after lunch.",
                       f"The {rng.choice(WORDS)} club lists {address} as its contact."])
    return {"text": text}, address.upper()


def acronym_repeat2(rng):
    words = _words(rng, 3, 4)
    letters = "".join(w[0] for w in words).upper()
    return {"text": " ".join(words)}, f"{letters} {letters}"


def price_add(rng):
    price, extra, thing = rng.randint(2, 99), rng.randint(10, 99), rng.choice(WORDS)
    text = rng.choice([f"A {thing} sells for ${price} downtown.", f"Yesterday the {thing} was ${price}."])
    return {"text": text, "extra": str(extra)}, str(price + extra)


def max_add(rng):
    numbers, extra = _numbers(rng), rng.randint(10, 99)
    return {"text": ", ".join(map(str, numbers)), "extra": str(extra)}, str(max(numbers) + extra)


_COMPOSITES = [
    Composite("last_word_upper", ("last_word", "uppercase"), last_word_upper,
              ("Take the final word of '{text}' and write it in capital letters.",
               "{text} -- which word comes last? Give it in all caps.",
               "Find the closing word of this list and write it in block letters: {text}",
               "Here are some words: {text}. Return the last one, every letter capitalised.",
               "Which word sits at the end of {text}? Write it in uppercase.",
               "Give the ending entry of the list {text} in capitals only."),
              ("Last word of {text}, in caps.", "Uppercase the final word: {text}",
               "{text}: the ending word in capitals?")),
    Composite("max_repeat2", ("max_number", "repeat_2"), max_repeat2,
              ("Find the biggest of {text} and write it two times, separated by a space.",
               "{text} -- take the maximum and say it twice.",
               "Among {text}, which value is highest? Give it two times in a row.",
               "Out of {text}, write the greatest number twice with a space between.",
               "Pick the top value of {text} and echo it two times.",
               "Give me the max of the following values, repeated twice. {text}"),
              ("Largest of {text}, said twice.", "Twice the top number: {text}",
               "{text}: maximum, two times over.")),
    Composite("email_upper", ("extract_email", "uppercase"), email_upper,
              ("{text} Write the e-mail address from there in capital letters.",
               "Find the mail address in this sentence and give it in all caps: {text}",
               "Pull out the e-mail contact from the following text, uppercase. {text}",
               "Here is a message: \"{text}\" Give only the email in it, in block letters.",
               "Copy the email address out of this, every letter capitalised: {text}",
               "Which e-mail is mentioned here? Answer in capitals. {text}"),
              ("Email in caps from: {text}", "{text} The address, uppercased?",
               "Uppercase the e-mail of '{text}'")),
    Composite("acronym_repeat2", ("acronym", "repeat_2"), acronym_repeat2,
              ("What are the initials of '{text}'? Write them twice, separated by a space.",
               "{text} -- abbreviate this with its first letters and say the abbreviation two times.",
               "Form an abbreviation from the first letter of each word in {text}, then repeat it once more.",
               "Take the first letter of every word of {text} as capitals, and give that two times.",
               "Give me the short form of {text} from its initial letters, written twice.",
               "Which acronym stands for {text}? Say it two times in a row."),
              ("Initialism of {text}, twice.", "Abbreviate '{text}' to initials and double it.",
               "{text}: first letters in caps, two times.")),
    Composite("price_add", ("extract_price", "add"), price_add,
              ("{text} If it cost {extra} dollars more, what would the price be? Give just the number.",
               "How many dollars would it be with {extra} added? {text}",
               "Read this and add {extra} to the cost, answering with a number: {text}",
               "Here is a sentence: \"{text}\" Raise the price by {extra} dollars; what is it now?",
               "Take the dollar amount in the following and increase it by {extra}. {text}",
               "{text} The price goes up by ${extra}. How many dollars does it cost now?"),
              ("{text} Price plus {extra}?", "Add {extra} to the dollars in: {text}",
               "Cost after a {extra} dollar rise: {text}")),
    Composite("max_add", ("max_number", "add"), max_add,
              ("Find the biggest of {text} and add {extra} to it.",
               "{text} -- take the maximum and increase it by {extra}.",
               "What do you get when {extra} is added to the highest value among {text}?",
               "Out of {text}, pick the greatest number, then give it plus {extra}.",
               "Compute {extra} more than the largest value in the list {text}.",
               "Give me the max of the following values with {extra} added, as a number. {text}"),
              ("Largest of {text}, plus {extra}.", "Top number of {text} increased by {extra}?",
               "{extra} added to the maximum of: {text}")),
]
COMPOSITES = {c.name: c for c in _COMPOSITES}
MULTI_SKILL = tuple(COMPOSITES)
