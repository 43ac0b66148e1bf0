"""The suite's tasks asked in other words: each prompt of a task's split re-asked in a phrasing the library
never saw (other verbs, word order, question forms, the instruction after the content), with the same answer.

The library's adapters carry one description and one example prompt each, both in the template the tasks'
generators use ("Convert to upper case: ...", "Rewrite the date ... as day/month/year."). A router that
matches those strings looks perfect on prompts in that template; these phrasings test whether it routes the
request or the wording. Two disjoint sets of phrasings per task:

    TEST_PHRASINGS    >= 6 per task, for the held-out evaluation (`paraphrase` condition); written before
                      any router was tuned on them, and never tuned on.
    TRAIN_PHRASINGS   3 others per task, asked on the train split: what router settings are chosen on.

    pairs = paraphrased("date_dmy", "test", 20)    # [(instruction, answer)]: the test split, phrasing i % 6

Each task's slots (the date, the words, the numbers) are parsed back out of the template instruction, so the
answers stay the generator's.
"""

from __future__ import annotations

import re

from adaptermix.tasks import TASKS

__all__ = ["TEST_PHRASINGS", "TRAIN_PHRASINGS", "paraphrased", "slots"]

# -- slots: the content of a template instruction -------------------------------------------------------

_PATTERNS = {
    "uppercase": r"Convert to upper case: (?P<text>.+)",
    "lowercase": r"Convert to lower case: (?P<text>.+)",
    "acronym": r"Write the acronym of: (?P<text>.+)",
    "extract_email": r"Extract the email address: (?P<text>.+)",
    "extract_price": r"What is the price in dollars\? (?P<text>.+)",
    "date_dmy": r"Rewrite the date (?P<date>[\d-]+) as day/month/year\.",
    "date_mdy": r"Rewrite the date (?P<date>[\d-]+) as month/day/year\.",
    "date_dotted": r"Rewrite the date (?P<date>[\d-]+) as day\.month\.year with dots\.",
    "add": r"What is (?P<a>\d+) plus (?P<b>\d+)\?",
    "last_word": r"What is the last word of: (?P<text>.+)",
    "count_words": r"How many words are in: (?P<text>.+)",
    "max_number": r"Which number is the largest: (?P<text>.+)\?",
    "snake_case": r"Convert to snake_case: (?P<text>.+)",
    "kebab_case": r"Convert to kebab-case: (?P<text>.+)",
    "person_age": r"How old is (?P<name>\w+)\? (?P<text>.+)",
    "age_statement": (r"(?P<name>\w+) lives near the (?P<place>\w+)\. \w+ is (?P<age>\d+) years old\. "
                      r"How old is \w+\? Answer in a full sentence\."),
}
_REPEAT = (r"Repeat the word [a-z ]+: (?P<word>\w+)", r"Say the word (?P<word>\w+) [a-z ]+\.",
           r"Write (?P<word>\w+) [a-z ]+, separated by spaces\.")


def slots(task: str, instruction: str) -> dict[str, str]:
    """The content of one of a task's template instructions, e.g. {'date': '2021-03-09'}."""
    patterns = _REPEAT if task.startswith("repeat_") else (_PATTERNS[task],)
    for pattern in patterns:
        match = re.fullmatch(pattern, instruction)
        if match:
            return match.groupdict()
    raise ValueError(f"{instruction!r} is not an instruction of task {task!r}")


# -- phrasings ------------------------------------------------------------------------------------------

def _repeat(n: int, word: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(test, train) phrasings of 'repeat a word n times'."""
    digits = str(n)
    return ((f"Write the word {{word}} {word} in a row, with spaces between.",
             f"{{word}} -- type it out {word}, nothing else.",
             f"Could you echo '{{word}}' {digits} times?",
             f"Give me {{word}} repeated {word}.",
             f"I need the word {{word}} said {word} over. Write it.",
             f"How does {{word}} look when it is written {digits} times on one line?"),
            (f"Repeat {{word}} {digits} times.", f"Say {{word}} {word} over.", f"{word.capitalize()} please: {{word}}"))


_REPEAT_2, _REPEAT_2_TRAIN = _repeat(2, "two times")
_REPEAT_3, _REPEAT_3_TRAIN = _repeat(3, "three times")
_REPEAT_4, _REPEAT_4_TRAIN = _repeat(4, "four times")

TEST_PHRASINGS: dict[str, tuple[str, ...]] = {
    "uppercase": ("{text} -- write this in capital letters please.",
                  "How would '{text}' look in all caps?",
                  "Make every letter capital: {text}",
                  "Please capitalise all the letters of the following words. {text}",
                  "Shout these words by writing them in block letters: {text}",
                  "Here are some words: {text}. Return them in capitals."),
    "lowercase": ("{text} -- write this in small letters please.",
                  "How would '{text}' look with no capitals at all?",
                  "Make every letter small: {text}",
                  "Please put all the letters of the following words in lowercase. {text}",
                  "Stop shouting: rewrite {text} without any capital letters.",
                  "Here are some words: {text}. Return them in small letters."),
    "acronym": ("What are the initials of '{text}'?",
                "{text} -- abbreviate this with its first letters.",
                "Form an abbreviation from the first letter of each word in: {text}",
                "Take the first letter of every word and join them as capitals: {text}",
                "Give me the short form built from the initial letters of {text}.",
                "Which acronym stands for {text}?"),
    "extract_email": ("{text} Which e-mail address is mentioned there?",
                      "Find the mail address in this sentence: {text}",
                      "What address should I email, according to this? {text}",
                      "Pull out the e-mail contact from the following text. {text}",
                      "Here is a message: \"{text}\" Give only the email in it.",
                      "Copy the email address out of: {text}"),
    "extract_price": ("{text} How much does it cost, in dollars?",
                      "How many dollars is it? {text}",
                      "Find the amount of money in this sentence, as a number: {text}",
                      "Read the sentence and give the cost without the dollar sign. {text}",
                      "Here is a sentence: \"{text}\" What does it cost?",
                      "Tell me the dollar amount mentioned in: {text}"),
    "date_dmy": ("Put {date} in day/month/year order.",
                 "{date} -- give this date with the day first, then the month, then the year, with slashes.",
                 "How is {date} written in the DD/MM/YYYY format?",
                 "Format the ISO date {date} as DD/MM/YYYY.",
                 "Change {date} into the European style, day/month/year.",
                 "Could you express the date {date} in the form day/month/year?"),
    "date_mdy": ("Put {date} in month/day/year order.",
                 "{date} -- give this date with the month first, then the day, then the year, with slashes.",
                 "How is {date} written in the MM/DD/YYYY format?",
                 "Format the ISO date {date} as MM/DD/YYYY.",
                 "Change {date} into the American style, month/day/year.",
                 "Could you express the date {date} in the form month/day/year?"),
    "date_dotted": ("Put {date} in day.month.year order, with dots.",
                    "{date} -- give this date with the day first, then the month, then the year, with dots.",
                    "How is {date} written in the DD.MM.YYYY format?",
                    "Format the ISO date {date} as DD.MM.YYYY.",
                    "Change {date} into the German style, day.month.year.",
                    "Could you express the date {date} in the form day.month.year?"),
    "add": ("Add {a} and {b}.",
            "Compute the sum of {a} and {b}.",
            "{a} + {b} = ?",
            "If I have {a} apples and get {b} more, how many do I have? Give just the number.",
            "What do you get when {b} is added to {a}?",
            "Calculate {a} added to {b}, giving only the result."),
    "last_word": ("Which word comes at the end of '{text}'?",
                  "{text} -- tell me the final word.",
                  "Give the final word in this list: {text}",
                  "Here is a sequence of words: {text}. Which one is last?",
                  "Return only the word that ends the following list. {text}",
                  "In the list {text}, what is the closing word?"),
    "count_words": ("Count the words in '{text}'.",
                    "{text} -- how many words is that?",
                    "Tell me the number of words in this list: {text}",
                    "Here is a sequence of words: {text}. How many are there?",
                    "Give only the word count of the following. {text}",
                    "In the list {text}, how many words do you see?"),
    "max_number": ("Find the biggest of these numbers: {text}",
                   "{text} -- which of them is the maximum?",
                   "What is the highest value among {text}?",
                   "Give me the greatest number in the list {text}.",
                   "Out of {text}, which one is greatest?",
                   "Return the max of the following values. {text}"),
    "repeat_2": _REPEAT_2,
    "repeat_3": _REPEAT_3,
    "repeat_4": _REPEAT_4,
    "snake_case": ("Turn '{text}' into a snake_case variable name.",
                   "{text} -- write this as a Python identifier in snake case.",
                   "Make an identifier from {text}: words joined by underscores, all lowercase.",
                   "How would you name a variable for '{text}' in snake_case?",
                   "Join the words of {text} in lower case with underscores.",
                   "Give the snake case form of the following phrase. {text}"),
    "kebab_case": ("Turn '{text}' into a kebab-case slug.",
                   "{text} -- write this as a URL slug in kebab case.",
                   "Make an identifier from {text}: words joined by hyphens, all lowercase.",
                   "How would you name a CSS class for '{text}' in kebab-case?",
                   "Join the words of {text} in lower case with hyphens.",
                   "Give the kebab case form of the following phrase. {text}"),
    "person_age": ("{text} What is {name}'s age?",
                   "Tell me {name}'s age in years. {text}",
                   "{text} -- how many years old is {name}?",
                   "Read this and give {name}'s age as a number: {text}",
                   "Here is a sentence: \"{text}\" What age is {name}?",
                   "What age does this give for {name}? {text}"),
    "age_statement": ("Near the {place} lives {name}, who is {age}. Say in a complete sentence how old {name} is.",
                      "Write one whole sentence stating {name}'s age: {name} is {age} years old, near the {place}.",
                      "{name}, {age} years of age, lives by the {place}. Reply with a whole sentence: {name}'s age?",
                      "Read this and tell me in a sentence how old {name} is: {name} is {age}, near the {place}.",
                      "Here is a fact: \"{name} is {age} years old.\" Give {name}'s age as a full sentence.",
                      "In a complete sentence, what age is {name}? {name} is {age} and lives near the {place}."),
}

TRAIN_PHRASINGS: dict[str, tuple[str, ...]] = {
    "uppercase": ("Capitalize {text}", "Turn '{text}' into capitals.", "Give me {text} in caps lock style."),
    "lowercase": ("Decapitalize {text}", "Turn '{text}' into small letters.", "Give me {text} all lowercase."),
    "acronym": ("Initialism for {text}, please.", "Abbreviate '{text}' to its initial letters.",
                "Shorten {text} into an acronym."),
    "extract_email": ("Read this and return the email: {text}", "{text} What is the contact email?",
                      "Identify the e-mail address in '{text}'"),
    "extract_price": ("{text} Give the price.", "Which sum of money appears in: {text}",
                      "State the cost in dollars from '{text}'"),
    "date_dmy": ("Convert {date} to day/month/year.", "Write {date} as DD/MM/YYYY.",
                 "{date} in day-month-year order with slashes, please."),
    "date_mdy": ("Convert {date} to month/day/year.", "Write {date} as MM/DD/YYYY.",
                 "{date} in month-day-year order with slashes, please."),
    "date_dotted": ("Convert {date} to day.month.year.", "Write {date} as DD.MM.YYYY.",
                    "{date} in day-month-year order with dots, please."),
    "add": ("Sum {a} and {b}.", "{a} plus {b} equals what?", "Total of {a} and {b}?"),
    "last_word": ("Last item of: {text}", "What word ends '{text}'?", "Name the final entry: {text}"),
    "count_words": ("Word count of: {text}", "How many words does '{text}' have?", "Number of entries: {text}"),
    "max_number": ("Largest value in {text}?", "Pick the top number: {text}",
                   "Which is bigger than all the others: {text}?"),
    "repeat_2": _REPEAT_2_TRAIN,
    "repeat_3": _REPEAT_3_TRAIN,
    "repeat_4": _REPEAT_4_TRAIN,
    "snake_case": ("snake_case of: {text}", "Lowercase and underscore-join: {text}", "Write {text} in snake case."),
    "kebab_case": ("kebab-case of: {text}", "Lowercase and hyphen-join: {text}", "Write {text} in kebab case."),
    "person_age": ("{text} Age of {name}?", "{name}'s age from: {text}", "How many years has {name} lived? {text}"),
    "age_statement": ("{name} is {age} years old. {name}'s age, as a sentence?",
                      "Sentence please, {name}'s age: {name} is {age}, near the {place}.",
                      "State {name}'s age in a sentence. {name} is {age} years old."),
}


def paraphrased(task: str, split: str, n: int) -> list[tuple[str, str]]:
    """The first n (instruction, answer) pairs of a task's split, prompt i asked in phrasing i mod the number
    of phrasings: the test phrasings on the test split, the train phrasings on the others."""
    phrasings = (TEST_PHRASINGS if split == "test" else TRAIN_PHRASINGS)[task]
    pairs = TASKS[task].examples(split, n)
    return [(phrasings[i % len(phrasings)].format(**slots(task, prompt)), answer)
            for i, (prompt, answer) in enumerate(pairs)]
