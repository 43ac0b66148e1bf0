"""The example task suite: short instruction tasks with programmatic generators, fixed seeds and disjoint
train / held-out splits. The example library holds one LoRA per task in `SUITE`; `UNSEEN` tasks stay out of
it (no adapter of their own) and test routing to near neighbours.

Families share a transformation with different parameters, so their adapters are near neighbours:
dates (day-first, month-first; unseen: dotted), repetition (twice, three times; unseen: four times),
identifier case (snake_case; unseen: kebab-case), extraction (e-mail, price; unseen: a person's age).
`BASE_SIGNAL` unseen tasks are ones the base model already answers (exact match above zero) and no adapter
fits: there a router should decline (the base model answers), not route.

    task = TASKS["date_dmy"]
    pairs = task.examples("train", 200)      # [(instruction, answer)], the same for a given split and n
    task.score(generated_text, answer)       # 1.0 on an exact match after trimming, else 0.0
    task.similarity(generated_text, answer)  # partial credit in [0, 1] (difflib ratio)
"""

from __future__ import annotations

import difflib
import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Task", "TASKS", "SUITE", "UNSEEN", "BASE_SIGNAL", "LARGE", "LIBRARY_TASKS", "SPLITS", "TRAIN_POOL",
           "chat_prompt", "normalise"]

WORDS = ("apple river stone cloud garden paper window silver orange forest candle bridge pencil yellow "
         "rocket marble winter summer planet button coffee dragon island jacket ladder mirror noodle "
         "pirate rabbit saddle tomato violin wallet zipper anchor basket castle dinner engine falcon "
         "guitar hammer igloo jungle kettle lemon magnet needle oyster parrot quartz ribbon spider "
         "tunnel umbrella velvet walrus yogurt autumn blanket cactus dolphin eagle feather ginger harbor "
         "insect jigsaw kitten lantern meadow nickel orchid pepper quilt saturn thunder valley whistle "
         "bottle carpet desert finger helmet kingdom lobster monkey number office pillow rocket shadow "
         "ticket tower voyage wizard canyon cherry circle copper crystal farmer fossil glacier honey "
         "lizard meteor muffin nectar oxygen pebble puzzle raven salmon signal sketch spring statue "
         "sugar tiger toast turtle vessel wheel").split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory nina oscar peggy quinn rupert".split()
DOMAINS = ("mail.com example.org work.net school.edu shop.io post.co").split()
MONTHS = range(1, 13)
SPLITS = ("train", "validation", "test")
TRAIN_POOL = 240   # the train split is the first TRAIN_POOL non-test prompts; the rest of them is 'validation'


def normalise(text: str) -> str:
    """What exact match compares: the first line, trimmed, without a trailing full stop."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line


@dataclass(frozen=True)
class Task:
    name: str
    description: str                                   # what the library stores and retrieval embeds
    family: str
    make: Callable[[random.Random], tuple[str, str]]   # rng -> (instruction, answer)
    example_prompts: tuple[str, ...] = field(default=())

    def examples(self, split: str, n: int) -> list[tuple[str, str]]:
        """n distinct (instruction, answer) pairs of one split; the three splits never share an instruction.

        An instruction's hash sends one in five to 'test'; of the others, the first TRAIN_POOL drawn are
        'train' (what the example adapters were trained on) and the rest 'validation' (what train_suite.py
        checks an adapter on: neither trained on nor reported)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "train" and n > TRAIN_POOL:
            raise ValueError(f"the train split holds {TRAIN_POOL} prompts per task, asked for {n}")
        seed = int(hashlib.sha256(f"{self.name}".encode()).hexdigest()[:8], 16)
        rng = random.Random(seed)
        seen: dict[str, str] = {}
        rest: list[tuple[str, str]] = []
        test: list[tuple[str, str]] = []
        # Draw one stream; instructions are assigned to a split by their hash (and, off the test split, by
        # their rank), so the splits are disjoint and each split is a deterministic prefix of its own sequence.
        for _ in range(200 * n + 2000):
            prompt, answer = self.make(rng)
            if prompt in seen:
                continue
            seen[prompt] = answer
            bucket = test if int(hashlib.sha256(prompt.encode()).hexdigest()[:4], 16) % 5 == 0 else rest
            bucket.append((prompt, answer))
            target = test if split == "test" else rest[:TRAIN_POOL] if split == "train" else rest[TRAIN_POOL:]
            if len(target) >= n:
                return target[:n]
        raise ValueError(f"task {self.name!r} cannot produce {n} distinct {split} examples")

    def score(self, generated: str, answer: str) -> float:
        """Exact match after `normalise`."""
        return float(normalise(generated) == normalise(answer))

    def similarity(self, generated: str, answer: str) -> float:
        """Partial credit in [0, 1]: difflib's ratio of the normalised strings (e.g. '23/12/2009' for
        '23.12.2009' scores 0.8), the signal left on unseen formats where exact match is all or nothing."""
        return difflib.SequenceMatcher(None, normalise(generated), normalise(answer)).ratio()


def chat_prompt(tokenizer, instruction: str) -> str:
    """The instruction in the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


# -- generators ---------------------------------------------------------------------------------------

def _words(rng, lo=2, hi=4):
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _date(rng):
    return rng.randint(1990, 2029), rng.choice(MONTHS), rng.randint(1, 28)


def uppercase(rng):
    text = " ".join(_words(rng))
    return f"Convert to upper case: {text}", text.upper()


def acronym(rng):
    words = _words(rng, 3, 4)
    return f"Write the acronym of: {' '.join(words)}", "".join(w[0] for w in words).upper()


def extract_email(rng):
    name, other = rng.sample(NAMES, 2)
    address = f"{name}.{rng.choice(WORDS)}@{rng.choice(DOMAINS)}"
    text = rng.choice([f"Please write to {address} before {rng.choice(WORDS)} time.",
                       f"{other.title()} said the contact is {address} for the {rng.choice(WORDS)}.",
                       f"Send the {rng.choice(WORDS)} report to {address} today."])
    return f"Extract the email address: {text}", address


def extract_price(rng):
    price = rng.randint(2, 999)
    thing = rng.choice(WORDS)
    text = rng.choice([f"The {thing} costs ${price} at the market.",
                       f"I paid ${price} for a {thing} yesterday.",
                       f"A new {thing} is ${price} this week."])
    return f"What is the price in dollars? {text}", str(price)


def date_dmy(rng):
    y, m, d = _date(rng)
    return f"Rewrite the date {y}-{m:02d}-{d:02d} as day/month/year.", f"{d:02d}/{m:02d}/{y}"


def date_mdy(rng):
    y, m, d = _date(rng)
    return f"Rewrite the date {y}-{m:02d}-{d:02d} as month/day/year.", f"{m:02d}/{d:02d}/{y}"


def date_dotted(rng):
    y, m, d = _date(rng)
    return f"Rewrite the date {y}-{m:02d}-{d:02d} as day.month.year with dots.", f"{d:02d}.{m:02d}.{y}"


def add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} plus {b}?", str(a + b)


def last_word(rng):
    words = _words(rng, 3, 6)
    return f"What is the last word of: {' '.join(words)}", words[-1]


def max_number(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"Which number is the largest: {', '.join(map(str, numbers))}?", str(max(numbers))


def repeat(times: int):
    label = {2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times"}[times]

    def make(rng):
        word = rng.choice(WORDS)
        prompt = rng.choice([f"Repeat the word {label}: {word}", f"Say the word {word} {label}.",
                             f"Write {word} {label}, separated by spaces."])
        return prompt, " ".join([word] * times)
    return make


def identifier(separator: str, label: str):
    def make(rng):
        words = _words(rng, 2, 4)
        text = " ".join(w.title() if rng.random() < 0.5 else w for w in words)
        return f"Convert to {label}: {text}", separator.join(w.lower() for w in words)
    return make


def lowercase(rng):
    words = _words(rng)
    text = " ".join(w.upper() if rng.random() < 0.5 else w.title() for w in words)
    return f"Convert to lower case: {text}", " ".join(words)


def _age(rng):
    name, age, place = rng.choice(NAMES).title(), rng.randint(5, 95), rng.choice(WORDS)
    sentence = rng.choice([f"{name} is {age} years old and lives near the {place}.",
                           f"At {age}, {name} still visits the {place}.", f"{name}, aged {age}, bought a {place}."])
    return name, age, sentence


def person_age(rng):
    name, age, sentence = _age(rng)
    return f"How old is {name}? {sentence}", str(age)


def age_statement(rng):
    name, age, place = rng.choice(NAMES).title(), rng.randint(5, 95), rng.choice(WORDS)
    return (f"{name} lives near the {place}. {name} is {age} years old. How old is {name}? Answer in a full sentence.",
            f"{name} is {age} years old")


def count_words(rng):
    words = _words(rng, 2, 9)
    return f"How many words are in: {' '.join(words)}", str(len(words))


_SUITE = [
    Task("uppercase", "Convert text to upper case letters", "case", uppercase,
         ("Convert to upper case: river stone",)),
    Task("acronym", "Write the acronym made of the first letters of the words", "letters", acronym,
         ("Write the acronym of: portable network graphics",)),
    Task("extract_email", "Extract the email address from a sentence", "extraction", extract_email,
         ("Extract the email address: write to bob.kite@mail.com today.",)),
    Task("extract_price", "Find the price in dollars mentioned in a sentence", "extraction", extract_price,
         ("What is the price in dollars? The lamp costs $40.",)),
    Task("date_dmy", "Rewrite an ISO date as day/month/year", "dates", date_dmy,
         ("Rewrite the date 2021-03-09 as day/month/year.",)),
    Task("date_mdy", "Rewrite an ISO date as month/day/year", "dates", date_mdy,
         ("Rewrite the date 2021-03-09 as month/day/year.",)),
    Task("add", "Add two whole numbers and give the sum", "arithmetic", add, ("What is 31 plus 45?",)),
    Task("last_word", "Give the last word of a list of words", "words", last_word,
         ("What is the last word of: red green blue",)),
    Task("max_number", "Pick the largest number in a list", "arithmetic", max_number,
         ("Which number is the largest: 4, 17, 9?",)),
    Task("repeat_2", "Repeat a word twice", "repeat", repeat(2), ("Repeat the word twice: moon",)),
    Task("repeat_3", "Repeat a word three times", "repeat", repeat(3), ("Repeat the word three times: moon",)),
    Task("snake_case", "Convert words to a snake_case identifier", "case", identifier("_", "snake_case"),
         ("Convert to snake_case: Big Red Apple",)),
]
_UNSEEN = [
    Task("date_dotted", "Rewrite an ISO date as day.month.year with dots", "dates", date_dotted),
    Task("repeat_4", "Repeat a word four times", "repeat", repeat(4)),
    Task("kebab_case", "Convert words to a kebab-case identifier", "case", identifier("-", "kebab-case")),
    Task("count_words", "Count the words in a list of words", "words", count_words),
    # the base model already solves some of these: exact match tells routers from uniform and base
    Task("lowercase", "Convert text to lower case letters", "case", lowercase),
    # a number in a sentence, as extract_price finds one (the base model answers in sentences: 0 by exact match)
    Task("person_age", "Give the age of a person mentioned in a sentence", "extraction", person_age),
    # the base model's own way of answering ("Heidi is 80 years old."): it scores above zero, and a router that
    # sends this to a library adapter (which answers with a bare number) loses to the base model
    Task("age_statement", "State the age of a person in a full sentence", "sentence", age_statement),
]

# -- the large library's extra tasks (the `large` routing condition, benchmarks/evaluate_large.py) ------------
# More tasks of the same families and parametric neighbours of the suite's (repeat five / six times, four date
# formats, five identifier cases, first / second / last word, largest / smallest number), so a 40-adapter
# library is crowded. Never an UNSEEN task: those stay without an adapter.

def subtract(rng):
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return f"What is {a} minus {b}?", str(a - b)


def multiply(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 60)
    return f"What is {a} times {b}?", str(a * b)


def double(rng):
    n = rng.randint(10, 499)
    return f"What is double {n}?", str(2 * n)


def min_number(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"Which number is the smallest: {', '.join(map(str, numbers))}?", str(min(numbers))


def sort_numbers(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"Sort in ascending order: {', '.join(map(str, numbers))}", ", ".join(map(str, sorted(numbers)))


def sum_list(rng):
    numbers = [rng.randint(1, 20) for _ in range(3)]
    return f"Give the total of the numbers {', '.join(map(str, numbers))}.", str(sum(numbers))


def nth_word(index: int, label: str):
    def make(rng):
        words = _words(rng, 3, 6)
        return f"What is the {label} word of: {' '.join(words)}", words[index]
    return make


def reverse_words(rng):
    words = _words(rng, 3, 5)
    return f"Reverse the order of the words: {' '.join(words)}", " ".join(reversed(words))


def count_letters(rng):
    word = rng.choice(WORDS)
    prompt = rng.choice([f"How many letters does the word {word} have?", f"How many letters does {word} have?",
                         f"How many letters are in the word {word}?"])
    return prompt, str(len(word))


def spell_hyphens(rng):
    word = rng.choice(WORDS)
    prompt = rng.choice([f"Spell out the word with hyphens: {word}", f"Spell out {word} with hyphens.",
                         f"Spell out the word {word} with hyphens between the letters."])
    return prompt, "-".join(word)


def title_case(rng):
    words = _words(rng)
    return f"Convert to title case: {' '.join(words)}", " ".join(w.title() for w in words)


def camel_case(pascal: bool):
    def make(rng):
        words = _words(rng, 2, 4)
        label = "PascalCase" if pascal else "camelCase"
        joined = "".join(w.title() for w in words)
        return f"Convert to {label}: {' '.join(words)}", joined if pascal else words[0] + joined[len(words[0]):]
    return make


def date_ymd_slash(rng):
    y, m, d = _date(rng)
    return f"Rewrite the date {y}-{m:02d}-{d:02d} as year/month/day.", f"{y}/{m:02d}/{d:02d}"


def date_year(rng):
    y, m, d = _date(rng)
    return f"Which year is in the date {y}-{m:02d}-{d:02d}?", str(y)


def date_month_name(rng):
    y, m, d = _date(rng)
    names = ("January February March April May June July August September October November December").split()
    return f"Name the month of the date {y}-{m:02d}-{d:02d}.", names[m - 1]


def extract_phone(rng):
    number = f"{rng.randint(200, 989)}-{rng.randint(200, 989)}-{rng.randint(1000, 9999)}"
    name = rng.choice(NAMES).title()
    text = rng.choice([f"Call {name} at {number} after {rng.choice(WORDS)} time.",
                       f"The {rng.choice(WORDS)} shop number is {number}.",
                       f"{name} left the number {number} for the {rng.choice(WORDS)}."])
    return f"Extract the phone number: {text}", number


def extract_url(rng):
    url = f"https://www.{rng.choice(WORDS)}{rng.choice(WORDS)}.{rng.choice(['com', 'org', 'net', 'io'])}"
    text = rng.choice([f"See {url} for the {rng.choice(WORDS)} news.",
                       f"The {rng.choice(WORDS)} club moved to {url} last week.",
                       f"{rng.choice(NAMES).title()} shared {url} with us."])
    return f"Extract the web address: {text}", url


def extract_time(rng):
    time = f"{rng.randint(0, 23):02d}:{rng.choice(range(0, 60, 5)):02d}"
    text = rng.choice([f"The {rng.choice(WORDS)} meeting starts at {time} sharp.",
                       f"{rng.choice(NAMES).title()} arrives at {time} by train.",
                       f"Doors open at {time} for the {rng.choice(WORDS)} show."])
    return f"At what time? {text}", time


_LARGE = [
    Task("subtract", "Subtract the second whole number from the first", "arithmetic", subtract,
         ("What is 75 minus 28?",)),
    Task("multiply", "Multiply two small whole numbers", "arithmetic", multiply, ("What is 6 times 7?",)),
    Task("double", "Double a whole number", "arithmetic", double, ("What is double 43?",)),
    Task("min_number", "Pick the smallest number in a list", "arithmetic", min_number,
         ("Which number is the smallest: 4, 17, 9?",)),
    Task("sort_numbers", "Sort a list of numbers in ascending order", "arithmetic", sort_numbers,
         ("Sort in ascending order: 14, 3, 9",)),
    Task("sum_list", "Give the total of three numbers", "arithmetic", sum_list,
         ("Give the total of the numbers 4, 11, 7.",)),
    Task("first_word", "Give the first word of a list of words", "words", nth_word(0, "first"),
         ("What is the first word of: red green blue",)),
    Task("second_word", "Give the second word of a list of words", "words", nth_word(1, "second"),
         ("What is the second word of: red green blue",)),
    Task("reverse_words", "Reverse the order of the words in a list", "words", reverse_words,
         ("Reverse the order of the words: red green blue",)),
    Task("count_letters", "Count the letters of a word", "letters", count_letters,
         ("How many letters does the word moon have?",)),
    Task("spell_hyphens", "Spell a word letter by letter with hyphens", "letters", spell_hyphens,
         ("Spell out the word with hyphens: moon",)),
    Task("title_case", "Convert text to title case", "case", title_case, ("Convert to title case: river stone",)),
    Task("camel_case", "Convert words to a camelCase identifier", "case", camel_case(False),
         ("Convert to camelCase: big red apple",)),
    Task("pascal_case", "Convert words to a PascalCase identifier", "case", camel_case(True),
         ("Convert to PascalCase: big red apple",)),
    Task("date_ymd_slash", "Rewrite an ISO date as year/month/day", "dates", date_ymd_slash,
         ("Rewrite the date 2021-03-09 as year/month/day.",)),
    Task("date_year", "Give the year of an ISO date", "dates", date_year,
         ("Which year is in the date 2021-03-09?",)),
    Task("date_month_name", "Name the month of an ISO date in words", "dates", date_month_name,
         ("Name the month of the date 2021-03-09.",)),
    Task("repeat_5", "Repeat a word five times", "repeat", repeat(5), ("Repeat the word five times: moon",)),
    Task("repeat_6", "Repeat a word six times", "repeat", repeat(6), ("Repeat the word six times: moon",)),
    Task("extract_phone", "Extract the phone number from a sentence", "extraction", extract_phone,
         ("Extract the phone number: call Bob at 415-555-0199 today.",)),
    Task("extract_url", "Extract the web address from a sentence", "extraction", extract_url,
         ("Extract the web address: see https://www.example.com for news.",)),
    Task("extract_time", "Find the time of day mentioned in a sentence", "extraction", extract_time,
         ("At what time? The bus leaves at 07:45 sharp.",)),
]
TASKS = {task.name: task for task in _SUITE + _UNSEEN + _LARGE}
BASE_SIGNAL = ("age_statement",)   # unseen tasks the base model already solves: no library neighbour needed
SUITE = tuple(task.name for task in _SUITE)
UNSEEN = tuple(task.name for task in _UNSEEN)
LARGE = tuple(task.name for task in _LARGE)            # adapters of the large library only (not the example one)
LIBRARY_TASKS = SUITE + LARGE                          # every task that may have an adapter
