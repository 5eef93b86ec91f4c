"""Split a task file (a JSON list, an object holding one, or JSONL) into seeded, disjoint parts in the same format, so that a
task with only a test file (MultiArith, SingleEq) gets training, tuning and test problems for
`cold anti-expert --task TASK --data ... --tune-data ... --test-data ...`.

    python scripts/split_file.py ../shared/data/multiarith/MultiArith.json --parts train=300,tune=100,test=180 \
        --unique sQuestion --out runs/data/multiarith

writes runs/data/multiarith/{train,tune,test}.json: rows drawn without replacement from one seeded
shuffle, each part in the file's order. `--unique FIELD` first keeps one row per text of FIELD
(compared as `cold anti-expert` compares questions: case and spacing ignored), so that no question
lands in two parts. Fewer rows than the parts ask for is an error.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def read_rows(path: Path) -> tuple[list, str | None]:
    """The file's rows, and its format: "jsonl", None (a JSON list) or the key of the one list in a
    JSON object (Kojima et al.'s {"examples": [...]})."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()], "jsonl"
    data = json.loads(text)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        key = next(iter(data))
        return data[key], key
    if not isinstance(data, list):
        sys.exit(f"{path}: expected a JSON list of rows, or an object holding one")
    return data, None


def write_rows(path: Path, rows: list, form: str | None) -> None:
    """Write `rows` in the format `read_rows` found."""
    if form == "jsonl":
        body = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        body = json.dumps(rows if form is None else {form: rows}, indent=1) + "\n"
    path.write_text(body, encoding="utf-8")


def unique_rows(rows: list, field: str) -> list:
    """The first row of each text of `field`, in order."""
    seen, kept = set(), []
    for row in rows:
        key = " ".join(str(row.get(field, "")).split()).lower()
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def parse_parts(text: str) -> dict[str, int]:
    """'train=300,tune=100' -> {'train': 300, 'tune': 100}."""
    parts = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        if not name or not count.isdigit() or int(count) < 1 or name in parts:
            sys.exit(f"--parts: expected NAME=COUNT,... with distinct names and counts >= 1, got {item!r}")
        parts[name] = int(count)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--parts", required=True, help="NAME=COUNT,... (e.g. train=300,tune=100,test=200)")
    parser.add_argument("--out", type=Path, required=True, help="directory for NAME.json / NAME.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unique", metavar="FIELD", help="keep one row per text of FIELD (case and spacing ignored)")
    args = parser.parse_args()
    rows, form = read_rows(args.file)
    if args.unique:
        rows = unique_rows(rows, args.unique)
    parts = parse_parts(args.parts)
    if sum(parts.values()) > len(rows):
        sys.exit(f"{args.file} has {len(rows)} rows; the parts ask for {sum(parts.values())}")
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    args.out.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, count in parts.items():
        chosen = [rows[i] for i in sorted(order[start:start + count])]
        start += count
        path = args.out / f"{name}.{'jsonl' if form == 'jsonl' else 'json'}"
        write_rows(path, chosen, form)
        print(f"wrote {path} ({count} rows)")


if __name__ == "__main__":
    main()
