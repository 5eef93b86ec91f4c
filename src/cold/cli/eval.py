"""`cold eval`: several decoders on the same problems of a task, accuracy side by side.

The report (numpy) and the dtypes (torch) are imported inside the command, so that `cold --help` does not import them.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from cold.cli.common import LLAMACPP_HELP, Device, Dtype, EvalModel, KvDtype, err, reports_errors
from cold.cli.eval_run import (
    AmateurAdapter,
    AmateurScale,
    AnswerType,
    BatchSize,
    Bootstrap,
    MaxNewTokens,
    PromptChoice,
    Rule,
    Seed,
    Shots,
    check_common,
    generate_all,
    prepare,
    resumes_on_interrupt,
    shown,
    stdout,
)
from cold.errors import ColdError
from cold.evaluation import decoders as decoder_specs
from cold.params import EngineName
from cold.tasks import readers as tasks


@reports_errors
@resumes_on_interrupt
def eval_command(
    task: Annotated[str, typer.Option(help="gsm8k, multiarith, singleeq, coin_flip, last_letters, commonsenseqa, or jsonl (any JSONL file given with --data).")] = "gsm8k",
    data: Annotated[Optional[Path], typer.Option(help="The task file to read (default: the split's file under ../shared/data or $COLD_DATA_DIR).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a built-in task (default: test; commonsenseqa: dev).")] = None,
    decoders: Annotated[str, typer.Option(help=f"Comma-separated decoder specs: {decoder_specs.SYNTAX}.")] = decoder_specs.DEFAULT_DECODERS,
    model: EvalModel = "smollm2",
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter directory. Default: the built-in demo adapter of a built-in model.")] = None,
    prompt: Annotated[PromptChoice, typer.Option(help="chat: the question as the user message of the chat template; zero-shot: 'Question: ...\\nAnswer:'; few-shot: worked examples first.")] = PromptChoice.chat,
    shots: Shots = 4,
    instruction: Annotated[str, typer.Option(help="Text appended on its own line to every question (e.g. an answer-format request).")] = "",
    max_new_tokens: MaxNewTokens = 256,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate a seeded sample of this many problems (a larger limit with the same seed extends the sample).")] = None,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (records/, summary.md, summary.json, plot.png). Default: eval-runs/TASK-SPLIT-PROMPT. Rerunning resumes.")] = None,
    headline: Annotated[Rule, typer.Option(help="Extraction rule of the headline accuracy and of the paired differences.")] = Rule.flexible,
    bootstrap: Bootstrap = 10_000,
    question_field: Annotated[str, typer.Option(help="--task jsonl: field holding the question (dotted names reach into objects).")] = "question",
    answer_field: Annotated[str, typer.Option(help="--task jsonl: field holding the gold answer.")] = "answer",
    answer_type: Annotated[AnswerType, typer.Option(help="--task jsonl: number, yesno, choice (needs --choices-field) or text.")] = AnswerType.number,
    choices_field: Annotated[Optional[str], typer.Option(help="--task jsonl: field holding the choices (strings, or objects with label and text).")] = None,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    kv_dtype: KvDtype = None,
    amateur_adapter: AmateurAdapter = None,
    amateur_scale: AmateurScale = 1.0,
    engine_name: Annotated[EngineName, typer.Option("--engine", help="cold: this package's engine; " + LLAMACPP_HELP + ".")] = EngineName.cold,
) -> None:
    """Run a task under several decoders on the same problems; report accuracy side by side.

    Decoder specs: base | expert | expert@SCALE | cold@ALPHA/BETA | cold-logprob@ALPHA/BETA,
    each optionally followed by :beamN (beam search); cold@ALPHA/BETA:amateur contrasts with
    --amateur-adapter instead of the base model. See docs/eval.md.

    Examples:

      cold eval --task gsm8k --limit 50 --decoders expert,cold@0.1/0.5

      cold eval --task coin_flip --prompt few-shot --decoders base,expert,expert@1.5,cold@0.1/0.5,cold-logprob@0.1/0.5

      cold eval --task jsonl --data my.jsonl --question-field q --answer-field a --answer-type text

      cold eval --task commonsenseqa --adapter runs/final --amateur-adapter runs/final/step-100 --decoders expert,cold@0.1/0.5,cold@0.1/0.5:amateur
    """
    from cold.evaluation import report
    from cold.load.models import pick_dtype

    specs = decoder_specs.parse_decoders(decoders)
    if engine_name is EngineName.vllm:
        raise ColdError("cold eval runs --engine cold or llamacpp; for vLLM see docs/vllm.md")
    dtype = check_common(max_new_tokens, batch_size, limit, bootstrap, dtype, device, engine_name.value, kv_dtype)
    if kv_dtype is not None and pick_dtype(kv_dtype) == pick_dtype(dtype):
        kv_dtype = None  # the default, spelled out
    run = prepare(task, data, split, specs, model, adapter, prompt, shots, instruction, max_new_tokens, limit, seed,
                  out_dir, question_field, answer_field, answer_type, choices_field, dtype, kv_dtype=kv_dtype,
                  amateur=amateur_adapter, amateur_scale=amateur_scale, engine=engine_name.value)
    results = generate_all(run, specs, model, device, dtype, max_new_tokens, batch_size, kv_dtype, engine_name.value)

    command = _command(task, data, split, decoders, model, adapter, prompt.value, shots, instruction, max_new_tokens,
                       limit, seed, batch_size, run.out, headline.value, question_field, answer_field, answer_type.value,
                       choices_field, device, dtype, run.task.name == tasks.GENERIC, kv_dtype, amateur_adapter, amateur_scale,
                       engine_name.value)
    info = {**run.settings, "data": shown(run.path), "adapter": shown(run.adapter) if run.adapter else None,
            **({"amateur_adapter": shown(run.amateur)} if run.amateur else {}),
            "selection": run.sample, "device": device, "batch_size": batch_size, "command": command,
            "prompt": prompt.value + (f" ({shots} shots)" if prompt is PromptChoice.few_shot else "")}
    summary = report.summarize(results, headline.value, bootstrap, info=info)
    report.print_tables(summary, stdout)
    for written in report.write_outputs(summary, run.out):
        err.print(f"wrote {written}", markup=False)


def _command(task, data, split, decoders, model, adapter, prompt, shots, instruction, max_new_tokens, limit, seed,
             batch_size, out, headline, question_field, answer_field, answer_type, choices_field, device, dtype, generic, kv_dtype=None,
             amateur_adapter=None, amateur_scale=1.0, engine="cold") -> str:
    """The command line that reproduces this run (defaults left out)."""
    args = ["cold", "eval", "--task", task]
    optional = [
        ("--data", data), ("--split", split), ("--decoders", decoders), ("--model", None if model == "smollm2" else model),
        ("--adapter", adapter), ("--prompt", None if prompt == "chat" else prompt),
        ("--shots", shots if prompt == "few-shot" and shots != 4 else None), ("--instruction", instruction or None),
        ("--max-new-tokens", None if max_new_tokens == 256 else max_new_tokens), ("--limit", limit),
        ("--seed", seed if limit is not None else None), ("--batch-size", None if batch_size == 16 else batch_size),
        ("--out", out), ("--headline", None if headline == "flexible" else headline),
        ("--engine", None if engine == "cold" else engine),
        ("--device", None if device == "cpu" else device), ("--dtype", None if dtype in ("float32", "gguf") else dtype),
        ("--kv-dtype", kv_dtype), ("--amateur-adapter", amateur_adapter),
        ("--amateur-scale", amateur_scale if amateur_adapter and amateur_scale != 1 else None),
    ]
    if generic:
        optional += [("--question-field", question_field), ("--answer-field", answer_field),
                     ("--answer-type", answer_type), ("--choices-field", choices_field)]
    for flag, value in optional:
        if value is not None:
            args += [flag, str(value)]
    return shlex.join(args)
