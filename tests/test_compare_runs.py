"""scripts/compare_runs.py: two `cold eval` runs of the same problems, decoder by decoder or as a chosen pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def write_run(run: Path, decoder: str, filename: str, correct: list[bool], outputs: list[str]) -> None:
    """A run directory holding one decoder's records, in `cold eval`'s record format."""
    (run / "records").mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": str(i), "decoder": decoder, "output": out, "answer": {"flexible": out, "strict": None},
         "correct": {"flexible": ok, "strict": False}}
        for i, (ok, out) in enumerate(zip(correct, outputs))
    ]
    (run / "records" / filename).write_text("".join(json.dumps(r) + "\n" for r in rows))


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_same_label_and_chosen_pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, "expert", "expert.jsonl", [True, False, False, False], ["x", "y", "z", "w"])
    write_run(a, "cold@0.1/0.5", "cold.jsonl", [True, True, False, False], ["x", "x", "z", "w"])
    write_run(b, "expert", "expert.jsonl", [True, True, True, False], ["x", "q", "q", "w"])

    same = compare(str(a), str(b))
    assert same.returncode == 0, same.stderr
    row = next(line for line in same.stdout.splitlines() if line.startswith("| expert |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["4", "25.0%", "75.0%"]
    assert cells[4].startswith("+50.0")
    assert cells[5:] == ["50.0%", "50.0%"]  # outputs x and w identical
    assert "cold@0.1/0.5" not in same.stdout  # only in the first run

    paired = compare(str(a), str(b), "--pair", "cold@0.1/0.5,expert")
    assert paired.returncode == 0, paired.stderr
    row = next(line for line in paired.stdout.splitlines() if line.startswith("| cold@0.1/0.5 / expert |"))
    assert [c.strip() for c in row.strip("|").split("|")][2:4] == ["50.0%", "75.0%"]


def test_bad_pair_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, "expert", "expert.jsonl", [True], ["x"])
    write_run(b, "expert", "expert.jsonl", [True], ["x"])
    one = compare(str(a), str(b), "--pair", "expert")
    assert one.returncode != 0 and "two decoder labels" in one.stderr
    missing = compare(str(a), str(b), "--pair", "expert,cold@0.1/0.5")
    assert missing.returncode != 0 and "no decoder 'cold@0.1/0.5'" in missing.stderr and "it has expert" in missing.stderr
