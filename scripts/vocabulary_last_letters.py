"""Last-letters problems over words from a tokenizer's vocabulary: unfamiliar words, where the
last-letters expert makes the mistakes it makes on the public test file.

    python scripts/vocabulary_last_letters.py --split train --n 600 --out runs/data/ll-vocab-train.json
    python scripts/vocabulary_last_letters.py --split tune --n 200 --out runs/data/ll-vocab-tune.json

The generated `gen-*` splits draw from about 200 common first names; the public test file has about
2,000 different ones, and there the expert mostly takes a wrong letter from a name it has not seen
(on the generated names it mostly joins the right letters wrongly). These problems draw each word
from the capitalised, purely alphabetic whole-word tokens of the model's vocabulary (2 to 10
letters), worded like the other splits. Every word of the public test file (when `../shared/data`
is there) and of the few-shot exemplars is left out, so no test word is trained or tuned on. The
splits use different seeds. Output: the symbolic tasks' format, {"examples":
[{"question", "answer", "worked"}]}, readable by `cold eval --task last_letters --data FILE` and by
`cold train --task last_letters --data FILE`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from cold.errors import ColdError
from cold.tasks.generators import last_letters
from cold.tasks.prompts import EXEMPLARS
from cold.tasks.readers import get_task

SPLIT_SEEDS = {"train": 11, "tune": 12}
WORD = re.compile(r"[A-Z][a-z]{1,9}")


def quoted_words(text: str) -> set[str]:
    """The words inside the double quotes of a last-letters question (or of any text)."""
    return {w for quoted in re.findall(r'"([^"]*)"', text) for w in quoted.split()}


def excluded_words() -> set[str]:
    """Every word of the public test file's questions (if it is there) and of the few-shot exemplars."""
    words = {w for shot in EXEMPLARS["last_letters"] for w in quoted_words(shot[0])}
    task = get_task("last_letters")
    try:
        test = task.read(task.path("test"))
    except ColdError:  # no ../shared/data here: nothing more to leave out
        return words
    for problem in test:
        words |= quoted_words(problem.question)
    return words


def vocabulary_words(tokenizer, exclude: set[str]) -> list[str]:
    """Capitalised alphabetic tokens that start a word (2-10 letters), sorted, minus `exclude`."""
    words = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text.startswith(" ") and WORD.fullmatch(text[1:]):
            words.add(text[1:])
    return sorted(words - exclude)


def problems(words: list[str], split: str, n: int) -> list[dict]:
    """`n` distinct problems of one split (its own seed: over thousands of words, two splits
    drawing the same four words in the same order is vanishingly unlikely)."""
    rng, rows, taken = random.Random(f"vocabulary-last-letters/{SPLIT_SEEDS[split]}"), [], set()
    while len(rows) < n:
        g = last_letters(rng, words=words)
        if g.question not in taken:
            taken.add(g.question)
            rows.append({"question": g.question, "answer": g.answer, "worked": g.worked})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLIT_SEEDS), required=True)
    parser.add_argument("--n", type=int, default=600, help="problems to write")
    parser.add_argument("--model", default="smollm2", help="whose tokenizer's vocabulary (default: smollm2)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from cold.load.models import load_base

    try:
        tokenizer = load_base(args.model).tokenizer
    except ColdError as exc:
        sys.exit(f"error: {exc}")
    exclude = excluded_words()
    words = vocabulary_words(tokenizer, exclude)
    rows = problems(words, args.split, args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"examples": rows}, indent=0) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(rows)} problems over {len(words)} vocabulary words ({len(exclude)} test and exemplar words left out)")


if __name__ == "__main__":
    main()
