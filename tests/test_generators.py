"""Generated symbolic tasks: correct gold answers, fixed splits that share no question, and their
use by `cold eval` (split files) and `cold train` (worked answers)."""

from __future__ import annotations

import json
import re

import pytest

from cold.errors import ColdError
from cold.tasks import generators
from cold.tasks.extract import extract, is_correct
from cold.tasks.prompts import EXEMPLARS
from cold.tasks.readers import get_task
from cold.training.data import load_task


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLD_CACHE_DIR", str(tmp_path / "cache"))


def _coin_gold(question: str) -> str:
    """Independent of the generator: count the flips in the text."""
    flips = len(re.findall(r"\b\w+ flips the coin\.", question))
    return "yes" if flips % 2 == 0 else "no"


def _letters_gold(question: str) -> str:
    names = re.search(r'"([^"]+)"', question).group(1).split()
    return "".join(name[-1].lower() for name in names)


@pytest.mark.parametrize("task, gold_of, answer_type", [("coin_flip", _coin_gold, "yesno"), ("last_letters", _letters_gold, "text")])
def test_gold_answers_and_worked_answers_agree(task, gold_of, answer_type):
    problems = generators.generate(task, "gen-tune")
    assert len(problems) == generators.SPLIT_SIZES["gen-tune"]
    for g in problems:
        assert g.answer == gold_of(g.question)
        for rule in ("strict", "flexible"):  # the training target is scored correct by both rules
            assert is_correct(extract(g.worked, answer_type, rule), g.answer)
    # worded like the public test files (and the few-shot exemplars)
    public_start = EXEMPLARS[task][0][0].split(" ")[0:3]
    assert all(g.question.split(" ")[0:3] == public_start for g in problems)


def test_coin_flip_answers_are_balanced_and_names_avoid_the_exemplars():
    answers = [g.answer for g in generators.generate("coin_flip", "gen-test")]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    exemplar_text = " ".join(q + " " + a for shots in EXEMPLARS.values() for q, a in shots)
    exemplar_names = set(re.findall(r"\b[A-Z][a-z]+\b", exemplar_text))
    assert not exemplar_names & set(generators.NAMES)


def test_splits_are_deterministic_and_share_no_question():
    splits = {s: [g.question for g in generators.generate("last_letters", s)] for s in generators.SPLIT_SEEDS}
    assert splits["gen-test"] == [g.question for g in generators.generate("last_letters", "gen-test")]
    for a in splits:
        assert len(set(splits[a])) == len(splits[a])
        for b in splits:
            if a < b:
                assert not set(splits[a]) & set(splits[b]), (a, b)


def test_eval_reads_a_generated_split_from_the_cache(tmp_path):
    task = get_task("coin_flip")
    assert "gen-test" in task.splits and "test" in task.splits
    path = task.path("gen-test")
    assert path.parent == tmp_path / "cache" / "generated"
    problems = task.read(path)
    assert [p.gold for p in problems] == [g.answer for g in generators.generate("coin_flip", "gen-test")]
    assert task.path("gen-test") == path  # written once, then reused
    with pytest.raises(ColdError, match="splits: test, gen-train, gen-tune, gen-test"):
        task.path("nope")
    with pytest.raises(ColdError, match="has no split 'gen-test'"):
        get_task("gsm8k").path("gen-test")


def test_training_reads_worked_answers(tmp_path):
    path, pairs = load_task("last_letters", None)
    assert path.name.startswith("last_letters-gen-train") and len(pairs) == generators.SPLIT_SIZES["gen-train"]
    question, worked = pairs[0]
    assert worked.endswith(f"The answer is {_letters_gold(question)}.")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"examples": [{"question": "q", "answer": "a"}]}))
    with pytest.raises(ColdError, match="worked"):
        load_task("coin_flip", bad)
