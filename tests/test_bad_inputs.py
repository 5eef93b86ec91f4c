"""The catalogue of bad inputs: every one gets one clear error and changes nothing on disk.

Command-line inputs (generate, eval, tune, train, bench, serve) must exit with status 2 and print
exactly one `error:` line naming the problem, with no traceback; the Python API raises ColdError;
the HTTP API answers an OpenAI-style error JSON with a 4xx status and keeps serving. After each
case the test's files, the working directory and the cache directory are as they were.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cold.cli import app
from cold.decoding.engine import Engine
from cold.errors import ColdError
from cold.load.adapters import read_adapter
from cold.load.paths import cache_dir
from cold.serve.app import ServerConfig, create_app
from conftest import ServerThread, load_script, make_lora

runner = CliRunner()


# ---- the files the cases refer to ------------------------------------------------------------


def _edited_adapter(good: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of `good` with config entries changed and/or its tensors transformed."""
    shutil.copytree(good, dst)
    if config is not None:
        changed = {**json.loads((dst / "adapter_config.json").read_text()), **config}
        (dst / "adapter_config.json").write_text(json.dumps(changed))  # json writes NaN / Infinity as such
    if tensors is not None:
        weights = load_file(str(dst / "adapter_model.safetensors"))
        save_file(tensors(weights), str(dst / "adapter_model.safetensors"))
    return dst


def _poisoned(value: float):
    def poison(weights: dict) -> dict:
        key = sorted(weights)[0]
        weights[key] = weights[key].clone()
        weights[key].view(-1)[3] = value
        return weights

    return poison


@pytest.fixture(scope="module")
def files(tiny, tiny_dir, tmp_path_factory) -> dict[str, str]:
    """Paths by the names the cases use ({lora}, {nan_alpha}, ...): good inputs and bad ones."""
    root = tmp_path_factory.mktemp("bad-inputs")
    lora = root / "lora"
    make_lora(tiny.model, lora, r=4, alpha=8, seed=5)
    paths = {"root": root, "tiny": tiny_dir, "lora": lora}
    adapters = {
        "nan_alpha": dict(config={"lora_alpha": math.nan}),
        "inf_alpha": dict(config={"lora_alpha": math.inf}),
        "bool_rank": dict(config={"r": True}),
        "zero_rank": dict(config={"r": 0}),
        "dora": dict(config={"use_dora": True}),
        "ia3": dict(config={"peft_type": "IA3"}),
        "nan_tensor": dict(tensors=_poisoned(math.nan)),
        "inf_tensor": dict(tensors=_poisoned(-math.inf)),
        "int_tensor": dict(tensors=lambda w: {k: (v * 100).to(torch.int32) for k, v in w.items()}),
    }
    for name, edit in adapters.items():
        paths[name] = _edited_adapter(lora, root / name, **edit)
    corrupt = paths["corrupt"] = _edited_adapter(lora, root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    paths["no_config"] = _edited_adapter(lora, root / "no_config")
    (paths["no_config"] / "adapter_config.json").unlink()
    paths["config_not_json"] = _edited_adapter(lora, root / "config_not_json")
    (paths["config_not_json"] / "adapter_config.json").write_text("{not json")
    paths["config_list"] = _edited_adapter(lora, root / "config_list")
    (paths["config_list"] / "adapter_config.json").write_text("[1, 2]")
    paths["other_base"] = root / "other_base"  # an adapter whose module shapes fit no layer of the tiny model
    other = load_file(str(lora / "adapter_model.safetensors"))
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 1) if ".lora_A." in k else v for k, v in other.items()},
              str(_edited_adapter(lora, paths["other_base"]) / "adapter_model.safetensors"))

    texts = {
        "good.jsonl": '{"prompt": "hello", "question": "1+1?", "answer": "2"}\n{"prompt": "two", "question": "2+2?", "answer": "4"}\n',
        "bad_utf8.jsonl": '{"prompt": "ok", "question": "q", "answer": "1"}\n',
        "bad_json.jsonl": '{"prompt": "ok", "question": "q", "answer": "1"}\n{"prompt": oops}\n',
        "not_object.jsonl": '[1, 2, 3]\n',
        "empty.jsonl": "",
        "no_answer.jsonl": '{"question": "q"}\n',
        "tune.jsonl": '{"question": "1+1?", "answer": "It is 2.\\n#### 2"}\n',
        "afile": "a plain file\n",
        "corrupt.gguf": "GGUF but not really",
        "train_bad_json.jsonl": '{"question": "q", "answer": "a #### 1"}\n{oops\n',
        "train_no_field.jsonl": '{"q": "q"}\n',
    }
    for name, text in texts.items():
        (root / name).write_text(text)
    with (root / "bad_utf8.jsonl").open("ab") as handle:
        handle.write(b"\xff\xfe\n")
    with (root / "train_bad_utf8.jsonl").open("wb") as handle:
        handle.write(b'{"question": "q", "answer": "a #### 1"}\n\xff\n')
    (root / "adir").mkdir()
    (root / "bad_run").mkdir()
    (root / "bad_run" / "run.json").write_text("{torn")
    (root / "work").mkdir()
    for name in texts:
        paths[name.replace(".", "_")] = root / name
    paths.update(train_bad_utf8_jsonl=root / "train_bad_utf8.jsonl", adir=root / "adir", bad_run=root / "bad_run",
                 work=root / "work", long=" ".join(["word"] * 200))
    return {k: str(v) for k, v in paths.items()}


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and directory under `roots` with its size and modification time."""
    seen = {}
    for root in roots:
        for directory, dirs, names in os.walk(root):
            for name in dirs + names:
                path = os.path.join(directory, name)
                stat = os.lstat(path)
                seen[path] = (stat.st_size if name in names else None, stat.st_mtime_ns if name in names else None)
    return seen


@pytest.fixture
def unchanged(files, monkeypatch):
    """Run in the test's work directory; afterwards assert that no file there, in the test files or in the cache changed."""
    monkeypatch.chdir(files["work"])
    roots = [Path(files["root"]), cache_dir()]
    before = _snapshot(*roots)
    yield
    after = _snapshot(*roots)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (added or removed or changed), f"disk changed: added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"


# ---- the command line --------------------------------------------------------------------------

TINY = "--model {tiny} --adapter {lora}"
GEN = "generate " + TINY + " -n 2"
EVAL = "eval --model {tiny} --adapter {lora} --task jsonl --data {good_jsonl} --out {root}/work/runs -n 2"
EVAL_TASK = "eval --model {tiny} --adapter {lora} --out {root}/work/runs -n 2"
TUNE = "tune --model {tiny} --adapter {lora} --data {tune_jsonl} --out {root}/work/runs -n 2"
TRAIN = "train --model {tiny} --output-dir {root}/work/trained --max-steps 1"
BENCH = "bench --model {tiny} --adapter {lora} --new-tokens 2 --repeats 1 --prompt-tokens 4 --batch-sizes 1"
SERVE = "serve --model {tiny} --adapter x={lora}"

CLI_CASES = [
    # ---- cold generate: decoding parameters
    (GEN + " --beta -1 hi", "beta must be"),
    (GEN + " --beta 1e300 hi", "beta must be"),
    (GEN + " --beta nan hi", "beta must be"),
    (GEN + " --alpha 1.5 hi", "alpha must be"),
    (GEN + " --alpha -0.1 hi", "alpha must be"),
    (GEN + " --alpha nan hi", "alpha must be"),
    (GEN + " --expert-scale 1e30 hi", "expert_scale"),
    (GEN + " --sample --expert-scale 1e30 hi", "expert_scale"),
    (GEN + " --expert-scale nan hi", "expert_scale"),
        (GEN + " --amateur-scale inf hi", "amateur"),
    (GEN + " --sample --temperature 0 hi", "temperature"),
    (GEN + " --sample --temperature -1 hi", "temperature"),
    (GEN + " --sample --temperature nan hi", "temperature"),
    (GEN + " --top-k -1 hi", "top_k"),
    (GEN + " --sample --top-k -1 hi", "top_k"),
    (GEN + " --top-p 1.5 hi", "top_p"),
    (GEN + " --top-p 0 hi", "top_p"),
    (GEN + " --sample --top-p nan hi", "top_p"),
    (GEN + " --seed 1180591620717411303424 hi", "seed"),
    (GEN + " --seed -1 hi", "seed"),
    ("generate --model {tiny} --adapter {lora} -n 0 hi", "max_new_tokens"),
    ("generate --model {tiny} --adapter {lora} -n -5 hi", "max_new_tokens"),
    (GEN + " --num-beams 0 hi", "num_beams"),
    (GEN + " --num-beams 2 --sample hi", "beam"),
    (GEN + " --batch-size 0 hi", "--batch-size"),
    # ---- cold generate: devices and dtypes
    (GEN + " --device nonsense hi", "--device"),
    (GEN + " --device cuda:7 hi", "cuda"),
    (GEN + " --device meta hi", "--device"),
    (GEN + " --dtype float8 hi", "dtype"),
    (GEN + " --dtype '' hi", "dtype"),
    (GEN + " --kv-dtype int4 hi", "dtype"),
    # ---- cold generate: adapters
    ("generate --model {tiny} --adapter './[/]x' hi", "[/]x"),
    ("generate --model {tiny} --adapter {root}/missing hi", "directory not found"),
    ("generate --model {tiny} --adapter {afile} hi", "directory not found"),
    ("generate --model {tiny} --adapter {nan_alpha} hi", "lora_alpha must be a finite number"),
    ("generate --model {tiny} --adapter {inf_alpha} hi", "lora_alpha must be a finite number"),
    ("generate --model {tiny} --adapter {bool_rank} hi", "r must be a positive integer"),
    ("generate --model {tiny} --adapter {zero_rank} hi", "r must be a positive integer"),
    ("generate --model {tiny} --adapter {dora} hi", "DoRA"),
    ("generate --model {tiny} --adapter {ia3} hi", "IA3"),
    ("generate --model {tiny} --adapter {nan_tensor} hi", "NaN or infinite"),
    ("generate --model {tiny} --adapter {inf_tensor} hi", "NaN or infinite"),
    ("generate --model {tiny} --adapter {int_tensor} hi", "not a floating-point tensor"),
    ("generate --model {tiny} --adapter {corrupt} hi", "corrupt or unreadable"),
    ("generate --model {tiny} --adapter {no_config} hi", "missing adapter_config.json"),
    ("generate --model {tiny} --adapter {config_not_json} hi", "not valid JSON"),
    ("generate --model {tiny} --adapter {config_list} hi", "must hold a JSON object"),
    ("generate --model {tiny} --adapter {other_base} hi", "different base model"),
    ("generate --model {tiny} --adapter ={lora} hi", "adapter"),
    ("generate --model {tiny} --adapter a={lora} --adapter a={lora} hi", "twice"),
    (GEN + " --use nope hi", "nope"),
    (GEN + " --amateur nope hi", "neither a loaded adapter"),
    # ---- cold generate: prompts
    (GEN + " --input {bad_utf8_jsonl}", "not valid UTF-8"),
    (GEN + " --input {bad_json_jsonl}", "not valid JSON"),
    (GEN + " --input {adir}", "is a directory"),
    (GEN + " --input {root}/missing.jsonl", "file not found"),
    (GEN + " --input {not_object_jsonl}", "object"),
    (GEN + " --input {good_jsonl} --field nope", "nope"),
    (GEN + " --input {empty_jsonl}", "no prompt"),
    (GEN, "no prompt given"),
    (GEN + " '{long}'", "context"),
    (GEN + " --stop '' hi", "stop"),
    # ---- cold generate: models and engines
    ("generate --model nonsense hi", "nonsense"),
    ("generate --model '[/]x' hi", "[/]x"),
    ("generate --model {adir} hi", "adir"),
    ("generate --model {corrupt_gguf} hi", "GGUF"),
    ("generate --model {tiny} --decoder expert -n 2 hi", "adapter"),
    (GEN + " --engine llamacpp hi", "gguf"),
    ("generate --engine llamacpp --device cuda hi", "llamacpp"),
    ("generate --engine llamacpp --kv-dtype bfloat16 hi", "kv"),
    # ---- cold eval
    (EVAL_TASK + " --task nope", "nope"),
    (EVAL_TASK + " --task gsm8k --split nope", "no split 'nope'"),
    (EVAL_TASK + " --task jsonl", "--task jsonl needs --data"),
    (EVAL + " --split test", "--split applies to built-in tasks only"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {bad_utf8_jsonl} --out {root}/work/runs", "not valid UTF-8"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {bad_json_jsonl} --out {root}/work/runs", "not valid JSON"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {not_object_jsonl} --out {root}/work/runs", "JSON object"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {adir} --out {root}/work/runs", "file not found"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {root}/missing.jsonl --out {root}/work/runs", "file not found"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {no_answer_jsonl} --out {root}/work/runs", "answer"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {empty_jsonl} --out {root}/work/runs", "no problems"),
    (EVAL + " --question-field nope", "nope"),
    (EVAL + " --answer-type choice", "--choices-field"),
    (EVAL + " --decoders nope", "nope"),
    (EVAL + " --decoders ''", "decoder"),
    (EVAL + " --decoders cold@2/0.5", "alpha"),
    (EVAL + " --decoders cold@0.1/-1", "beta"),
    (EVAL + " --decoders cold@0.1/1e300", "beta"),
    (EVAL + " --decoders expert@1e30", "scale"),
    (EVAL + " --decoders expert,expert", "twice"),
    (EVAL + " --decoders expert:beam0", "beam"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {good_jsonl} --out {afile}", "not a directory"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {good_jsonl} --out {afile}/sub", "not a directory"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {good_jsonl} --out /proc/x", "--out /proc/x"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {good_jsonl} --out {bad_run}", "not valid JSON"),
    ("eval --model {tiny} --adapter {nan_alpha} --task jsonl --data {good_jsonl} --out {root}/work/runs", "lora_alpha"),
    ("eval --model {tiny} --adapter {corrupt} --task jsonl --data {good_jsonl} --out {root}/work/runs", "corrupt"),
    ("eval --model {tiny} --adapter {root}/missing --task jsonl --data {good_jsonl} --out {root}/work/runs", "not found"),
    ("eval --model {tiny} --task jsonl --data {good_jsonl} --out {root}/work/runs", "adapter"),
    (EVAL + " --limit 0", "--limit"),
    (EVAL + " --batch-size 0", "--batch-size"),
    ("eval --model {tiny} --adapter {lora} --task jsonl --data {good_jsonl} --out {root}/work/runs -n 0", "--max-new-tokens"),
    (EVAL + " --bootstrap 10", "--bootstrap"),
    (EVAL + " --prompt few-shot --shots 100", "--shots 100"),
    (EVAL + " --amateur-adapter {lora}", ":amateur"),
    (EVAL + " --decoders cold@0.1/0.5:amateur", "--amateur-adapter"),
    (EVAL + " --decoders cold@0.1/0.5:amateur --amateur-adapter {lora} --amateur-scale 0", "--amateur-scale"),
    (EVAL + " --decoders cold@0.1/0.5:amateur --amateur-adapter {nan_tensor}", "NaN"),
    (EVAL + " --engine vllm", "vllm"),
    (EVAL + " --device nonsense", "--device"),
    (EVAL + " --dtype nonsense", "dtype"),
    # ---- cold tune
    (TUNE + " --alphas 2", "alphas"),
    (TUNE + " --alphas abc", "alphas"),
    (TUNE + " --alphas ''", "alphas"),
    (TUNE + " --betas -1", "betas"),
    (TUNE + " --betas nan", "betas"),
    (TUNE + " --betas 1e300", "beta"),
    (TUNE + " --scales 0", "scales"),
    (TUNE + " --scales 1e30", "scale"),
    (TUNE + " --scoring nope", "--scoring"),
    ("tune --model {tiny} --adapter {lora} --task multiarith --out {root}/work/runs", "no tuning split"),
    (TUNE + " --limit 0", "--limit"),
    ("tune --model {tiny} --adapter {lora} --data {tune_jsonl} --out {afile}", "not a directory"),
    ("tune --model {tiny} --adapter {lora} --data {bad_utf8_jsonl} --out {root}/work/runs", "UTF-8"),
    ("tune --model {tiny} --adapter {inf_tensor} --data {tune_jsonl} --out {root}/work/runs", "NaN"),
    # ---- cold train
    (TRAIN + " --task nope", "nope"),
    (TRAIN + " --data {train_bad_json_jsonl}", "not valid JSON"),
    (TRAIN + " --data {train_bad_utf8_jsonl}", "UTF-8"),
    (TRAIN + " --data {train_no_field_jsonl}", "question"),
    (TRAIN + " --data {root}/missing.jsonl", "not found"),
    (TRAIN + " --data {adir}", "directory"),
    (TRAIN + " --rank 0", "rank"),
    (TRAIN + " --lora-alpha 0", "lora_alpha"),
    ("train --model {tiny} --output-dir {root}/work/trained --max-steps 0", "max_steps"),
    (TRAIN + " --batch-size 0", "batch_size"),
    (TRAIN + " --learning-rate -1", "learning_rate"),
    (TRAIN + " --learning-rate nan", "learning_rate"),
    (TRAIN + " --max-length 0", "max_length"),
    (TRAIN + " --target nonsense", "nonsense"),
    (TRAIN + " --save-at 5", "save_at"),
    (TRAIN + " --threads 0", "threads"),
    (TRAIN + " --prompt nonsense", "nonsense"),
    ("train --model {tiny} --output-dir {afile} --max-steps 1", "not a directory"),
    ("train --model nonsense --output-dir {root}/work/trained --max-steps 1", "nonsense"),
    # ---- cold bench
    (BENCH + " --decoders nope", "nope"),
    ("bench --model {tiny} --adapter {lora} --new-tokens 2 --repeats 1 --batch-sizes 0", "batch"),
    ("bench --model {tiny} --adapter {lora} --new-tokens 2 --repeats 1 --batch-sizes abc", "batch"),
    (BENCH + " --prompt-tokens 0", "prompt-tokens"),
    ("bench --model {tiny} --adapter {lora} --new-tokens 0 --batch-sizes 1", "new-tokens"),
    ("bench --model {tiny} --adapter {lora} --new-tokens 2 --repeats 0 --batch-sizes 1", "repeats"),
    (BENCH + " --warmup -1", "warmup"),
    (BENCH + " --alpha 2", "alpha"),
    (BENCH + " --beta -1", "beta"),
    (BENCH + " --threads 0", "threads"),
    (BENCH + " --e2e -1", "--e2e"),
    (BENCH + " --e2e 2 --e2e-task nope", "nope"),
    (BENCH + " --e2e 2 --e2e-file {root}/missing.jsonl", "not found"),
    (BENCH + " --cobatch-steps abc", "cobatch"),
    (BENCH + " --json {adir}", "directory"),
    (BENCH + " --markdown /proc/x/y.md", "/proc/x"),
    ("bench --model {tiny} --adapter {root}/missing --new-tokens 2 --repeats 1 --batch-sizes 1", "adapter_config.json"),
    ("bench --model {tiny} --adapter {nan_alpha} --new-tokens 2 --repeats 1 --batch-sizes 1", "lora_alpha"),
    (BENCH + " --device nonsense", "--device"),
    # ---- cold serve
    ("serve --model {tiny} --adapter 'x=./[/]x'", "[/]x"),
    ("serve --model {tiny} --adapter x={root}/missing", "not found"),
    ("serve --model {tiny} --adapter x={nan_alpha}", "lora_alpha"),
    ("serve --model {tiny} --adapter x={inf_tensor}", "NaN"),
    ("serve --model {tiny} --adapter base={lora}", "clashes"),
    ("serve --model {tiny} --adapter x={lora} --adapter x={lora}", "twice"),
    (SERVE + " --max-batch 0", "--max-batch"),
    (SERVE + " --max-queue 0", "--max-queue"),
    (SERVE + " --max-tokens 0", "--max-tokens"),
    (SERVE + " --max-body-bytes 0", "--max-body-bytes"),
    (SERVE + " --port 70000", "--port"),
    (SERVE + " --port -1", "--port"),
    (SERVE + " --host 'no such host!'", "--host"),
    (SERVE + " --log-level nonsense", "--log-level"),
    (SERVE + " --device nonsense", "--device"),
    (SERVE + " --engine llamacpp --device cuda", "llamacpp"),
    (SERVE + " --engine vllm --kv-dtype bfloat16", "kv"),
    (SERVE + " --alias x-cold", "expected ID=MODEL:FIELD=VALUE"),
    (SERVE + " --alias x-cold=x:beta", "is not FIELD=VALUE"),
    (SERVE + " --alias a=x --alias a=x", "given twice"),
    (SERVE + " --alias x-cold=nope:beta=1", "'nope' is not a served model id"),
    (SERVE + " --alias x-cold=x:beta=-1", "beta must be in"),
    (SERVE + " --alias x-cold=x:colour=blue", "unrecognized request argument: colour"),
    (SERVE + " --alias x=x:beta=1", "clashes with a served model id"),
    (SERVE + " --alias x-cold=x:score=best", "score"),
]

# lm-eval's own command line with the model `cold`, each in its own process (lm-eval sets up logging globally)
LM_EVAL_CASES = [
    ("model={tiny},adapter={lora},colour=blue", "unknown model_args for --model cold: colour"),
    ("model={tiny},adapter={lora},score=best", "score must be one of"),
    ("model={tiny},adapter={lora},beta=-1", "beta must be in"),
    ("model={tiny},decoder=cold", "needs adapter=DIR"),
    ("model={tiny},adapter={nan_alpha}", "lora_alpha must be a finite number"),
]
CLI_CASES = [c for c in CLI_CASES if c[1] is not None]


def _cli_id(case) -> str:
    words = [w for w in shlex.split(case[0]) if not w.startswith("{")]
    return "-".join(words[:1] + [w for w in words[1:] if w.startswith("--") and w not in ("--model", "--adapter", "--out")][:3])


@pytest.mark.parametrize("command,message", CLI_CASES, ids=[f"{i:03d}-{_cli_id(c)}" for i, c in enumerate(CLI_CASES)])
def test_command_line(command, message, files, unchanged, monkeypatch):
    import uvicorn

    def no_server(*args, **kwargs):
        raise AssertionError("the server started: the input was accepted")

    monkeypatch.setattr(uvicorn, "run", no_server)
    args = shlex.split(command.format(**files))
    result = runner.invoke(app, args, input="")
    output = result.output
    assert "Traceback" not in output and not isinstance(result.exception, AssertionError), output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}\n{result.exception!r}"
    errors = [line for line in output.splitlines() if "error:" in line.lower() or "Error" in line]
    assert len(errors) == 1, output
    assert message in output, output


@pytest.mark.parametrize("model_args,message", LM_EVAL_CASES, ids=[f"{i:02d}" for i in range(len(LM_EVAL_CASES))])
def test_lm_eval_command_line(model_args, message, files, unchanged):
    pytest.importorskip("lm_eval", reason="the [lm-eval] extra is not installed")
    done = subprocess.run([sys.executable, "-m", "cold.lm_eval", "--model", "cold", "--tasks", "arc_easy",
                           "--model_args", model_args.format(**files)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]


def test_there_are_enough_cases():
    assert len(CLI_CASES) + len(API_CASES) + len(HTTP_CASES) + len(LM_EVAL_CASES) >= 120


# ---- the Python API ------------------------------------------------------------------------------

API_CASES = [
    (dict(prompts=["hi"], alpha=2.0), "alpha"),
    (dict(prompts=["hi"], beta=-1.0), "beta"),
    (dict(prompts=["hi"], beta=math.inf), "beta"),
    (dict(prompts=["hi"], decoder="nope"), "nope"),
    (dict(prompts=["hi"], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=["hi"], adapter="nope"), "nope"),
    (dict(prompts=["hi"], expert_scale=math.nan), "expert_scale"),
    (dict(prompts=["hi"], do_sample=True, temperature=0.0), "temperature"),
    (dict(prompts=["hi"], sample=True), "unknown decoding parameter"),
    (dict(prompts=["hi"], seed=2**64), "seed"),
    (dict(prompts=[]), "prompt"),
    (dict(prompts=[""]), "empty"),
    (dict(prompts=[" ".join(["word"] * 200)]), "context"),
    (dict(prompts=["hi"], num_beams=0), "num_beams"),
    (dict(prompts=["hi"], top_p=2.0), "top_p"),
    (dict(prompts=["hi"], logprobs=21), "logprobs must be an integer in"),
    (dict(prompts=["hi"], logprobs=True), "logprobs must be an integer in"),
    (dict(prompts=["hi"], logprobs=2, num_beams=2), "beam search"),
    (dict(prompts=["hi"], logprobs=2, logprob_score="amateur"), "logprob_score"),
]


@pytest.fixture(scope="module")
def engine(tiny, files) -> Engine:
    return Engine(tiny, [read_adapter(files["lora"], "lora")])


@pytest.mark.parametrize("kwargs,message", API_CASES, ids=[f"{i:02d}" for i in range(len(API_CASES))])
def test_python_api(engine, kwargs, message):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts")
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(ColdError, match=message):
        engine.generate(prompts, **kwargs)
    assert engine.generate(["hi"], max_new_tokens=2)  # still usable


def test_engine_load_refuses_bad_adapters_before_the_model(files):
    for name in ("nan_alpha", "nan_tensor", "corrupt"):
        with pytest.raises(ColdError, match=name):
            Engine.load("no-such-model", {name: files[name]})


# ---- the HTTP API --------------------------------------------------------------------------------


def _completion(**fields) -> dict:
    return {"model": "lora", "prompt": "hi", "max_tokens": 2, **fields}


def _chat(**fields) -> dict:
    return {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


HTTP_CASES = [
    (_completion(beta=-1), 400, "beta"),
    (_completion(beta=1e300), 400, "beta"),
    (_completion(alpha=2), 400, "alpha"),
    (_completion(expert_scale=1e30), 400, "expert_scale"),
    (_completion(temperature=-1), 400, "temperature"),
    (_completion(top_p=5), 400, "top_p"),
    (_completion(top_k=-2), 400, "top_k"),
    (_completion(seed=2**64), 400, "seed"),
    (_completion(n=0), 400, "n"),
    (_completion(n=1000), 400, "n"),
    (_completion(max_tokens=0), 400, "max_tokens"),
    (_completion(max_tokens=10**9), 400, "context"),
    (_completion(prompt=""), 400, "empty"),
    (_completion(prompt=[]), 400, "prompt"),
    (_completion(prompt=[10**9]), 400, "vocabulary"),
    (_completion(prompt=[-1]), 400, "vocabulary"),
    (_completion(prompt=" ".join(["word"] * 200)), 400, "context"),
    (_completion(model="nope"), 404, "nope"),
    (_completion(decoder="nope"), 400, "decoder"),
    (_completion(alpah=0.2), 400, "alpah"),
    (_completion(amateur="nope"), 400, "amateur"),
    (_completion(logit_bias={"1": 5}), 400, "logit_bias"),
    (_completion(stream="yes"), 400, "stream"),
    (_completion(stop=[""]), 400, "stop"),
    ({"prompt": "hi"}, 400, "model"),
    ([1, 2, 3], 400, "object"),
    (b"{not json", 400, "JSON"),
    (b"\xff\xfe", 400, "JSON"),
    ("text/plain", 415, "application/json"),
    (b"x" * 5000, 413, "larger"),
    (_completion(logprobs=21), 400, "logprobs must be in [0, 20]"),
    (_completion(logprobs=True), 400, "logprobs"),
    (("/v1/chat/completions", _chat(top_logprobs=2)), 400, "top_logprobs needs logprobs: true"),
    (("/v1/chat/completions", _chat(logprobs=True, top_logprobs=50)), 400, "top_logprobs must be in [0, 20]"),
    (("/v1/chat/completions", _chat(logprobs=1)), 400, "logprobs"),
    (("/v1/chat/completions", _chat(score="cold")), 400, "score chooses whose log-probabilities are reported"),
    (_completion(echo=True, logprobs=21, max_tokens=1), 400, "logprobs must be in [0, 20]"),
    (_completion(echo=True, logprobs=-1, max_tokens=1), 400, "logprobs must be in [0, 20]"),
    (_completion(echo=True, logprobs=1, max_tokens=5), 400, "max_tokens must be 0 or 1"),
    (_completion(echo=True, logprobs=1, max_tokens=1, stream=True), 400, "cannot be streamed"),
    (_completion(echo=True, logprobs=1, max_tokens=1, n=2), 400, "n = 1"),
    (_completion(echo=True, logprobs=1, max_tokens=1, prompt=[10**9]), 400, "vocabulary"),
    (_completion(score="cold"), 400, "it needs logprobs (or echo=true with logprobs, to score a prompt)"),
    (_completion(logprobs=1, score="best"), 400, "score"),
    (_completion(echo=True, logprobs=1, max_tokens=1, score="best"), 400, "score"),
    (("/tokenize", {}), 400, "either prompt or messages"),
    (("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}), 400, "either prompt or messages"),
    (("/tokenize", {"prompt": 5}), 400, "prompt"),
    (("/tokenize", {"prompt": "x", "model": "nope"}), 404, "nope"),
    (("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}), 400, "wizard"),
    (("/detokenize", {"tokens": [-1]}), 400, "vocabulary"),
    (("/detokenize", {"tokens": "abc"}), 400, "tokens"),
]


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, ServerConfig(model_name="tiny", max_body_bytes=4096, body_timeout_s=1))
    serving = ServerThread(app)
    serving.app = app
    yield serving
    serving.stop()


@pytest.mark.parametrize("body,status,message", HTTP_CASES, ids=[f"{i:02d}" for i in range(len(HTTP_CASES))])
def test_http_api(server, body, status, message):
    headers, path = {"Content-Type": "application/json"}, "/v1/completions"
    if isinstance(body, tuple):
        path, body = body
    if body == "text/plain":
        body, headers = json.dumps(_completion()).encode(), {"Content-Type": "text/plain"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert server.health()["status"] == "ok"


# ---- the server under hostile clients --------------------------------------------------------------


def _raw(server: ServerThread, head: bytes, timeout: float = 10) -> socket.socket:
    """A socket that has sent `head` (request line, headers and part of a body) and nothing more."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(head)
    return sock


def _partial_upload(length: int = 1000) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + b'{"model": "lora", ')


def _eventually(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_client_that_drops_mid_upload_is_counted_apart_from_errors(server, caplog):
    before = server.metric("cold_client_disconnects_total")
    with caplog.at_level(logging.INFO, logger="cold.serve"):
        for _ in range(5):
            _raw(server, _partial_upload()).close()
        assert _eventually(lambda: server.metric("cold_client_disconnects_total") == before + 5)
    assert server.metric('cold_requests_total{endpoint="/v1/completions",status="500"}') == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("cold")]
    assert any("went away" in r.getMessage() for r in caplog.records)


def test_a_body_that_never_arrives_in_full_gets_408(server):
    with _raw(server, _partial_upload()) as sock:
        started = time.monotonic()
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer
    assert time.monotonic() - started < 5


def test_too_many_prompts_are_refused_before_any_tokenising(server, monkeypatch):
    backend = server.app.state.cold.backend
    calls = []
    monkeypatch.setattr(backend, "encode", lambda text: calls.append(text) or [1])
    response = httpx.post(server.url + "/v1/completions", json=_completion(prompt=["a"] * 300), timeout=30)
    assert response.status_code == 400 and "more sequences than this server queues" in response.json()["error"]["message"]
    assert calls == []


def test_tokenising_does_not_stall_the_server(server, monkeypatch):
    backend = server.app.state.cold.backend
    encode = backend.encode

    def slow_encode(text):
        time.sleep(2)
        return encode(text)

    monkeypatch.setattr(backend, "encode", slow_encode)
    slow = threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions", json=_completion(), timeout=30))
    slow.start()
    time.sleep(0.3)  # the slow request is tokenising now
    started = time.monotonic()
    assert server.health()["status"] == "ok"
    assert time.monotonic() - started < 1.0
    slow.join()


def test_open_connections_are_bounded(engine):
    serving = ServerThread(create_app(engine, ServerConfig(model_name="tiny", body_timeout_s=30)), limit_concurrency=3)
    try:
        held = [_raw(serving, _partial_upload()) for _ in range(3)]
        time.sleep(0.3)
        refused = httpx.post(serving.url + "/v1/completions", json=_completion(), timeout=30)
        assert refused.status_code == 503
        for sock in held:
            sock.close()
        assert _eventually(lambda: httpx.post(serving.url + "/v1/completions", json=_completion(), timeout=30).status_code == 200)
    finally:
        serving.stop()


def test_a_short_soak_passes(server, tmp_path):
    """scripts/soak.py (docs/serving.md runs it for 10 minutes) on the test server, briefly."""
    report_file = tmp_path / "soak.json"
    status = load_script("soak").main(["--url", server.url, "--pid", str(os.getpid()), "--clients", "4", "--duration", "8",
                                       "--warmup", "2", "--max-tokens", "4", "--probe-every", "1", "--rss-tolerance", "50",
                                       "--json", str(report_file)])
    report = json.loads(report_file.read_text())
    assert status == 0, report["failed"]
    assert report["errors"] == 0 and report["probes"] >= 4 and report["probe_variants"] == 1
    assert report["by_kind"].get("bad", 0) >= 1 and any(k.endswith("-abandoned") for k in report["by_kind"])
    assert report["server_500s"] == 0 and report["left_running"] == 0 and report["rss_samples"] >= 4
