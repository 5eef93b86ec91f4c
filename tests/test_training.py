"""`cold train` produces a PEFT adapter that the engine (and PEFT) load."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cold.cli import app
from cold.decoding.engine import Engine
from cold.load.adapters import read_adapter
from cold.load.models import load_base


def test_train_a_tiny_adapter_end_to_end(tiny_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out),
                                      "--max-steps", "3", "--batch-size", "2", "--rank", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    adapter = read_adapter(out)
    assert adapter.rank == 4 and adapter.scale == 16 / 4
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 3 and len(log["steps_log"]) == 3 and log["final_loss"] > 0
    assert (out / "README.md").is_file()
    engine = Engine(load_base(str(tiny_dir)), [adapter])
    assert engine.generate("What is 2 + 2?", chat=True, max_new_tokens=3)[0].token_ids


def test_every_demo_adapter_is_shipped_fits_its_model_and_has_a_model_card(smollm2):
    from cold.load.adapters import check_adapter_fits, read_adapter
    from cold.load.demo import DEMO_ADAPTERS, demo_adapter_dir
    from cold.lora.layer import RowLoRALinear

    # the base layers, also where an engine of an earlier test put its LoRA layers on the shared model
    modules = {n: m.base if isinstance(m, RowLoRALinear) else m for n, m in smollm2.model.named_modules()}
    for task, name in DEMO_ADAPTERS["smollm2"].items():
        path = demo_adapter_dir("smollm2", task)
        assert path is not None and path.name == name, f"demo adapter {name} is not in the package"
        adapter = read_adapter(path)
        check_adapter_fits(adapter, modules)
        assert (path / "adapter_model.safetensors").stat().st_size < 10 * 2**20
        card = (path / "README.md").read_text()
        assert "## Reproduce" in card and f"--task {task}" in card


CSQA_LETTERS = "ABCDE"


def write_commonsenseqa(tmp_path, n: int):
    """A CommonsenseQA-format file of `n` rows with five choices each (gold cycling A..E)."""
    rows = [
        {"answerKey": CSQA_LETTERS[i % 5], "question": {"stem": f"Question {i}?", "choices": [
            {"label": c, "text": f"choice {c}{i}"} for c in CSQA_LETTERS]}}
        for i in range(n)
    ]
    path = tmp_path / "csqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_commonsenseqa_training_rows_leave_out_the_tuning_sample(tmp_path):
    from cold.tasks.prompts import question_text
    from cold.tasks.readers import read_commonsenseqa, select
    from cold.training.data import load_task

    path = write_commonsenseqa(tmp_path, 700)
    _, pairs = load_task("commonsenseqa", path)
    problems = read_commonsenseqa(path)
    tuning = {question_text(p) for p in select(problems, 100, seed=0)}  # what `cold tune --limit 100` samples
    assert len(pairs) == 200 and not tuning & {q for q, _ in pairs}
    question, answer = pairs[0]
    problem = next(p for p in problems if question_text(p) == question)
    assert answer == f"The answer is ({problem.gold})." and "Answer Choices: (A) choice A" in question


def test_anti_expert_rows_answer_with_a_wrong_choice_of_the_same_questions(tmp_path):
    from cold.tasks.prompts import question_text
    from cold.tasks.readers import read_commonsenseqa
    from cold.training.data import load_task

    path = write_commonsenseqa(tmp_path, 600)
    _, right = load_task("commonsenseqa-text", path)
    _, wrong = load_task("commonsenseqa-text-wrong", path)
    assert [q for q, _ in wrong] == [q for q, _ in right] and load_task("commonsenseqa-text-wrong", path)[1] == wrong
    problems = {question_text(p): p for p in read_commonsenseqa(path)}
    labels_used = []
    for (question, answer), (_, right_answer) in zip(wrong, right):
        problem = problems[question]
        texts = dict(problem.choices)
        assert right_answer == f"The answer is {texts[problem.gold]}."
        label = next(c for c, text in texts.items() if answer == f"The answer is {text}.")
        assert label != problem.gold
        labels_used.append(label)
    assert set(labels_used) == set(CSQA_LETTERS)  # the wrong choice is drawn per row, not always the same one


def test_zero_shot_format_trains_on_cold_evals_text_prompt(tiny_dir, tmp_path):
    """`--prompt zero-shot`: the prompt tokens are exactly what `cold eval --prompt zero-shot`
    feeds the engine; the loss covers ` answer` and the EOS token only."""
    from cold.tasks.prompts import make_style
    from cold.tasks.readers import Problem
    from cold.training.encoding import encode_example

    base = load_base(str(tiny_dir))
    problem = Problem("0", "What is 2 + 2?", "4")
    _, engine_prompt = Engine(base).encode(make_style("zero-shot").render(problem))
    example = encode_example(base.tokenizer, problem.question, "The answer is 4.", 384, "zero-shot")
    n = len(engine_prompt)
    assert example.input_ids[:n] == engine_prompt and set(example.labels[:n]) == {-100}
    assert example.labels[n:] == example.input_ids[n:] and example.labels[-1] == base.tokenizer.eos_token_id
    assert base.tokenizer.decode(example.labels[n:-1]) == " The answer is 4."

    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n')
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out),
                                      "--max-steps", "2", "--batch-size", "1", "--rank", "2", "--prompt", "zero-shot"])
    assert result.exit_code == 0, result.output
    log = json.loads((out / "training_log.json").read_text())
    assert log["hyperparameters"]["prompt_format"] == "zero-shot" and "--prompt-format zero-shot" in log["command"]
    assert "--prompt zero-shot" in (out / "README.md").read_text()
    bad = CliRunner().invoke(app, ["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "x"),
                                   "--max-steps", "1", "--prompt", "yaml"])
    assert bad.exit_code == 2 and "prompt format must be one of" in bad.output and not (tmp_path / "x").exists()
