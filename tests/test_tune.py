"""`cold tune`: the grid, the choice of the best setting, its outputs, and its errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cold.cli import app
from cold.errors import ColdError
from cold.evaluation import tune
from cold.evaluation.decoders import DecoderSpec, parse_decoder
from conftest import make_lora

runner = CliRunner()


def test_grid_is_expert_then_scales_then_cold_settings():
    specs = tune.grid_specs([0.1, 0.2], [0.5, 1], [1, 1.5], ["logit", "logprob"])
    labels = [s.label for s in specs]
    assert labels[:2] == ["expert", "expert@1.5"]  # scale 1 is expert itself, not repeated
    assert labels[2:] == ["cold@0.1/0.5", "cold@0.1/1", "cold@0.2/0.5", "cold@0.2/1",
                          "cold-logprob@0.1/0.5", "cold-logprob@0.1/1", "cold-logprob@0.2/0.5", "cold-logprob@0.2/1"]
    assert all(parse_decoder(label) == spec for label, spec in zip(labels, specs))  # labels are ordinary eval specs


@pytest.mark.parametrize("text, name, message", [
    ("0.1,x", "alphas", "comma-separated numbers"),
    ("1.5", "alphas", "must be in [0.0, 1.0]"),
    ("-1", "betas", "must be >= 0.0"),
    ("0.5,0.5", "betas", "repeats a value"),
    (",", "scales", "at least one value"),
])
def test_bad_grids_are_refused(text, name, message):
    with pytest.raises(ColdError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tune.parse_grid(text, name, 0.0, 1.0 if name == "alphas" else None)


def _records(pattern: list[bool], tokens: int) -> list[dict]:
    return [{"correct": {"flexible": c, "strict": c}, "tokens": tokens, "hit_max": False} for c in pattern]


def test_best_setting_maximises_accuracy_then_prefers_fewer_tokens_and_smaller_change():
    specs = [DecoderSpec("expert"), DecoderSpec("expert", expert_scale=1.5), DecoderSpec("expert", expert_scale=2),
             DecoderSpec("cold", alpha=0.1, beta=0.5), DecoderSpec("cold", alpha=0.1, beta=1), DecoderSpec("cold", alpha=0.1, beta=2)]
    expert = [True, False, False, True, False, False, True, False]
    results = {
        "expert": _records(expert, 40),
        "expert@1.5": _records(expert, 40),  # ties expert on accuracy and tokens: expert (no change) wins
        "expert@2": _records([False] * 8, 10),
        "cold@0.1/0.5": _records([True, True, False, True, False, False, True, False], 30),
        "cold@0.1/1": _records([True, True, False, True, False, False, True, False], 20),  # same accuracy, fewer tokens
        "cold@0.1/2": _records([True, True, True, True, True, True, True, True], 50),
    }
    summary = tune.summarize(results, specs, "flexible", n_boot=200)
    assert summary["best"] == {"expert": "expert", "cold": "cold@0.1/2"}
    row = next(r for r in summary["settings"] if r["decoder"] == "cold@0.1/2")
    assert row["accuracy"]["value"] == 1.0 and row["vs_expert"]["value"] == pytest.approx(5 / 8)
    assert (row["vs_expert"]["only_this"], row["vs_expert"]["only_expert"]) == (5, 0)
    assert tune.chosen_decoders(summary) == "base,expert,cold@0.1/2"
    results["cold@0.1/2"] = _records([False] * 8, 50)
    assert tune.summarize(results, specs, "flexible", n_boot=200)["best"]["cold"] == "cold@0.1/1"


@pytest.fixture(scope="module")
def tune_lora(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tune-lora")
    make_lora(tiny.model, path, r=4, alpha=8, seed=6)
    return path


def test_tune_end_to_end_on_the_tiny_model(tiny_dir, tune_lora, tmp_path, monkeypatch):
    monkeypatch.setenv("COLD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "tune"
    args = ["tune", "--task", "coin_flip", "--model", tiny_dir, "--adapter", tune_lora, "--prompt", "zero-shot", "-n", 4,
            "--limit", 3, "--batch-size", 3, "--alphas", "0.1,0.5", "--betas", "0,1", "--scales", "2",
            "--scoring", "logit", "--bootstrap", 200, "--out", out]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "tune.json").read_text())
    labels = [r["decoder"] for r in data["settings"]]
    assert labels == ["expert", "expert@2", "cold@0.1/0", "cold@0.1/1", "cold@0.5/0", "cold@0.5/1"]
    assert all(r["n"] == 3 for r in data["settings"])
    run = json.loads((out / "run.json").read_text())
    assert run["split"] == "gen-tune"  # the tuning split, not the test file
    # beta = 0 is expert decoding: identical outputs, so a zero paired difference
    outputs = {label: [json.loads(line)["output"] for line in (out / "records" / parse_decoder(label).filename).read_text().splitlines()]
               for label in ("expert", "cold@0.1/0")}
    assert outputs["expert"] == outputs["cold@0.1/0"]
    zero = next(r for r in data["settings"] if r["decoder"] == "cold@0.1/0")["vs_expert"]
    assert (zero["value"], zero["low"], zero["high"]) == (0, 0, 0)
    assert set(data["best"]) == {"expert", "cold"}
    assert "cold eval --task coin_flip --decoders base,expert" in result.stdout
    next_command = " ".join(result.stdout.split("measure them on the test split:")[1].split())  # unwrapped
    assert f"--model {tiny_dir}" in next_command and "--prompt zero-shot" in next_command  # the same model and prompt
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| decoder | n | accuracy (flexible) |" in (out / "tune.md").read_text()


def test_tune_against_an_amateur_adapter(tiny_dir, tune_lora, tmp_path):
    """--amateur-adapter makes every CoLD cell contrast with that adapter (here the expert's own, so every
    cell decodes as the expert), and the printed eval command carries it on."""
    out = tmp_path / "tune-amateur"
    args = ["tune", "--task", "coin_flip", "--model", tiny_dir, "--adapter", tune_lora, "--amateur-adapter", tune_lora,
            "--prompt", "zero-shot", "-n", 4, "--limit", 2, "--alphas", "0.1", "--betas", "1,4", "--scales", "2",
            "--bootstrap", 200, "--out", out]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "tune.json").read_text())
    assert [r["decoder"] for r in data["settings"]] == ["expert", "expert@2", "cold@0.1/1:amateur", "cold@0.1/4:amateur"]
    outputs = {label: [json.loads(line)["output"] for line in (out / "records" / parse_decoder(label).filename).read_text().splitlines()]
               for label in ("expert", "cold@0.1/1:amateur", "cold@0.1/4:amateur")}
    assert outputs["cold@0.1/1:amateur"] == outputs["cold@0.1/4:amateur"] == outputs["expert"]
    next_command = " ".join(result.stdout.split("measure them on the test split:")[1].split())
    assert f"--amateur-adapter {tune_lora}" in next_command and ":amateur" in next_command


@pytest.mark.parametrize("args, message", [
    (["--task", "multiarith"], "task 'multiarith' has no tuning split; give --split or --data"),
    (["--scoring", "both"], "--scoring must be logit, logprob or logit,logprob"),
    (["--betas", "-1"], "--betas values must be >= 0.0"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--dtype", "int3"], "dtype 'int3' is not one of auto, float32, bfloat16, float16"),
])
def test_tune_errors_are_one_clear_line(args, message, tmp_path):
    result = runner.invoke(app, ["tune", *args, "--out", str(tmp_path / "never")])
    assert result.exit_code == 2
    assert message in result.output and result.output.startswith("error: ")
    assert not (tmp_path / "never").exists()
