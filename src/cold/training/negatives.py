"""An expert's own wrong answers as training data: what an anti-expert learns, to serve as CoLD's amateur.

    examples, counts = self_negatives(Path("eval-runs/cf50-gen-train-expert"))   # a `cold eval` run's records
    write_negatives(examples, Path("runs/data/negatives.json"))

A negative is what the expert actually wrote where the answer it gives is wrong. The run must be on
training problems (a generated `gen-train` split, or any file the test and tuning splits share no
rows with); a run on a held-out split (`test`, `dev`, `gen-tune`, `gen-test`) is refused. Outputs
cut off at the token limit are left out (they teach length, not the mistake). Each negative is one
example of the symbolic tasks' training format, {"examples": [{"question", "answer", "worked"}]},
with the expert's output as `worked` and the right answer kept as `answer`; `cold.training.data`
reads it for any generative task (`load_worked_examples`).
"""

from __future__ import annotations

import json
from pathlib import Path

from cold.errors import ColdError
from cold.tasks.readers import get_task

HELD_OUT_SPLITS = ("test", "dev", "gen-tune", "gen-test")
RUN_FILE, RECORDS_DIR = "run.json", "records"  # a `cold eval` run directory (cold.evaluation.runner)


def self_negatives(run_dir: Path, decoder: str = "expert", rule: str = "flexible") -> tuple[list[dict], dict]:
    """(examples, counts): the decoder's wrong, finished outputs in `run_dir` (the problems it has
    finished so far), each with its problem's question and right answer, read from the run's data
    file by the run's task reader. `counts`: records, right, cut off, negatives."""
    run_path = run_dir / RUN_FILE
    records_path = run_dir / RECORDS_DIR / f"{decoder}.jsonl"
    for path in (run_path, records_path):
        if not path.is_file():
            raise ColdError(f"{path} not found: give the output directory of a `cold eval` run with decoder {decoder!r}")
    run = json.loads(run_path.read_text(encoding="utf-8"))
    if run.get("split") in HELD_OUT_SPLITS:
        raise ColdError(f"{run_dir} ran on the {run['split']!r} split, which is held out for tuning or testing: "
                        "take negatives from training problems (e.g. --split gen-train)")
    task = get_task(run["task"], run.get("question_field", "question"), run.get("answer_field", "answer"),
                    run.get("answer_type", "number"), run.get("choices_field"))
    problems = {p.id: p for p in task.read(Path(run["data"]))}  # the run's own reader and ids
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


def write_negatives(examples: list[dict], path: Path) -> None:
    """The training file of `examples` ({"examples": [...]}, the format `load_worked_examples` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"examples": examples}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
