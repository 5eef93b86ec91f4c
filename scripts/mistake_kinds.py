"""Which kinds of mistakes each decoder of a `cold eval` run makes, on coin flip and last letters.

    python scripts/mistake_kinds.py eval-runs/coin_flip-test-smollm2-cf50-vs-selfneg

Both tasks' worked answers show the step that went wrong:
- coin flip (`... so it is flipped N times. ...`): wrong answers counted by (flips in the question,
  flips the output says), e.g. `1 -> 2` for one flipper counted as two;
- last letters (`... are "a", "b", "c" and "d". Concatenated they give ...`): a wrong answer is a
  *join* mistake when the quoted letters are right and their concatenation is not, a *letter*
  mistake when a quoted letter is wrong (or the output has no such list).
Prints a Markdown table, one column per decoder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from cold.errors import ColdError
from cold.evaluation.runner import RECORDS_DIR, RUN_FILE
from cold.tasks.readers import Problem, get_task

FLIPPED = re.compile(r"flipped (\d+) times?")
LETTERS = re.compile(r" are (.*?)\. Concatenated")


def coin_flip_kind(problem: Problem, output: str) -> str:
    said = FLIPPED.search(output)
    return f"{problem.question.count(' flips the coin.')} -> {said.group(1) if said else '?'}"


def last_letters_kind(problem: Problem, output: str) -> str:
    listed = LETTERS.search(output)
    letters = "".join(re.findall(r'"(\w)"', listed.group(1))).lower() if listed else None
    return "join" if letters == problem.gold else "letter"


KINDS = {"coin_flip": coin_flip_kind, "last_letters": last_letters_kind}


def mistake_kinds(run_dir: Path) -> dict[str, Counter]:
    """decoder label -> Counter of the kinds of its wrong answers (flexible rule)."""
    run_path = run_dir / RUN_FILE
    if not run_path.is_file():
        raise ColdError(f"{run_path} not found: give the output directory of a `cold eval` run")
    run = json.loads(run_path.read_text(encoding="utf-8"))
    if run["task"] not in KINDS:
        raise ColdError(f"task {run['task']!r}: mistake kinds are known for {', '.join(KINDS)} only")
    kind_of = KINDS[run["task"]]
    problems = {p.id: p for p in get_task(run["task"]).read(Path(run["data"]))}
    kinds = {}
    for path in sorted((run_dir / RECORDS_DIR).glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if records:
            kinds[records[0]["decoder"]] = Counter(
                kind_of(problems[r["id"]], r["output"]) for r in records if not r["correct"]["flexible"])
    return kinds


def table(kinds: dict[str, Counter]) -> str:
    decoders = list(kinds)
    rows = sorted({k for counts in kinds.values() for k in counts})
    lines = ["| mistake | " + " | ".join(decoders) + " |", "|---|" + "---:|" * len(decoders)]
    lines += [f"| {row} | " + " | ".join(str(kinds[d][row]) for d in decoders) + " |" for row in rows]
    lines.append("| all wrong | " + " | ".join(str(sum(kinds[d].values())) for d in decoders) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="output directory of a `cold eval` run")
    args = parser.parse_args()
    try:
        print(table(mistake_kinds(args.run_dir)))
    except ColdError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
