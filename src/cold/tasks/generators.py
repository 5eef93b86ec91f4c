"""Symbolic tasks the project generates itself: coin flip and last letters.

Both follow the public sets of Kojima et al. 2022 (after Wei et al. 2022), worded the same way,
so an adapter trained on generated problems is evaluated on the public test files too:

    coin flip     'A coin is heads up. Ana flips the coin. Boris does not flip the coin. ...
                   Is the coin still heads up? Note that "flip" here means "reverse".'  -> yes / no
    last letters  'Take the last letters of each words in "Ana Boris Chen Dana" and concatenate
                   them.'  -> "asna"

Each generated problem also carries a worked answer (the format of the few-shot exemplars in
`cold.tasks.prompts`, ending in "The answer is X."), used as the training target.

Splits are fixed seeds, so every machine generates the same problems: `gen-train` (training
data), `gen-tune` (choosing alpha / beta / scale) and `gen-test` (final numbers). A question that
appears in an earlier split is regenerated, so the three splits share no question.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# First names, none of them used by the few-shot exemplars. Mixed lengths and endings so
# that last letters are not predictable from a handful of names.
NAMES = (
    "Aaron Abel Ada Adele Adrian Agnes Aiko Alan Alba Albert Alec Alicia Alvin Amara Amir Amos "
    "Andre Angela Anita Anton Ariel Arjun Arlo Astrid Aubrey Ava Axel Barbara Basil Bea Benito "
    "Bernard Bianca Blake Bodhi Bruno Caleb Camila Carlos Carmen Cecil Celia Chad Chanel Chloe "
    "Clara Colin Conrad Cyrus Dahlia Daisy Dante Darius Dawn Declan Delia Derek Diego Dmitri "
    "Dolores Doris Dylan Edith Edwin Elena Elias Eliza Ellis Elmer Elsa Emil Enzo Erika Ernest "
    "Esther Ethan Eva Ezra Farah Felix Fern Flora Floyd Frank Freya Gemma George Gloria Grace "
    "Greg Gwen Hadley Hamid Hank Harold Hazel Hector Helen Hugo Ines Ingrid Ira Irene Isaac "
    "Ivan Jack Jade Jamal Janet Jasper Joan Joel Jonah Joy Judith Julian June Kai Karen Kaveh "
    "Keith Kendra Kofi Lana Lars Laura Leon Leroy Lila Linus Logan Lorenzo Lucia Luke Mabel "
    "Malik Marco Margot Maria Martin Maya Megan Milo Miriam Mohan Nadia Naomi Nathan Neil "
    "Nina Noah Nora Oliver Olga Omar Oscar Owen Pablo Pearl Peter Petra Philip Priya Quentin "
    "Rachel Rafael Ravi Reza Rhea Rita Robert Rosa Ruben Ruth Sadie Samir Sara Seth Shirin "
    "Simon Sofia Stella Susan Tamara Ted Thea Theo Tobias Trudy Uma Ursula Valerie Victor Vince "
    "Violet Wade Walter Wendy Wilma Xavier Yara Yusuf Zane Zelda Zoe"
).split()

VERSION = 1  # bump when the generated problems change (the cached files are named by it)
PEOPLE = 4  # names per problem, as in the public test files
SPLIT_SEEDS = {"gen-train": 1, "gen-tune": 2, "gen-test": 3}
SPLIT_SIZES = {"gen-train": 5000, "gen-tune": 200, "gen-test": 500}
COIN_SUFFIX = 'Is the coin still heads up? Note that "flip" here means "reverse".'


@dataclass(frozen=True)
class Generated:
    question: str
    answer: str  # gold: "yes" / "no", or the concatenated letters
    worked: str  # worked answer ending in "The answer is <answer>."


def _join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def coin_flip(rng: random.Random, people: int = PEOPLE) -> Generated:
    names = rng.sample(NAMES, people)
    flips = [rng.random() < 0.5 for _ in names]
    sentences = [f"{n} flips the coin." if f else f"{n} does not flip the coin." for n, f in zip(names, flips)]
    question = " ".join(["A coin is heads up.", *sentences, COIN_SUFFIX])
    flippers = [n for n, f in zip(names, flips) if f]
    count = len(flippers)
    answer = "yes" if count % 2 == 0 else "no"
    if count == 0:
        who = "Nobody flips the coin, so it is flipped 0 times."
    elif count == 1:
        who = f"Only {flippers[0]} flips the coin, so it is flipped 1 time."
    else:
        who = f"{_join(flippers)} flip the coin, so it is flipped {count} times."
    parity = "An even number of flips leaves it heads up." if answer == "yes" else "An odd number of flips leaves it tails up."
    return Generated(question, answer, f"{who} {parity} The answer is {answer}.")


def last_letters(rng: random.Random, people: int = PEOPLE, words: tuple[str, ...] | list[str] = NAMES) -> Generated:
    """A last-letters problem over `people` words drawn from `words` (default: the first names)."""
    names = rng.sample(words, people)
    question = f'Take the last letters of each words in "{" ".join(names)}" and concatenate them.'
    letters = [n[-1].lower() for n in names]
    answer = "".join(letters)
    quoted_names = _join([f'"{n}"' for n in names])
    quoted_letters = _join([f'"{c}"' for c in letters])
    worked = f"The last letters of {quoted_names} are {quoted_letters}. Concatenated they give {answer}. The answer is {answer}."
    return Generated(question, answer, worked)


GENERATORS = {"coin_flip": coin_flip, "last_letters": last_letters}


def generate(task: str, split: str, n: int | None = None) -> list[Generated]:
    """The problems of one generated split (deterministic); no question repeats an earlier split's."""
    if task not in GENERATORS:
        raise KeyError(task)
    seen: set[str] = set()
    for earlier in SPLIT_SEEDS:
        if earlier == split:
            break
        seen.update(g.question for g in _draw(task, earlier, SPLIT_SIZES[earlier], set()))
    return _draw(task, split, n or SPLIT_SIZES[split], seen)


def _draw(task: str, split: str, n: int, exclude: set[str]) -> list[Generated]:
    rng = random.Random(f"{task}/{split}/{SPLIT_SEEDS[split]}")
    out: list[Generated] = []
    taken = set(exclude)
    while len(out) < n:
        item = GENERATORS[task](rng)
        if item.question not in taken:
            taken.add(item.question)
            out.append(item)
    return out


def write_split(task: str, split: str, path: Path) -> Path:
    """Write a generated split in the public files' format ({"examples": [...]}) plus worked answers."""
    rows = [{"question": g.question, "answer": g.answer, "worked": g.worked} for g in generate(task, split)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"examples": rows}, indent=0))
    tmp.replace(path)
    return path
