"""`cold eval`: task readers, answer extraction, bootstrap statistics, decoder specs, resumable runs."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cold.cli import app
from cold.errors import ColdError
from cold.evaluation import report, stats
from cold.evaluation.decoders import DecoderSpec, parse_decoder, parse_decoders
from cold.evaluation.runner import RecordFile, open_run_dir, run_decoders
from cold.load.paths import fingerprint
from cold.tasks.extract import extract, is_correct, normalize_gold, normalize_number
from cold.tasks.prompts import EXEMPLARS, make_style
from cold.tasks.readers import TASKS, Problem, data_root, get_task, read_jsonl, select
from conftest import make_lora

runner = CliRunner()
DATA = data_root()
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file(), reason="../shared/data not present")


# ---- readers on the real files ---------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "task,split,count,start,gold",
    [
        ("gsm8k", "test", 1319, "Janet’s ducks lay 16 eggs per day.", "18"),
        ("gsm8k", "train", 7473, "Natalia sold clips to 48 of her friends", "72"),
        ("multiarith", "test", 600, "For Halloween Debby and her sister combined", "39"),
        ("singleeq", "test", 508, "Joan found 70 seashells on the beach.", "43"),
        ("coin_flip", "test", 500, "A coin is heads up. Whitney flips the coin.", "yes"),
        ("last_letters", "test", 500, 'Take the last letters of each words in "Whitney Erika Tj Benito"', "yajo"),
        ("commonsenseqa", "dev", 1221, "A revolving door is convenient for two direction travel", "A"),
        ("commonsenseqa", "train", 9741, "The sanctions against the school were a punishing blow", "A"),
    ],
)
def test_readers_on_the_shared_files(task, split, count, start, gold):
    t = get_task(task)
    problems = t.read(t.path(split))
    assert len(problems) == count  # the counts of ../shared/data/README.md
    first = problems[0]
    assert first.id == "0" and first.question.startswith(start) and first.gold == gold
    assert [p.id for p in problems[:3]] == ["0", "1", "2"]
    if split == "dev":
        assert first.choices == (("A", "bank"), ("B", "library"), ("C", "department store"), ("D", "mall"), ("E", "new york"))
        assert all(p.gold in {label for label, _ in p.choices} for p in problems)
    assert all(p.gold == normalize_gold(p.gold, t.answer_type, [c for c, _ in p.choices]) for p in problems)


def test_default_splits_and_unknown_names():
    assert get_task("commonsenseqa").default_split == "dev"
    assert get_task("gsm8k").default_split == "test"
    with pytest.raises(ColdError, match="unknown task 'gsm9k'; tasks: gsm8k, .*jsonl"):
        get_task("gsm9k")
    with pytest.raises(ColdError, match="has no split 'valid'; splits: train, test"):
        get_task("gsm8k").path("valid")
    with pytest.raises(ColdError, match="file not found"):
        get_task("gsm8k").path(data="/nonexistent/test.jsonl")


def _write(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_malformed_rows_are_reported_with_their_line(tmp_path):
    gsm = get_task("gsm8k")
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    with pytest.raises(ColdError, match=r"bad\.jsonl:2: not valid JSON"):
        gsm.read(_write(tmp_path / "bad.jsonl", [good, "{oops"]))
    with pytest.raises(ColdError, match=r"missing\.jsonl:3: no field 'question' \(fields: answer\)"):
        gsm.read(_write(tmp_path / "missing.jsonl", [good, good, {"answer": "#### 3"}]))
    with pytest.raises(ColdError, match=r"nofinal\.jsonl:1: field 'answer' has no '#### N'"):
        gsm.read(_write(tmp_path / "nofinal.jsonl", [{"question": "q", "answer": "it is 4"}]))
    with pytest.raises(ColdError, match=r"row 1: field 'lSolutions\[0\]' = 'many' is not a valid number"):
        get_task("multiarith").read(_write(tmp_path / "m.json", [json.dumps([{"sQuestion": "q", "lSolutions": [1.0]}, {"sQuestion": "q", "lSolutions": ["many"]}])]))
    with pytest.raises(ColdError, match="no problems"):
        gsm.read(_write(tmp_path / "empty.jsonl", []))


def test_generic_jsonl_reader(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        {"q": {"text": "Is it?"}, "a": "Yes"},
        {"q": {"text": "Is it not?"}, "a": "no"},
    ])
    problems = read_jsonl(path, "q.text", "a", "yesno")
    assert [(p.id, p.question, p.gold) for p in problems] == [("0", "Is it?", "yes"), ("1", "Is it not?", "no")]
    mc = _write(tmp_path / "mc.jsonl", [{"question": "Pick", "options": ["red", "blue"], "label": "B"}])
    (p,) = read_jsonl(mc, "question", "label", "choice", "options")
    assert p.choices == (("A", "red"), ("B", "blue")) and p.gold == "B"
    with pytest.raises(ColdError, match=r"mine\.jsonl:1: no field 'question' \(fields: a, q\)"):
        read_jsonl(path, "question", "a", "yesno")
    with pytest.raises(ColdError, match="'a' = 'Yes' is not a valid number answer"):
        read_jsonl(path, "q.text", "a", "number")
    with pytest.raises(ColdError, match="needs --choices-field"):
        read_jsonl(mc, "question", "label", "choice")
    with pytest.raises(ColdError, match="--answer-type must be one of"):
        get_task("jsonl", answer_type="float")


def test_seeded_sample_is_stable_nested_and_in_file_order():
    problems = [Problem(str(i), f"q{i}", "1") for i in range(50)]
    ten = select(problems, 10, seed=0)
    assert [p.id for p in ten] == [p.id for p in select(problems, 10, seed=0)]
    assert [int(p.id) for p in ten] == sorted(int(p.id) for p in ten)
    assert {p.id for p in ten} <= {p.id for p in select(problems, 20, seed=0)}  # a larger limit extends it
    assert {p.id for p in ten} != {p.id for p in select(problems, 10, seed=1)}
    assert select(problems, None, 0) == problems and select(problems, 99, 0) == problems


# ---- answer extraction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,strict,flexible",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
        ("The answer is $1,234.00.", "1234", "1234"),
        ("#### 18.0", "18", "18"),
        ("3 + 4 = 7. The answer is 7.", "7", "7"),
        ("The final answer is: **-2.50**", "-2.5", "-2.5"),
        ("She has 16 - 3 - 4 = 9 eggs left.", None, "9"),  # no announced answer: strict finds nothing
        ("#### 18\n\nQuestion: how many? 5", "18", "5"),  # strict takes the first announced answer
        ("I do not know.", None, None),
        ("1,000 people and 16-4", None, "4"),  # the "-" of 16-4 is a minus, not a sign
    ],
)
def test_number_extraction(text, strict, flexible):
    assert extract(text, "number", "strict") == strict
    assert extract(text, "number", "flexible") == flexible


def test_number_normalisation():
    assert normalize_number("$1,234.00") == "1234" == normalize_number("1234.") == normalize_number(1234.0)
    assert normalize_number("18.0") == normalize_number("18") == normalize_number(18.0) == "18"
    assert normalize_number("0.50") == "0.5" and normalize_number("-0") == "0"
    assert normalize_number("abc") is None and normalize_number("nan") is None
    assert normalize_gold("Work...\n#### 1,000", "number") == "1000"
    assert is_correct(extract("The answer is 18.0.", "number", "strict"), "18")
    assert not is_correct(None, "18")


def test_yes_no_letters_and_strings():
    assert extract("The answer is no. Well, yes.", "yesno", "strict") == "no"
    assert extract("The answer is no. Well, yes.", "yesno", "flexible") == "yes"
    assert extract("It is heads up, so Yes", "yesno", "strict") is None
    assert extract("It is heads up, so Yes", "yesno", "flexible") == "yes"
    assert extract("Nobody knows", "yesno", "flexible") is None  # "no" inside a word does not count
    choices = (("A", "bank"), ("B", "library"), ("C", "mall"))
    assert extract("The answer is (B).", "choice", "strict", choices) == "B"
    assert extract("The answer is c", "choice", "strict", choices) is None  # bare lower-case letter: not a label
    assert extract("A library, so (C) is wrong and B is right", "choice", "flexible", choices) == "C"
    assert extract("A library lends books, so B", "choice", "flexible", choices) == "B"  # the article "A" is skipped
    assert extract("A revolving door is at a bank.", "choice", "flexible", choices) == "A"  # by the choice text
    assert extract("The answer is (D).", "choice", "strict", choices) is None  # not one of the labels
    assert extract('The answer is "yajo".', "text", "strict") == "yajo"
    assert extract("so it is YAJO.", "text", "flexible") == "yajo"


# ---- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_interval_of_an_accuracy():
    values = [1] * 30 + [0] * 70
    ci = stats.bootstrap_mean(values, seed=0)
    assert ci.value == pytest.approx(0.3) and 0.2 < ci.low < 0.3 < ci.high < 0.4
    assert ci == stats.bootstrap_mean(values, seed=0)  # seeded
    assert stats.bootstrap_mean([1, 1, 1]) == stats.Interval(1.0, 1.0, 1.0)


def test_paired_bootstrap_difference():
    a = [1] * 60 + [0] * 40
    b = [1] * 30 + [0] * 70  # a is right on 30 more problems and never worse
    diff = stats.paired_difference(a, b)
    assert diff.value == pytest.approx(0.3) and diff.excludes_zero() and diff.low > 0.2
    same = stats.paired_difference(a, a)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert stats.discordant(a, b) == (30, 0)
    noisy = stats.paired_difference([1, 0] * 20, [0, 1] * 20)  # as many wins as losses
    assert noisy.value == 0 and noisy.low < 0 < noisy.high
    with pytest.raises(ValueError):
        stats.paired_difference([1, 0], [1])


# ---- decoder specs ---------------------------------------------------------------------------


def test_decoder_specs():
    specs = parse_decoders("base, expert,expert@1.5,cold,cold@0.10/0.25,cold-logprob@0.1/0.5,cold@0.1/0.5:beam4")
    assert [s.label for s in specs] == [
        "base", "expert", "expert@1.5", "cold@0.1/0.5", "cold@0.1/0.25", "cold-logprob@0.1/0.5", "cold@0.1/0.5:beam4",
    ]
    assert specs[0].generate_kwargs() == {"decoder": "base", "num_beams": 1}
    assert specs[2].generate_kwargs() == {"decoder": "expert", "num_beams": 1, "expert_scale": 1.5}
    assert specs[5].generate_kwargs() == {"decoder": "cold", "num_beams": 1, "alpha": 0.1, "beta": 0.5, "scoring": "logprob"}
    assert specs[6].generate_kwargs()["num_beams"] == 4 and specs[6].filename == "cold@0.1_0.5-beam4.jsonl"
    assert parse_decoder("expert@1") == DecoderSpec("expert") and parse_decoder("expert@2.0").label == "expert@2"
    assert not specs[0].needs_adapter and specs[1].needs_adapter
    versus = parse_decoders("cold:amateur,cold-logprob@0.3/1:amateur:beam2")
    assert [s.label for s in versus] == ["cold@0.1/0.5:amateur", "cold-logprob@0.3/1:amateur:beam2"]
    assert versus[0].generate_kwargs()["vs_amateur"] and "vs_amateur" not in specs[3].generate_kwargs()
    assert versus[1].filename == "cold-logprob@0.3_1-amateur-beam2.jsonl"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("greedy", "expected base | expert"),
        ("cold@0.1", "expected cold@ALPHA/BETA"),
        ("cold@0/0.5", "alpha must be in (0, 1], got 0"),
        ("cold@0.1/-1", "beta must be in [0, 100], got -1"),
        ("cold@0.1/1e300", "beta must be in"),
        ("expert@1e30", "expert_scale must be in"),
        ("cold@a/0.5", "ALPHA must be a number"),
        ("expert@inf", "SCALE must be a finite number"),
        ("base@2", "'base' takes no arguments"),
        ("expert:beam1", "N >= 2"),
        ("expert:amateur", "':amateur' applies to cold and cold-logprob only"),
        ("cold:beam2:amateur", "a cold spec may also end in :amateur"),
        ("cold,cold@0.1/0.5", "'cold@0.1/0.5' is given twice"),
        (" , ", "--decoders is empty"),
    ],
)
def test_bad_decoder_specs(spec, message):
    with pytest.raises(ColdError, match=re.escape(message)):
        parse_decoders(spec)


# ---- prompts ---------------------------------------------------------------------------------


def test_prompt_styles():
    p = Problem("0", "Where is it?", "B", (("A", "here"), ("B", "there")))
    chat = make_style("chat")
    assert chat.chat and chat.stop == () and chat.render(p) == "Where is it?\nAnswer Choices: (A) here (B) there"
    zero = make_style("zero-shot", instruction="Answer with a letter.")
    assert zero.render(p) == "Question: Where is it?\nAnswer Choices: (A) here (B) there\nAnswer with a letter.\nAnswer:"
    few = make_style("few-shot", "arithmetic", shots=2)
    text = few.render(Problem("1", "2+2?", "4"))
    assert text.startswith("Question: " + EXEMPLARS["arithmetic"][0][0]) and text.endswith("\n\nQuestion: 2+2?\nAnswer:")
    assert text.count("Question:") == 3 and few.stop == ("\nQuestion:",)
    own = make_style("few-shot", "", shots=1, own_exemplars=[p])
    assert own.render(Problem("1", "Why?", "A", p.choices)).startswith("Question: Where is it?\nAnswer Choices: (A) here (B) there\nAnswer: The answer is (B).\n\n")
    for family, shots in EXEMPLARS.items():  # every exemplar is scored right by the strict rule
        task = next(t for t in TASKS.values() if t.family == family)
        for question, answer in shots:
            assert extract(answer, task.answer_type, "strict") is not None
    with pytest.raises(ColdError, match="only 4 built-in exemplars"):
        make_style("few-shot", "arithmetic", shots=5)


# ---- runner with a fake engine ---------------------------------------------------------------


@dataclass
class _Out:
    text: str
    token_ids: list
    finish_reason: str
    amateur_steps: int | None = None


class _FakeEngine:
    """Answers every question with its own number of characters; counts prompts generated."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, **kwargs):
        self.calls.append((list(prompts), kwargs))
        return [_Out(f"The answer is {len(p) % 3}.", [1, 2, 3], "stop") for p in prompts]


def test_runner_resumes_and_survives_a_cut_line(tmp_path):
    problems = [Problem(str(i), "x" * i, str(i % 3)) for i in range(7)]
    specs = parse_decoders("expert,cold@0.1/0.5")
    style = make_style("zero-shot")
    engine = _FakeEngine()
    results, generated = run_decoders(engine, problems[:4], specs, style, "number", tmp_path, max_new_tokens=8, batch_size=3)
    assert generated == {"expert": 4, "cold@0.1/0.5": 4} and len(engine.calls) == 4  # 2 batches per decoder
    assert engine.calls[0][1] == {"chat": False, "stop": ("\nQuestion:",), "max_new_tokens": 8, "decoder": "expert",
                                  "num_beams": 1, "expert_scale": 1.0}
    assert [r["id"] for r in results["expert"]] == ["0", "1", "2", "3"]
    # an interrupted append leaves half a line: it is ignored and regenerated
    path = tmp_path / "records" / "expert.jsonl"
    path.write_text(path.read_text() + '{"id": "4", "outp')
    engine.calls.clear()
    results, generated = run_decoders(engine, problems, specs, style, "number", tmp_path, max_new_tokens=8, batch_size=3)
    assert generated == {"expert": 3, "cold@0.1/0.5": 3}
    assert sorted(RecordFile(path).load()) == [str(i) for i in range(7)]
    engine.calls.clear()
    results, generated = run_decoders(engine, problems, specs, style, "number", tmp_path, max_new_tokens=8, batch_size=3)
    assert generated == {"expert": 0, "cold@0.1/0.5": 0} and engine.calls == []
    r = results["expert"][5]
    assert r["prompt"] == "Question: xxxxx\nAnswer:" and r["answer"] == {"strict": str(len(r["prompt"]) % 3), "flexible": str(len(r["prompt"]) % 3)}
    assert r["correct"]["strict"] == (r["answer"]["strict"] == r["gold"])


class _AmateurEngine(_FakeEngine):
    """Like _FakeEngine, and CoLD's answers say that one of their three steps needed the amateur."""

    def generate(self, prompts, **kwargs):
        outputs = super().generate(prompts, **kwargs)
        for out in outputs:
            out.amateur_steps = 1 if kwargs["decoder"] == "cold" else None
        return outputs


def test_records_carry_the_amateur_fraction_and_older_records_without_it_resume(tmp_path):
    problems = [Problem(str(i), "x" * i, str(i % 3)) for i in range(4)]
    specs = parse_decoders("expert,cold@0.1/0.5")
    style = make_style("zero-shot")
    run_decoders(_FakeEngine(), problems[:2], specs, style, "number", tmp_path, max_new_tokens=8, batch_size=2)
    for spec in specs:  # records written before the field existed
        store = RecordFile(tmp_path / "records" / spec.filename)
        old = [{k: v for k, v in r.items() if not k.startswith("amateur_")} for r in store.load().values()]
        store.rewrite(old)
    results, generated = run_decoders(_AmateurEngine(), problems, specs, style, "number", tmp_path, max_new_tokens=8, batch_size=2)
    assert generated == {"expert": 2, "cold@0.1/0.5": 2}
    cold = {r["id"]: r for r in results["cold@0.1/0.5"]}
    assert "amateur_fraction" not in cold["0"] and (cold["2"]["amateur_steps"], cold["2"]["amateur_fraction"]) == (1, 1 / 3)
    assert all(r.get("amateur_fraction") is None for r in results["expert"])
    summary = report.summarize(results, n_boot=100)
    assert [d["amateur_fraction"] for d in summary["decoders"]] == [None, pytest.approx(1 / 3)]
    header, rows = report.decoder_rows(summary, amateur=True)
    assert header[-1] == "amateur steps" and [row[-1] for row in rows] == ["-", "33.3%"]
    assert "amateur steps: mean over problems" in report.markdown(summary) and "| amateur steps |" in report.markdown(summary)
    assert report.amateur_line(summary).endswith("more than one token): cold@0.1/0.5 33.3%.")
    no_cold = report.summarize({"expert": results["expert"]}, n_boot=100)
    assert "amateur steps" not in report.decoder_rows(no_cold, amateur=True)[0] and "amateur steps" not in report.markdown(no_cold)


def test_run_dir_refuses_other_settings(tmp_path):
    with open_run_dir(tmp_path, {"prompt": "chat", "data": "/a"}, informational=("data",)) as first:
        assert not (tmp_path / "run.json").exists()  # nothing is written before the run starts
        first.start()
    open_run_dir(tmp_path, {"prompt": "chat", "data": "/b"}, informational=("data",))  # paths may differ
    with pytest.raises(ColdError, match="holds a run with other settings \\(prompt: 'chat' there, 'few-shot' now\\)"):
        open_run_dir(tmp_path, {"prompt": "few-shot", "data": "/a"}, informational=("data",))


def test_two_runs_never_write_into_one_out(tmp_path):
    """While one run writes into OUT, a second is refused (before the fix both stored every record)."""
    problems = [Problem(str(i), "x" * i, str(i % 3)) for i in range(4)]
    specs, style = parse_decoders("expert"), make_style("zero-shot")
    refusals = []

    class Meddling(_FakeEngine):  # starts a second run into the same OUT from inside the first one's batch
        def generate(self, prompts, **kwargs):
            with pytest.raises(ColdError, match="another run is writing into it") as refused:
                run_decoders(_FakeEngine(), problems, specs, style, "number", open_run_dir(tmp_path, {"x": 1}),
                             max_new_tokens=8, batch_size=4)
            refusals.append(refused)
            return super().generate(prompts, **kwargs)

    with open_run_dir(tmp_path, {"x": 1}) as first:
        results, generated = run_decoders(Meddling(), problems, specs, style, "number", first, max_new_tokens=8, batch_size=4)
    assert len(refusals) == 1 and generated == {"expert": 4}
    assert len((tmp_path / "records" / "expert.jsonl").read_text().splitlines()) == 4
    results, generated = run_decoders(_FakeEngine(), problems, specs, style, "number", open_run_dir(tmp_path, {"x": 1}),
                                      max_new_tokens=8, batch_size=4)
    assert generated == {"expert": 0}  # the lock went with the first run


# ---- the command, end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-lora")
    make_lora(tiny.model, path, r=4, alpha=8, seed=5)
    return path


def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_an_eval_that_fails_on_its_adapter_leaves_nothing_and_runs_once_it_is_fixed(tiny_dir, tiny_lora, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    adapter, out = tmp_path / "adapter", tmp_path / "run"
    shutil.copytree(tiny_lora, adapter)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    args = ["--task", "jsonl", "--data", data, "--model", tiny_dir, "--adapter", adapter, "--decoders", "expert",
            "-n", 2, "--out", out]
    broken = _eval(*args)
    assert broken.exit_code == 2 and "corrupt or unreadable" in broken.output and not out.exists()
    (adapter / "adapter_model.safetensors").write_bytes(weights)  # fixed in place
    fixed = _eval(*args)
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((out / "run.json").read_text())["adapter_sha1"] == fingerprint(adapter)


@needs_data
def test_eval_end_to_end_on_the_tiny_model_then_resumes(tiny_dir, tiny_lora, tmp_path, monkeypatch):
    out = tmp_path / "run"
    decoders = "base,expert,expert@2,cold@0.1/0,cold@0.1/0.5,cold-logprob@0.1/0.5,expert:beam2"
    args = ["--task", "coin_flip", "--model", tiny_dir, "--adapter", tiny_lora, "--prompt", "zero-shot", "-n", 6,
            "--limit", 3, "--batch-size", 2, "--decoders", decoders, "--out", out]
    result = _eval(*args)
    assert result.exit_code == 0, result.output
    labels = decoders.split(",")
    records = {}
    for label in labels:
        lines = (out / "records" / parse_decoder(label).filename).read_text().splitlines()
        records[label] = [json.loads(line) for line in lines]
        assert len(lines) == 3
    ids = [r["id"] for r in records["base"]]
    for label in labels:
        assert sorted(r["id"] for r in records[label]) == sorted(ids)  # the same problems for every decoder
        for r in records[label]:
            assert r["decoder"] == label and r["gold"] in ("yes", "no") and set(r["answer"]) == set(r["correct"]) == {"strict", "flexible"}
            assert 1 <= r["tokens"] <= 6 and r["time_s"] > 0 and r["hit_max"] == (r["finish_reason"] == "length")
            assert r["prompt"].startswith("Question: A coin is heads up.") and r["prompt"].endswith("\nAnswer:")
    for label in labels:  # CoLD's records say how many steps needed the amateur; the others' are null
        for r in records[label]:
            if label.startswith("cold"):
                assert 0 <= r["amateur_steps"] <= r["tokens"] and 0 <= r["amateur_fraction"] <= 1
                assert r["amateur_fraction"] == pytest.approx(r["amateur_steps"] / r["tokens"])
            else:
                assert r["amateur_steps"] is None and r["amateur_fraction"] is None
    by_id = {label: {r["id"]: r["output"] for r in records[label]} for label in labels}
    assert by_id["cold@0.1/0"] == by_id["expert"]  # beta = 0 is plain expert decoding
    summary = json.loads((out / "summary.json").read_text())
    assert [d["decoder"] for d in summary["decoders"]] == labels and summary["headline"] == "flexible"
    assert [d["amateur_fraction"] is not None for d in summary["decoders"]] == [label.startswith("cold") for label in labels]
    assert len(summary["pairs"]) == len(labels) * (len(labels) - 1) // 2
    same = next(p for p in summary["pairs"] if p["a"] == "cold@0.1/0" and p["b"] == "expert")
    assert (same["flexible"]["value"], same["flexible"]["low"], same["flexible"]["high"]) == (0, 0, 0)
    markdown = (out / "summary.md").read_text()
    assert "| decoder | n | accuracy (flexible, headline) |" in markdown and "## Paired differences (flexible)" in markdown
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy (flexible, headline)" in result.stdout and "cold@0.1/0.5 − expert" in result.stdout
    assert "Steps that needed the amateur" in result.stdout and "| amateur steps |" in markdown
    before = {p.name: p.read_bytes() for p in (out / "records").iterdir()}

    # rerun: everything is resumed from the records, the model is not even loaded
    from cold.decoding.engine import Engine

    def refuse(*_, **__):
        raise AssertionError("a resumed run generated again")

    monkeypatch.setattr(Engine, "load", classmethod(refuse))
    again = _eval(*args)
    assert again.exit_code == 0, again.output
    assert "nothing to generate" in again.output
    assert {p.name: p.read_bytes() for p in (out / "records").iterdir()} == before
    assert json.loads((out / "summary.json").read_text())["decoders"] == summary["decoders"]

    # other settings in the same directory are refused
    other = _eval(*[a if a != 6 else 7 for a in args])
    assert other.exit_code == 2 and "holds a run with other settings (max_new_tokens: 6 there, 7 now)" in other.output


@needs_data
def test_eval_with_a_bfloat16_kv_cache_records_it_and_keeps_it_apart(tiny_dir, tiny_lora, tmp_path):
    out = tmp_path / "kv"
    args = ["--task", "coin_flip", "--model", tiny_dir, "--adapter", tiny_lora, "--prompt", "zero-shot", "-n", 4,
            "--limit", 2, "--decoders", "expert,cold", "--out", out]
    result = _eval(*args, "--kv-dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kv_dtype"] == "bfloat16" and "--kv-dtype bfloat16" in summary["command"]
    assert "(KV cache bfloat16)" in (out / "summary.md").read_text()
    default = _eval(*args)  # the float32 cache's records must not mix with these
    assert default.exit_code == 2 and "holds a run with other settings" in default.output


@needs_data
def test_an_amateur_adapter_replaces_the_base_model_on_marked_decoders(tiny, tiny_dir, tiny_lora, tmp_path):
    """The amateur row runs the --amateur-adapter: with the expert's own adapter there, the amateur's
    logits equal the expert's, so the score is the expert's and CoLD's outputs are the expert's (at a
    beta where contrasting with the base model does change them)."""
    out = tmp_path / "versus"
    decoders = "expert,cold@0.1/4,cold@0.1/4:amateur"
    args = ["--task", "coin_flip", "--model", tiny_dir, "--adapter", tiny_lora, "--prompt", "zero-shot", "-n", 6,
            "--limit", 4, "--decoders", decoders, "--out", out]
    result = _eval(*args, "--amateur-adapter", tiny_lora)
    assert result.exit_code == 0, result.output
    outputs = {label: [json.loads(line)["output"] for line in (out / "records" / parse_decoder(label).filename).read_text().splitlines()]
               for label in decoders.split(",")}
    assert outputs["cold@0.1/4:amateur"] == outputs["expert"]
    assert outputs["cold@0.1/4"] != outputs["expert"]  # so the line above could fail
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amateur_adapter"] == summary["adapter"] and summary["amateur_scale"] == 1.0
    assert f"--amateur-adapter {tiny_lora}" in summary["command"]

    other = tmp_path / "other-lora"
    make_lora(tiny.model, other, r=4, alpha=8, seed=6)
    again = _eval(*args, "--amateur-adapter", other)  # another amateur must not mix with these records
    assert again.exit_code == 2 and "holds a run with other settings (amateur_adapter_sha1" in again.output


@needs_data
def test_eval_on_the_real_model_with_its_demo_adapter(tmp_path):
    out = tmp_path / "real"
    result = _eval("--task", "gsm8k", "--limit", 2, "-n", 24, "--decoders", "expert,cold", "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2" and summary["adapter"].endswith("smollm2-gsm8k")
    assert [d["n"] for d in summary["decoders"]] == [2, 2] and summary["pairs"][0]["a"] == "cold@0.1/0.5"
    for line in (out / "records" / "expert.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["chat"] and r["output"] and r["tokens"] <= 24


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "gsm9k"], "unknown task 'gsm9k'"),
        (["--decoders", "expert,cold@0.1"], "bad decoder spec 'cold@0.1'"),
        (["--data", "/nonexistent/test.jsonl"], "--data /nonexistent/test.jsonl: file not found"),
        (["--task", "jsonl"], "--task jsonl needs --data"),
        (["--adapter", "/nonexistent-adapter"], "--adapter /nonexistent-adapter: directory not found"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--split", "valid"], "has no split 'valid'"),
        (["--kv-dtype", "int8"], "'int8' is not one of"),
        (["--decoders", "expert,cold:amateur"], "decoders cold@0.1/0.5:amateur contrast with an amateur adapter; give it with --amateur-adapter"),
        (["--amateur-adapter", "/nonexistent-adapter"], "--amateur-adapter is used only by cold decoders marked :amateur"),
        (["--decoders", "cold:amateur", "--amateur-adapter", "/nonexistent-adapter"], "--amateur-adapter /nonexistent-adapter: directory not found"),
        (["--amateur-scale", "0.5"], "--amateur-scale applies to the --amateur-adapter; give that too"),
    ],
)
def test_errors_are_one_clear_line(args, message, tmp_path):
    result = _eval(*args, "--out", tmp_path / "never")
    assert result.exit_code == 2
    assert message in result.output and result.output.startswith("error: ") and result.output.count("\n") == 1


def test_a_field_that_does_not_exist(tmp_path):
    data = _write(tmp_path / "mine.jsonl", [{"q": "2+2?", "a": 4}])
    result = _eval("--task", "jsonl", "--data", data, "--answer-field", "a", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "mine.jsonl:1: no field 'question' (fields: a, q)" in result.output
