"""scripts/split_file.py: seeded, disjoint parts of a task file in its own format, which the task's reader reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cold.tasks import readers

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "split_file.py"


def split(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_parts_are_disjoint_sized_and_readable_by_the_task(tmp_path):
    rows = [{"sQuestion": f"What is {i} plus 1?", "lSolutions": [i + 1.0]} for i in range(30)]
    rows += [{"sQuestion": f"what is  {i} plus 1? ", "lSolutions": [i + 1.0]} for i in range(5)]  # repeats
    source = tmp_path / "mawps.json"
    source.write_text(json.dumps(rows))
    too_many = split(str(source), "--parts", "train=12,tune=5,test=14", "--out", str(tmp_path / "no"), "--unique", "sQuestion")
    assert too_many.returncode != 0 and "has 30 rows" in too_many.stderr
    done = split(str(source), "--parts", "train=12,tune=5,test=8", "--out", str(tmp_path / "out"), "--seed", "3",
                 "--unique", "sQuestion")
    assert done.returncode == 0, done.stderr
    parts = {name: readers.read_mawps(tmp_path / "out" / f"{name}.json") for name in ("train", "tune", "test")}
    assert {name: len(p) for name, p in parts.items()} == {"train": 12, "tune": 5, "test": 8}
    questions = [{" ".join(p.question.split()).lower() for p in problems} for problems in parts.values()]
    assert sum(map(len, questions)) == len(set().union(*questions)) == 25
    again = split(str(source), "--parts", "train=12,tune=5,test=8", "--out", str(tmp_path / "again"), "--seed", "3",
                  "--unique", "sQuestion")
    assert again.returncode == 0 and (tmp_path / "again" / "tune.json").read_text() == (tmp_path / "out" / "tune.json").read_text()


def test_an_object_holding_the_rows_keeps_its_shape(tmp_path):
    source = tmp_path / "last_letters.json"
    source.write_text(json.dumps({"examples": [{"question": f"Take the last letters of \"A{i} B\".", "answer": "b"} for i in range(9)]}))
    done = split(str(source), "--parts", "train=5,test=4", "--unique", "question", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert [len(readers.read_last_letters(tmp_path / "out" / f"{n}.json")) for n in ("train", "test")] == [5, 4]


def test_jsonl_stays_jsonl_and_too_many_rows_is_an_error(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(6)))
    done = split(str(source), "--parts", "a=2,b=4", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out" / "b.jsonl").read_text().splitlines()) == 4
    refused = split(str(source), "--parts", "a=2,b=5", "--out", str(tmp_path / "no"))
    assert refused.returncode != 0 and "has 6 rows; the parts ask for 7" in refused.stderr
    assert not (tmp_path / "no").exists()
