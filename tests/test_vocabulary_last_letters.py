"""scripts/vocabulary_last_letters.py: last-letters problems over vocabulary words, test words left out."""

from __future__ import annotations

import json

from cold.tasks.readers import read_last_letters
from cold.training.data import load_worked_examples
from conftest import load_script


def test_words_are_whole_capitalised_tokens_without_test_words(smollm2):
    script = load_script("vocabulary_last_letters")
    tokenizer = smollm2.tokenizer
    everything = script.vocabulary_words(tokenizer, set())
    assert "Paris" in everything and "the" not in everything and "The" in everything
    for word in everything[::50]:
        assert word.isalpha() and word[0].isupper() and 2 <= len(word) <= 10
        assert tokenizer.encode(" " + word, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids("Ġ" + word)]
    exclude = script.excluded_words()
    assert {"Alma", "Dilan"} <= exclude  # the few-shot exemplars' words, and the test file's where it is there
    assert not set(script.vocabulary_words(tokenizer, exclude)) & exclude


def test_splits_are_deterministic_distinct_and_readable(tmp_path):
    script = load_script("vocabulary_last_letters")
    words = [f"W{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]
    train, again = script.problems(words, "train", 300), script.problems(words, "train", 300)
    tune = script.problems(words, "tune", 100)
    assert train == again and len({p["question"] for p in train}) == 300
    assert not {p["question"] for p in train} & {p["question"] for p in tune}
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"examples": tune}), encoding="utf-8")
    first = tune[0]
    quoted = first["question"].split('"')[1].split()
    assert first["answer"] == "".join(w[-1] for w in quoted)
    assert first["worked"].endswith(f"The answer is {first['answer']}.")
    assert load_worked_examples(path)[0] == (first["question"], first["worked"])  # `cold train --data`
    assert read_last_letters(path)[0].gold == first["answer"]  # `cold eval --data`
