"""Task readers: one `Problem` per row of the public task files, or of any JSONL file.

    task = get_task("gsm8k")
    problems = task.read(task.path("test"))        # ../shared/data/gsm8k/test.jsonl

Built-in tasks and their files (relative to the data directory, see `data_root`):

| task          | answer type | splits -> file                                                  |
|---------------|-------------|-----------------------------------------------------------------|
| gsm8k         | number      | train, test -> gsm8k/{train,test}.jsonl (gold after `#### `)    |
| multiarith    | number      | test -> multiarith/MultiArith.json (`lSolutions[0]`)            |
| singleeq      | number      | test -> singleeq/questions.json (`lSolutions[0]`)               |
| coin_flip     | yesno       | test -> coin_flip/coin_flip.json                                |
| last_letters  | text        | test -> last_letters/last_letters.json                          |
| commonsenseqa | choice      | train, dev -> commonsenseqa/{train,dev}_rand_split.jsonl        |

`jsonl` reads any JSONL file (`--data`) with the question, answer and (optional) choices
fields named by the user; dotted names reach into objects (`question.stem`).

A problem's id is its 0-based row number in the file, so it is stable across runs (resumption
and paired comparisons rely on that). Malformed rows raise ColdError naming file and row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cold.errors import ColdError
from cold.evaluation.extract import ANSWER_TYPES, normalize_gold

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Problem:
    """One question with its normalised gold answer."""

    id: str  # 0-based row number in the source file
    question: str
    gold: str
    choices: tuple[tuple[str, str], ...] = ()  # (label, text), multiple choice only


@dataclass(frozen=True)
class Task:
    name: str
    answer_type: str  # one of extract.ANSWER_TYPES
    files: dict[str, str]  # split -> file relative to the data directory
    default_split: str
    reader: Callable[[Path], list[Problem]] = field(repr=False)
    family: str = ""  # which built-in few-shot exemplars fit (prompts.EXEMPLARS); "" = none

    def path(self, split: str | None = None, data: str | Path | None = None) -> Path:
        """The file to read: `data` if given, else the split's file under the data directory."""
        if data is not None:
            path = Path(data)
            if not path.is_file():
                raise ColdError(f"--data {path}: file not found")
            return path
        split = split or self.default_split
        if split not in self.files:
            raise ColdError(f"task {self.name!r} has no split {split!r}; splits: {', '.join(self.files)}")
        path = data_root() / self.files[split]
        if not path.is_file():
            raise ColdError(f"{path}: file not found (give the task file with --data PATH, or the data directory with $COLD_DATA_DIR)")
        return path

    def read(self, path: Path) -> list[Problem]:
        problems = self.reader(path)
        if not problems:
            raise ColdError(f"{path}: no problems in the file")
        return problems


def data_root() -> Path:
    """`$COLD_DATA_DIR`, else `../shared/data` beside the repository, else beside the working directory."""
    if os.environ.get("COLD_DATA_DIR"):
        return Path(os.environ["COLD_DATA_DIR"])
    for candidate in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "data"


# ---- file formats ----------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, object) for every non-empty line; `where` is "file:line" for error messages."""
    with _open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ColdError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ColdError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _json_rows(path: Path, key: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, object) for every element of a JSON array (or of `data[key]`); `where` names the row."""
    with _open(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ColdError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ColdError(f"{path}: expected an object with a {key!r} list")
        data = data[key]
    if not isinstance(data, list):
        raise ColdError(f"{path}: expected a JSON list of problems")
    for index, row in enumerate(data):
        where = f"{path}: row {index}"
        if not isinstance(row, dict):
            raise ColdError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _open(path: Path):
    if not path.is_file():
        raise ColdError(f"{path}: file not found")
    return path.open(encoding="utf-8")


def get_field(row: dict, name: str, where: str):
    """`row[name]`, with dotted names reaching into objects; ColdError naming the row if absent."""
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            present = ", ".join(sorted(row)) or "none"
            raise ColdError(f"{where}: no field {name!r} (fields: {present})")
        value = value[part]
    return value


def _text(row: dict, name: str, where: str) -> str:
    value = get_field(row, name, where)
    if not isinstance(value, str) or not value.strip():
        raise ColdError(f"{where}: field {name!r} must be a non-empty string")
    return value.strip()


def _gold(value, answer_type: str, where: str, name: str, labels=()) -> str:
    gold = normalize_gold(value, answer_type, labels)
    if gold is None:
        raise ColdError(f"{where}: field {name!r} = {value!r} is not a valid {answer_type} answer")
    return gold


def _choices(value, where: str, name: str) -> tuple[tuple[str, str], ...]:
    """A list of {"label", "text"} objects, or of strings (labelled A, B, C, ...)."""
    if not isinstance(value, list) or not value:
        raise ColdError(f"{where}: field {name!r} must be a non-empty list of choices")
    out = []
    for index, choice in enumerate(value):
        if isinstance(choice, str):
            out.append((chr(ord("A") + index), choice))
        elif isinstance(choice, dict) and isinstance(choice.get("label"), str) and isinstance(choice.get("text"), str):
            out.append((choice["label"].strip().upper(), choice["text"].strip()))
        else:
            raise ColdError(f"{where}: choice {index} of {name!r} must be a string or an object with 'label' and 'text'")
    return tuple(out)


# ---- readers ---------------------------------------------------------------------------------


def read_gsm8k(path: Path) -> list[Problem]:
    """GSM8K JSONL: `question`, `answer` (worked solution ending `#### N`)."""
    problems = []
    for index, (where, row) in enumerate(_jsonl_rows(path)):
        answer = get_field(row, "answer", where)
        if not isinstance(answer, str) or "####" not in answer:
            raise ColdError(f"{where}: field 'answer' has no '#### N' final answer")
        problems.append(Problem(str(index), _text(row, "question", where), _gold(answer, "number", where, "answer")))
    return problems


def read_mawps(path: Path) -> list[Problem]:
    """MultiArith / SingleEq JSON list: `sQuestion`, gold `lSolutions[0]`."""
    problems = []
    for index, (where, row) in enumerate(_json_rows(path)):
        solutions = get_field(row, "lSolutions", where)
        if not isinstance(solutions, list) or not solutions:
            raise ColdError(f"{where}: field 'lSolutions' must be a non-empty list")
        problems.append(Problem(str(index), _text(row, "sQuestion", where), _gold(solutions[0], "number", where, "lSolutions[0]")))
    return problems


def _read_examples(answer_type: str) -> Callable[[Path], list[Problem]]:
    def read(path: Path) -> list[Problem]:
        """Kojima et al.'s symbolic sets: {"examples": [{"question", "answer"}, ...]}."""
        return [
            Problem(str(index), _text(row, "question", where), _gold(get_field(row, "answer", where), answer_type, where, "answer"))
            for index, (where, row) in enumerate(_json_rows(path, "examples"))
        ]

    return read


read_coin_flip = _read_examples("yesno")
read_last_letters = _read_examples("text")


def read_commonsenseqa(path: Path) -> list[Problem]:
    """CommonsenseQA JSONL: `question.stem`, `question.choices[].label/text`, `answerKey`."""
    problems = []
    for index, (where, row) in enumerate(_jsonl_rows(path)):
        choices = _choices(get_field(row, "question.choices", where), where, "question.choices")
        labels = [label for label, _ in choices]
        gold = _gold(get_field(row, "answerKey", where), "choice", where, "answerKey", labels)
        problems.append(Problem(str(index), _text(row, "question.stem", where), gold, choices))
    return problems


def read_jsonl(path: Path, question: str = "question", answer: str = "answer", answer_type: str = "number",
               choices: str | None = None) -> list[Problem]:
    """Any JSONL file: the named question / answer (/ choices) fields; dotted names reach into objects.

    A number answer may be a number or a string (a worked solution ending `#### N` gives N).
    """
    if answer_type not in ANSWER_TYPES:
        raise ColdError(f"--answer-type must be one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")
    if answer_type == "choice" and not choices:
        raise ColdError("--answer-type choice needs --choices-field (the field holding the choices)")
    problems = []
    for index, (where, row) in enumerate(_jsonl_rows(path)):
        options = _choices(get_field(row, choices, where), where, choices) if choices else ()
        labels = [label for label, _ in options]
        gold = _gold(get_field(row, answer, where), answer_type, where, answer, labels)
        problems.append(Problem(str(index), _text(row, question, where), gold, options))
    return problems


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("gsm8k", "number", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, "test", read_gsm8k, "arithmetic"),
        Task("multiarith", "number", {"test": "multiarith/MultiArith.json"}, "test", read_mawps, "arithmetic"),
        Task("singleeq", "number", {"test": "singleeq/questions.json"}, "test", read_mawps, "arithmetic"),
        Task("coin_flip", "yesno", {"test": "coin_flip/coin_flip.json"}, "test", read_coin_flip, "coin_flip"),
        Task("last_letters", "text", {"test": "last_letters/last_letters.json"}, "test", read_last_letters, "last_letters"),
        Task("commonsenseqa", "choice",
             {"train": "commonsenseqa/train_rand_split.jsonl", "dev": "commonsenseqa/dev_rand_split.jsonl"},
             "dev", read_commonsenseqa, "multiple_choice"),
    )
}
GENERIC = "jsonl"
TASK_NAMES = (*TASKS, GENERIC)


def get_task(name: str, question_field: str = "question", answer_field: str = "answer",
             answer_type: str = "number", choices_field: str | None = None) -> Task:
    """A built-in task, or the generic JSONL task with the given field names."""
    if name in TASKS:
        return TASKS[name]
    if name == GENERIC:
        if answer_type not in ANSWER_TYPES:
            raise ColdError(f"--answer-type must be one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")

        def reader(path: Path) -> list[Problem]:
            return read_jsonl(path, question_field, answer_field, answer_type, choices_field)

        return Task(GENERIC, answer_type, {}, "", reader)
    raise ColdError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")


def select(problems: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    """A seeded sample of `limit` problems (all when limit is None), in file order.

    The sample is a prefix of one seeded permutation, so a larger limit with the same seed
    contains the smaller one (a resumed run with a larger --limit reuses what was generated).
    """
    if limit is None or limit >= len(problems):
        return list(problems)
    if limit < 1:
        raise ColdError(f"--limit must be >= 1, got {limit}")
    import random

    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    return [problems[i] for i in sorted(order[:limit])]
