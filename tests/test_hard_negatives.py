"""cold.training.hard_negatives and scripts/hard_negatives.py: the expert's most tempting wrong choice as a
CommonsenseQA row's label."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cold.tasks.readers import read_commonsenseqa, select
from cold.training import hard_negatives
from cold.training.data import TUNING_RESERVE, load_commonsenseqa
from cold.training.encoding import completion_ids, prompt_ids
from conftest import SCRIPTS, make_lora

SCRIPT = SCRIPTS / "hard_negatives.py"


def test_cached_choice_scores_equal_full_forward(tiny, tmp_path):
    """Prompt once, then every answer on the repeated cache == each prompt + answer run whole (PEFT)."""
    peft_model = make_lora(tiny.model, tmp_path / "lora")
    tok = tiny.tokenizer
    prompt = prompt_ids(tok, "Where do you keep milk?\nAnswer Choices: (A) shelf (B) fridge", "zero-shot")
    answers = ["The answer is shelf.", "The answer is a cold refrigerator.", "The answer is B."]
    with torch.inference_mode():
        got = hard_negatives.choice_scores(peft_model, tok, prompt, answers, "zero-shot")
        for answer, score in zip(answers, got):
            completion = completion_ids(tok, answer, "zero-shot")[:-1]
            logprobs = torch.log_softmax(peft_model(input_ids=torch.tensor([prompt + completion])).logits[0].float(), -1)
            want = sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion))
            assert abs(score - want) < 1e-3 * max(1.0, abs(want))
    assert len(set(round(s, 3) for s in got)) == 3  # the answers really are told apart


def test_deciding_token_scores(tiny, tmp_path):
    """The token after the shared `The answer is` ranks the answers, as greedy decoding's choice there;
    answers that also share that token are left to the full scores (None)."""
    peft_model = make_lora(tiny.model, tmp_path / "lora")
    tok = tiny.tokenizer
    hn = hard_negatives
    prompt = prompt_ids(tok, "Where do you keep milk?", "zero-shot")
    answers = ["The answer is shelf.", "The answer is fridge.", "The answer is table."]
    with torch.inference_mode():
        got = hn.deciding_token_scores(peft_model, tok, prompt, answers, "zero-shot")
        shared = prompt + completion_ids(tok, "The answer is", "zero-shot")[:-1]
        logprobs = torch.log_softmax(peft_model(input_ids=torch.tensor([shared])).logits[0, -1].float(), -1)
        want = [logprobs[tok(" " + w, add_special_tokens=False).input_ids[0]].item() for w in ("shelf", "fridge", "table")]
        assert got == pytest.approx(want, abs=1e-4)
        tied = ["The answer is red car.", "The answer is red bus.", "The answer is blue car."]
        assert hn.deciding_token_scores(peft_model, tok, prompt, tied, "zero-shot") is None
        assert len(hn.deciding_token_scores(peft_model, tok, prompt, tied[:2], "zero-shot")) == 2  # `red` is shared


def test_relabels_every_row_but_the_reserved_ones(tiny, tiny_dir, tmp_path):
    make_lora(tiny.model, tmp_path / "lora")
    rows = [
        {"id": f"q{i}", "answerKey": "ABC"[i % 3],
         "question": {"stem": f"Question {i}?", "choices": [{"label": c, "text": f"{c.lower()}{i}"} for c in "ABC"]}}
        for i in range(TUNING_RESERVE + 8)
    ]
    data, out = tmp_path / "train.jsonl", tmp_path / "hard.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_dir), "--adapter", str(tmp_path / "lora"),
                           "--prompt", "zero-shot", "--data", str(data), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "8 rows relabelled" in done.stdout
    written = [json.loads(line) for line in out.read_text().splitlines()]
    reserved = {int(p.id) for p in select(read_commonsenseqa(data), TUNING_RESERVE, seed=0)}  # row numbers
    assert [r["id"] for r in written] == [r["id"] for r in rows]  # same rows, same order: same reserve
    for index, (before, after) in enumerate(zip(rows, written)):
        if index in reserved:
            assert after == before
        else:
            assert after["goldKey"] == before["answerKey"] != after["answerKey"] in "ABC"
    # the training loader drops the reserved rows and trains on the relabelled choices' text
    pairs = load_commonsenseqa(out, answer_text=True)
    relabelled = [r for index, r in enumerate(written) if index not in reserved]
    assert sorted(a for _, a in pairs) == sorted(f"The answer is {r['answerKey'].lower()}{r['id'][1:]}." for r in relabelled)


def test_a_malformed_train_file_gets_one_clear_line_and_no_output(tiny_dir, tmp_path):
    data, out = tmp_path / "train.jsonl", tmp_path / "hard.jsonl"
    data.write_text('{"answerKey": "A", "question": {"stem": "Q?", "choices": [{"label": "A", "text": "a"}]}}\nnot json\n')
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_dir), "--adapter", str(tmp_path / "none"),
                           "--data", str(data), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode != 0
    assert f"{data}:2: not valid JSON" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
