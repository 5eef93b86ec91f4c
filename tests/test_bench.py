"""`cold bench` runs on a tiny model and writes well-formed JSON, PNG and Markdown (never: is it fast)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from cold.bench import cells as bench_cells
from cold.bench import run as bench
from cold.cli import app
from cold.errors import ColdError
from cold.load.demo import demo_adapter_dir
from cold.tasks.prompts import make_style
from cold.tasks.readers import get_task
from conftest import make_lora

runner = CliRunner()

TINY = ["--prompt-tokens", "8", "--new-tokens", "3", "--threads", "1", "--bandwidth-mb", "8"]
NUMBERS = ("prefill_ms", "step_ms", "step_p90_ms", "tokens_per_s_per_prompt", "tokens_per_s_total", "peak_rss_mb",
           "floor_ms", "floor_fraction", "weight_bytes_per_step", "vs_expert", "vs_cold_naive")


@pytest.fixture(scope="module")
def tiny_lora(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-lora")
    make_lora(tiny.model, path, r=4, alpha=8, seed=3)
    return path


def test_decoder_names_match_the_cells():
    assert bench.DECODER_NAMES == tuple(bench_cells.DECODERS)
    assert bench.DEFAULT_DECODER_NAMES == bench_cells.DEFAULT_DECODERS


def test_step_bench_writes_json_png_and_markdown(tiny_dir, tiny_lora, tmp_path):
    report_path, png, md = tmp_path / "out" / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    result = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--adapter", str(tiny_lora), "--batch-sizes", "2,1",
                                 "--repeats", "2", "--warmup", "1", *TINY,
                                 "--json", str(report_path), "--plot", str(png), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["schema"] == "cold-bench/1" and report["mode"] == "steps"
    assert report["command"].startswith("cold bench --model ")
    assert report["settings"]["batch_sizes"] == [1, 2]
    assert report["machine"]["threads"] == 1 and report["memory"]["isolated"] is True
    assert report["bandwidth"]["copy_gbps"] > 0 and len(report["bandwidth"]["measurements"]) == 3
    assert report["info"]["weight_bytes"] > 0 and report["info"]["lora_bytes"] > 0

    rows = report["rows"]
    assert [(r["decoder"], r["batch_size"]) for r in rows] == [
        (d, b) for b in (1, 2) for d in bench_cells.DEFAULT_DECODERS
    ]
    for r in rows:
        for key in NUMBERS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["decoder"], key)
        assert r["step_p90_ms"] >= r["step_ms"]
        assert r["body_ms"] is None or 0 < r["body_ms"] <= r["step_ms"] * 1.01
        assert r["tokens_per_s_total"] == pytest.approx(r["batch_size"] * r["tokens_per_s_per_prompt"])
        assert r["floor_ms"] == pytest.approx(r["weight_bytes_per_step"] / (report["bandwidth"]["copy_gbps"] * 1e9) * 1e3)
        assert len(r["step_ms_repeat_medians"]) == 2 and r["processes"] == 2  # one process per repeat
    by = {(r["decoder"], r["batch_size"]): r for r in rows}
    assert by[("expert", 1)]["vs_expert"] == pytest.approx(1.0)
    assert by[("cold-naive", 2)]["vs_cold_naive"] == pytest.approx(1.0)
    # the LoRA is counted where it is read, not where it is merged away
    assert by[("cold", 1)]["weight_bytes_per_step"] == by[("expert-merged", 1)]["weight_bytes_per_step"] + report["info"]["lora_bytes"]
    assert by[("cold", 1)]["agreement_with"] == "cold-naive" and 0 <= by[("cold", 1)]["agreement"] <= 1
    assert {t["target"] for t in report["targets"]} >= {"cold step / expert step, batch 1", "cold fraction of the bandwidth floor, batch 1"}

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    height, width, _ = plt.imread(png).shape
    assert width > 400 and height > 200
    text = md.read_text()
    assert report["command"] in text and "| cold-peft-mixed | 2 |" in text
    assert "cold-naive" in result.stdout and "step ms" in result.stdout


def _expert_and_cold_at_batch_1(tiny_dir, tiny_lora, tmp_path, *options) -> tuple:
    """(CLI result, JSON report) of a one-round step-mode run of expert and cold with extra options."""
    report_path = tmp_path / "report.json"
    result = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--adapter", str(tiny_lora), "--batch-sizes", "1",
                                 "--repeats", "1", "--warmup", "1", "--decoders", "expert,cold", *options,
                                 "--no-isolate", *TINY, "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    return result, json.loads(report_path.read_text())


def test_kv_dtype_reaches_the_engine_decoders_and_the_report(tiny_dir, tiny_lora, tmp_path):
    result, report = _expert_and_cold_at_batch_1(tiny_dir, tiny_lora, tmp_path, "--kv-dtype", "bfloat16")
    assert report["settings"]["kv_dtype"] == "bfloat16" and "--kv-dtype bfloat16" in report["command"]
    assert "KV cache bfloat16" in result.stdout
    assert [r["decoder"] for r in report["rows"]] == ["expert", "cold"]


def test_cobatch_policies_are_rows_of_their_own_in_step_mode(tiny_dir, tiny_lora, tmp_path):
    result, report = _expert_and_cold_at_batch_1(tiny_dir, tiny_lora, tmp_path, "--cobatch-steps", "0,always")
    assert [(r["decoder"], r["kind"], r["cobatch_steps"]) for r in report["rows"]] == [
        ("expert", "expert", None), ("cold K=0", "cold", 0), ("cold always", "cold", "always")]
    assert report["settings"]["cobatch_steps"] == [0, "always"] and "--cobatch-steps 0,always" in report["command"]
    targets = {t["target"] for t in report["targets"]}
    assert {"cold K=0 step / expert step, batch 1", "cold always step / expert step, batch 1"} <= targets
    assert "cold K=0" in result.stdout and "cold always" in result.stdout


@pytest.mark.parametrize("refill", [False, True])
def test_e2e_mode_reports_wall_time_and_lengths(tiny_dir, tiny_lora, tmp_path, refill):
    problems = tmp_path / "gsm8k.jsonl"
    problems.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in ("1+1?", "2+3?", "Why?")))
    report_path, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    result = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--adapter", str(tiny_lora), "--e2e", "3",
                                 "--e2e-file", str(problems), "--e2e-batch-size", "2", "--new-tokens", "4", "--threads", "1",
                                 "--no-isolate", "--json", str(report_path), "--plot", str(png)]
                                + (["--e2e-refill"] if refill else []))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["mode"] == "e2e" and report["memory"]["isolated"] is False
    assert [r["decoder"] for r in report["rows"]] == ["expert", "cold"]
    assert report["settings"]["e2e_task"] == "gsm8k" and f"--e2e-task gsm8k --e2e-file {problems}" in report["command"]
    for r in report["rows"]:
        assert r["problems"] == 3 and len(r["lengths"]) == 3 and all(1 <= n <= 4 for n in r["lengths"])
        assert r["ms_per_token"] == pytest.approx(r["wall_s"] * 1e3 / r["tokens"])
        assert (r["amateur_fraction"] is None) == (r["decoder"] == "expert")
        assert r["tokens"] == sum(r["lengths"]) and r["wall_s"] > 0 and 0 <= r["hit_max_fraction"] <= 1
        assert 0 < r["prefill_s"] < r["wall_s"] and r["decode_s"] == pytest.approx(r["wall_s"] - r["prefill_s"])
        # one group (a process) of at least 16 problems: static batches of 2 and 1 in it; refill: up to 8 at once
        assert len(r["batch_wall_s"]) == 1 and r["wall_s"] == pytest.approx(r["batch_wall_s"][0])
        if refill:
            assert max(r["lengths"]) <= r["steps"] <= sum(r["lengths"])
        else:
            assert r["steps"] == max(r["lengths"][:2]) + r["lengths"][2]
    assert report["paired"]["expert_hit_max"] >= report["paired"]["of_which_cold_stopped"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_on_coin_flip_reports_the_amateur_fraction_per_policy(tiny_dir, tiny_lora, tmp_path):
    report_path, md = tmp_path / "coin.json", tmp_path / "coin.md"
    result = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--adapter", str(tiny_lora), "--e2e", "2",
                                 "--e2e-task", "coin_flip", "--e2e-batch-size", "2", "--new-tokens", "4", "--threads", "1",
                                 "--cobatch-steps", "0,always", "--no-isolate", "--json", str(report_path), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["settings"]["e2e_task"] == "coin_flip" and report["settings"]["e2e_file"].endswith("coin_flip/coin_flip.json")
    assert "--e2e-task coin_flip" in report["command"] and "--cobatch-steps 0,always" in report["command"]
    assert [(r["decoder"], r["cobatch_steps"]) for r in report["rows"]] == [("expert", None), ("cold K=0", 0), ("cold always", "always")]
    for r in report["rows"]:
        assert r["problems"] == 2 and r["ms_per_token"] > 0
        if r["decoder"] == "expert":
            assert r["amateur_fraction"] is None and r["amateur_steps"] is None
        else:
            assert 0 <= r["amateur_fraction"] <= 1 and r["amateur_steps"] == sum(r["amateur_steps_per_problem"])
            assert all(0 <= a <= n for a, n in zip(r["amateur_steps_per_problem"], r["lengths"]))
    assert report["paired"]["cold"] == "cold K=0"
    assert any(line.startswith("| decoder |") and "| wall s | ms/token | amateur % |" in line for line in md.read_text().splitlines())
    assert "amateur %" in result.stdout and "ms/token" in result.stdout


def test_e2e_prompts_and_adapter_are_cold_evals_for_the_task(tmp_path):
    task = get_task("coin_flip")
    name, path = bench.e2e_source("coin_flip", None)
    assert (name, path) == ("coin_flip", str(task.path("test")))
    problems = task.read(task.path("test"))
    assert bench.e2e_prompts("coin_flip", path, 2) == [make_style("chat", task.family).render(p) for p in problems[:2]]
    assert bench._resolve_adapter("smollm2", None, tmp_path, "coin_flip") == (str(demo_adapter_dir("smollm2", "coin_flip")), None)
    with pytest.raises(ColdError, match="--e2e-task gsm8k: model 'gemma3' has no demo adapter for it"):
        bench._resolve_adapter("gemma3", None, tmp_path, "gsm8k")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--decoders", "cold,fast"], "fast"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--batch-sizes", "a,b"], "--batch-sizes"),
        (["--repeats", "0"], "--repeats"),
        (["--e2e", "2", "--decoders", "cold-naive"], "cold-naive"),
        (["--adapter", "/nonexistent/lora"], "--adapter"),
        (["--dtype", "float64"], "float64"),
        (["--kv-dtype", "bfloat16"], "--kv-dtype applies to our engine's decoders"),
        (["--kv-dtype", "int8", "--decoders", "expert,cold"], "int8"),
        (["--cobatch-steps", "-1"], "--cobatch-steps: '-1' is not a policy; give integers >= 0 or 'always'"),
        (["--cobatch-steps", "0,sometimes"], "--cobatch-steps: 'sometimes' is not a policy"),
        (["--cobatch-steps", ","], "--cobatch-steps: no policy given"),
        (["--cobatch-steps", "0", "--decoders", "expert,base"], "--cobatch-steps applies to the cold and llamacpp-cold decoders"),
        (["--e2e", "2", "--e2e-task", "chess"], "--e2e-task chess: not a built-in task"),
        (["--e2e-task", "coin_flip"], "--e2e-task and --e2e-file apply to end-to-end mode"),
        (["--e2e", "2", "--e2e-file", "/nonexistent/test.jsonl"], "--e2e-file /nonexistent/test.jsonl: file not found"),
    ],
)
def test_bad_options_are_refused_with_a_clear_error(args, message):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output
