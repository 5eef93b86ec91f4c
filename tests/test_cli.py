"""`cold generate` from the shell: output formats, prompt sources, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cold.cli import app
from cold.decoding.engine import Engine
from cold.load.adapters import read_adapter
from conftest import make_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_lora(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-lora")
    make_lora(tiny.model, path, r=4, alpha=8, seed=11)
    return path


def run(*args, input=None):
    return runner.invoke(app, ["generate", *map(str, args)], input=input)


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_json_output_matches_the_python_api(tiny, tiny_dir, tiny_lora):
    result = run("--model", tiny_dir, "--adapter", f"mine={tiny_lora}", "--json", "-n", 6, "hello there", "one two three")
    assert result.exit_code == 0, result.output
    got = records(result)
    engine = Engine(tiny, [read_adapter(tiny_lora, "mine")])
    expected = engine.generate(["hello there", "one two three"], decoder="cold", max_new_tokens=6)
    assert [r["prompt"] for r in got] == ["hello there", "one two three"]
    assert [r["token_ids"] for r in got] == [g.token_ids for g in expected]
    assert [r["text"] for r in got] == [g.text for g in expected]
    assert all(r["finish_reason"] in ("stop", "length") for r in got)


def test_an_adapter_as_the_amateur(tiny_dir, tiny_lora):
    """--amateur NAME runs that adapter on the amateur row: the expert's own adapter there makes the
    score the expert's logits, so CoLD decodes as the expert (and, against the base, it does not)."""
    common = ["--model", tiny_dir, "--adapter", f"final={tiny_lora}", "--adapter", f"early={tiny_lora}", "--use", "final",
              "--json", "-n", 8, "--beta", 4, "hello there", "one two three"]
    expert = [r["token_ids"] for r in records(run(*common, "--decoder", "expert"))]
    versus = run(*common, "--amateur", "early")
    assert versus.exit_code == 0, versus.output
    assert [r["token_ids"] for r in records(versus)] == expert
    assert [r["token_ids"] for r in records(run(*common))] != expert
    unknown = run(*common, "--amateur", "middle")
    assert unknown.exit_code == 2 and "neither a loaded adapter (final, early)" in unknown.output
    not_cold = run(*common, "--decoder", "expert", "--amateur", "early")
    assert not_cold.exit_code == 2 and "--amateur and --amateur-scale apply to --decoder cold only" in not_cold.output


def test_prompts_from_jsonl_and_stdin(tiny_dir, tiny_lora, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"question": "first"}) + "\n" + json.dumps({"question": "second"}) + "\n")
    from_file = run("--model", tiny_dir, "--adapter", tiny_lora, "--json", "-n", 3, "--input", jsonl, "--field", "question")
    assert from_file.exit_code == 0, from_file.output
    assert [r["prompt"] for r in records(from_file)] == ["first", "second"]
    from_stdin = run("--model", tiny_dir, "--adapter", tiny_lora, "--json", "-n", 3, input="first\nsecond\n")
    assert from_stdin.exit_code == 0, from_stdin.output
    assert [r["token_ids"] for r in records(from_stdin)] == [r["token_ids"] for r in records(from_file)]


def test_stream_json_events_add_up(tiny_dir, tiny_lora):
    whole = records(run("--model", tiny_dir, "--adapter", tiny_lora, "--json", "-n", 5, "--decoder", "expert", "abc"))[0]
    result = run("--model", tiny_dir, "--adapter", tiny_lora, "--json", "--stream", "-n", 5, "--decoder", "expert", "abc")
    assert result.exit_code == 0, result.output
    events = records(result)
    assert sum((e["token_ids"] for e in events), []) == whole["token_ids"]
    assert "".join(e["text"] for e in events) == whole["text"]
    assert events[-1]["finish_reason"] == whole["finish_reason"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--alpha", "0", "x"], "alpha must be in (0, 1]"),
        (["--beta", "-1", "x"], "beta must be in [0, 100]"),
        (["--beta", "1e300", "x"], "beta must be in [0, 100], got 1e+300"),
        (["--sample", "--expert-scale", "1e30", "x"], "expert_scale must be in [-10, 10]"),
        (["--amateur-scale", "-1e9", "x"], "amateur_scale must be in [-10, 10]"),
        (["--seed", "1180591620717411303424", "--sample", "x"], "seed must be an integer in [0, 2**63 - 1]"),
        (["--top-p", "1.5", "x"], "top_p must be in (0, 1]"),
        (["--top-k", "-1", "x"], "top_k must be an integer >= 0"),
        (["--device", "nonsense", "x"], "--device 'nonsense' is not a device"),
        (["--device", "meta", "x"], "cold runs on cpu or cuda"),
        (["--sample", "--temperature", "0", "x"], "temperature must be > 0"),
        (["-n", "0", "x"], "max_new_tokens must be"),
        (["--input", "/nonexistent.jsonl"], "file not found"),
        (["--adapter", "/nonexistent-adapter", "x"], "directory not found"),
        (["--kv-dtype", "int8", "x"], "is not one of"),
        (["--dtype", "int3", "x"], "dtype 'int3' is not one of auto, float32"),
        (["--engine", "vllm", "--kv-dtype", "bfloat16", "x"], "--kv-dtype applies to --engine cold"),
    ],
)
def test_errors_are_one_clear_line(tiny_dir, args, message):
    result = run("--model", tiny_dir, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_input_that_is_not_utf8_or_not_a_file(tiny_dir, tiny_lora, tmp_path):
    """Invalid UTF-8 in an --input file, and a directory as --input: one error line each (issue 21)."""
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n\xff\n')
    for target, message in ((bad, "not valid UTF-8"), (tmp_path, "is a directory, not a JSONL file")):
        result = run("--model", tiny_dir, "--adapter", tiny_lora, "--input", target)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert "Traceback" not in result.output + result.stderr


def test_bad_jsonl_line_names_the_line(tiny_dir, tiny_lora, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{oops\n')
    result = run("--model", tiny_dir, "--adapter", tiny_lora, "--input", bad)
    assert result.exit_code == 2 and "bad.jsonl:2" in result.stderr


def test_real_command_on_the_default_model():
    """The installed `cold` console script, default model and demo adapter, chat template."""
    cold = os.path.join(os.path.dirname(sys.executable), "cold")
    proc = subprocess.run(
        [cold, "generate", "--chat", "--json", "-n", "24", "What is 2 + 3?"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["prompt"] == "What is 2 + 3?" and record["text"].strip()
    assert 1 <= len(record["token_ids"]) <= 24
