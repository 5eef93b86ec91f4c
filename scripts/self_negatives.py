"""The expert's own wrong answers as training data: an anti-expert that learns the expert's
mistakes, to serve as CoLD's amateur.

    cold eval --task last_letters --split gen-train --limit 480 --decoders expert \
        --adapter src/cold/demo_adapters/smollm2-last_letters --out eval-runs/ll-gen-train-expert
    python scripts/self_negatives.py eval-runs/ll-gen-train-expert [MORE_RUNS ...] --out runs/data/ll-self-negatives.json
    cold train --task last_letters --data runs/data/ll-self-negatives.json ...

`scripts/hard_negatives.py` does this for multiple choice (the wrong choice the expert ranks
highest); here the task is generative, so a negative is what the expert actually wrote where the
answer it gives is wrong. The run must be on training problems (a generated `gen-train` split, or
any file the test and tuning splits do not share rows with); a run on a held-out split (`test`,
`dev`, `gen-tune`, `gen-test`) is refused. Each wrong output becomes one example
of the symbolic tasks' training format, {"examples": [{"question", "answer", "worked"}]}, with the
expert's output as `worked` and the right answer kept as `answer`; outputs cut off at the token
limit are left out (they teach length, not the mistake).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cold.errors import ColdError
from cold.evaluation.runner import RECORDS_DIR, RUN_FILE
from cold.tasks.readers import get_task

HELD_OUT_SPLITS = ("test", "dev", "gen-tune", "gen-test")


def self_negatives(run_dir: Path, decoder: str = "expert", rule: str = "flexible") -> tuple[list[dict], dict]:
    """(examples, counts): the decoder's wrong, finished outputs in `run_dir` (the problems it has
    finished so far), each with its problem's question and right answer, read from the run's data
    file by the run's task reader."""
    run_path = run_dir / RUN_FILE
    records_path = run_dir / RECORDS_DIR / f"{decoder}.jsonl"
    for path in (run_path, records_path):
        if not path.is_file():
            raise ColdError(f"{path} not found: give the output directory of a `cold eval` run with decoder {decoder!r}")
    run = json.loads(run_path.read_text(encoding="utf-8"))
    if run.get("split") in HELD_OUT_SPLITS:
        raise ColdError(f"{run_dir} ran on the {run['split']!r} split, which is held out for tuning or testing: "
                        "take negatives from training problems (e.g. --split gen-train)")
    problems = {p.id: p for p in get_task(run["task"]).read(Path(run["data"]))}  # the run's own reader and ids
    examples, counts = [], {"records": 0, "right": 0, "cut off": 0}
    for line in records_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        counts["records"] += 1
        if record["correct"][rule]:
            counts["right"] += 1
        elif record["finish_reason"] == "length":
            counts["cut off"] += 1
        else:
            problem = problems[record["id"]]
            examples.append({"question": problem.question, "answer": problem.gold, "worked": record["output"].strip()})
    counts["negatives"] = len(examples)
    return examples, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="output directories of `cold eval` runs on training problems (their negatives are pooled)")
    parser.add_argument("--out", type=Path, required=True, help="training file to write (JSON)")
    parser.add_argument("--decoder", default="expert", help="the decoder whose mistakes to keep (default: expert)")
    parser.add_argument("--rule", default="flexible", choices=["flexible", "strict"], help="extraction rule that decides right or wrong")
    args = parser.parse_args()
    examples, counts = [], {}
    try:
        for run_dir in args.run_dirs:
            found, run_counts = self_negatives(run_dir, args.decoder, args.rule)
            examples += found
            counts = {k: counts.get(k, 0) + v for k, v in run_counts.items()}
    except ColdError as exc:
        sys.exit(f"error: {exc}")
    if not examples:
        sys.exit(f"error: no wrong, finished outputs in {', '.join(map(str, args.run_dirs))} ({counts})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"examples": examples}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: {counts['negatives']} negatives from {counts['records']} outputs "
          f"({counts['right']} right, {counts['cut off']} cut off at the token limit)")


if __name__ == "__main__":
    main()
