"""Training data: a task's train file read into (question, answer) pairs, and each task's default file.

    path, pairs = load_task("gsm8k", None)     # ../shared/data/gsm8k/train.jsonl

GSM8K and CommonsenseQA train on their public train files under the data root
(`cold.load.paths.data_root`); coin flip and last letters on the generated `gen-train` split
(`cold.tasks.readers.generated_file`). CommonsenseQA questions are worded exactly as `cold eval`
words them, and the rows `cold tune` samples by default are left out.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from cold.errors import ColdError
from cold.load.paths import data_root
from cold.tasks.prompts import question_text
from cold.tasks.readers import generated_file, jsonl_rows, read_commonsenseqa, select, text_field

_CSQA_TRAIN = "commonsenseqa/train_rand_split.jsonl"
DEFAULT_DATA = {  # task -> its train file, relative to the data root (cold.load.paths.data_root)
    "gsm8k": "gsm8k/train.jsonl",
    "commonsenseqa": _CSQA_TRAIN,
    "commonsenseqa-text": _CSQA_TRAIN,
    "commonsenseqa-text-wrong": _CSQA_TRAIN,
}
# CommonsenseQA tunes on its train file (it has no other labelled split besides dev, the test
# split): the rows of `cold tune`'s default sample (up to this many, seed 0) are kept out of training.
TUNING_RESERVE = 500

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K's ``<<48/2=24>>`` calculator annotations; keep the final ``#### N`` line."""
    return _CALCULATOR_ANNOTATION.sub("", answer).strip()


def load_gsm8k(path: Path) -> list[tuple[str, str]]:
    """Read GSM8K jsonl (any JSONL with `question` and `answer` strings) into (question, cleaned answer) pairs."""
    return [(text_field(row, "question", where), clean_gsm8k_answer(text_field(row, "answer", where)))
            for where, row in jsonl_rows(path)]


def load_worked_examples(path: Path) -> list[tuple[str, str]]:
    """A generated symbolic split ({"examples": [{"question", "worked", ...}]}) into (question, worked answer)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
        return [(row["question"], row["worked"]) for row in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise ColdError(f"{path}: expected {{\"examples\": [{{\"question\", \"worked\"}}, ...]}} ({exc!r})") from exc


def load_commonsenseqa(path: Path, answer_text: bool = False, wrong: bool = False) -> list[tuple[str, str]]:
    """CommonsenseQA rows as (question with its answer choices, `The answer is (X).`), or with
    `answer_text` `The answer is <the choice's text>.` (`cold eval`'s flexible rule maps the text
    back to its letter).

    `wrong` answers with one of the wrong choices instead (drawn per row, seeded by the row's id):
    the data of an anti-expert, an adapter that learns the answer format and what is *not* the
    answer, to serve as CoLD's amateur (`cold eval --amateur-adapter`).

    The question is worded exactly as `cold eval` words it, and the rows `cold tune` samples by
    default (`TUNING_RESERVE`, seed 0) are left out, so tuning on the train file stays held out.
    """
    problems = read_commonsenseqa(path)
    reserved = {p.id for p in select(problems, TUNING_RESERVE, seed=0)}
    pairs = []
    for p in problems:
        if p.id not in reserved:
            label = p.gold
            if wrong:
                label = random.Random(f"wrong:{p.id}").choice(sorted(c for c, _ in p.choices if c != p.gold))
            answer = dict(p.choices)[label] if answer_text else f"({label})"
            pairs.append((question_text(p), f"The answer is {answer}."))
    return pairs


TASK_LOADERS = {
    "gsm8k": load_gsm8k,
    "coin_flip": load_worked_examples,
    "last_letters": load_worked_examples,
    "commonsenseqa": load_commonsenseqa,
    "commonsenseqa-text": lambda path: load_commonsenseqa(path, answer_text=True),
    "commonsenseqa-text-wrong": lambda path: load_commonsenseqa(path, answer_text=True, wrong=True),
    "self-negatives": load_worked_examples,  # an expert's own wrong answers (cold.training.negatives)
    "hard-negatives": load_worked_examples,  # a multiple-choice expert's tempting wrong choices (cold.training.hard_negatives)
}


_CSQA_NOTE = f"question and choices worded as `cold eval` words them; the {TUNING_RESERVE} rows of `cold tune`'s default sample left out"
TASK_FORMATS = {  # task -> the answer its pairs train on, as the model card describes it
    "gsm8k": "worked answer with the `<<a=b>>` calculator annotations removed, ending in `#### <number>`",
    "coin_flip": "worked answer (who flips, how often, parity) ending in `The answer is yes|no.`",
    "last_letters": "worked answer (each name's last letter, then the concatenation) ending in `The answer is <letters>.`",
    "commonsenseqa": f"`The answer is (X).` ({_CSQA_NOTE})",
    "commonsenseqa-text": f"`The answer is <the right choice's text>.` ({_CSQA_NOTE})",
    "commonsenseqa-text-wrong": f"`The answer is <a wrong choice's text>.`, one wrong choice per row drawn at random: an anti-expert, for use as CoLD's amateur ({_CSQA_NOTE})",
    "self-negatives": "the expert's own wrong answer, as it wrote it (`cold anti-expert`): an anti-expert, for use as CoLD's amateur",
    "hard-negatives": "`The answer is <the wrong choice the expert ranks highest>.` (`cold anti-expert`): an anti-expert, for use as CoLD's amateur",
}


def default_data(task: str) -> Path:
    """GSM8K's public train file; the generated `gen-train` split of a symbolic task."""
    if task in DEFAULT_DATA:
        return data_root() / DEFAULT_DATA[task]
    return generated_file(task, "gen-train")


def load_task(task: str, data_path: str | Path | None) -> tuple[Path, list[tuple[str, str]]]:
    """The training file (`data_path`, else the task's default) and its (question, answer) pairs."""
    if task not in TASK_LOADERS:
        raise ColdError(f"task {task!r} is not one of {', '.join(sorted(TASK_LOADERS))}")
    path = Path(data_path) if data_path else default_data(task)
    if path.is_dir():
        raise ColdError(f"training data {path}: is a directory, not a file")
    if not path.is_file():
        raise ColdError(f"training data {path} not found")
    pairs = TASK_LOADERS[task](path)
    if not pairs:
        raise ColdError(f"training data {path} is empty")
    return path, pairs
