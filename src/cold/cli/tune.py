"""`cold tune`: choose alpha, beta and the LoRA scale on a tuning split (never the test split).

The grid's statistics (numpy) are imported inside the command, so that `cold --help` does not import them.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from cold.cli.common import Device, Dtype, EvalModel, err, reports_errors
from cold.cli.eval_run import (
    TUNING_SPLITS,
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
    print_grid,
    resumes_on_interrupt,
    shown,
    stdout,
)
from cold.errors import ColdError


@reports_errors
@resumes_on_interrupt
def tune_command(
    task: Annotated[str, typer.Option(help="gsm8k, commonsenseqa, coin_flip, last_letters (each has a tuning split), or any task with --split/--data.")] = "gsm8k",
    split: Annotated[Optional[str], typer.Option(help="Tuning split (default: gsm8k/commonsenseqa train, coin_flip/last_letters gen-tune).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Your own tuning file instead of a split.")] = None,
    alphas: Annotated[str, typer.Option(help="Plausibility thresholds alpha to try (comma-separated, each in [0, 1]).")] = "0.05,0.1,0.3",
    betas: Annotated[str, typer.Option(help="Contrast strengths beta to try (comma-separated, each >= 0).")] = "0.25,0.5,1,2",
    scales: Annotated[str, typer.Option(help="LoRA scales for the one-row alternative expert@S (comma-separated, > 0).")] = "1.5,2",
    scoring: Annotated[str, typer.Option(help="CoLD score forms to try: logit, logprob, or logit,logprob.")] = "logit",
    schedules: Annotated[str, typer.Option(help="Beta schedules to try (comma-separated): constant, entropy (beta times the expert's entropy over log V), jsd (beta times the Jensen-Shannon divergence of expert and amateur over log 2). The adaptive ones scale beta down at every step, so give them larger --betas.")] = "constant",
    model: EvalModel = "smollm2",
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter directory (default: the model's demo adapter for the task).")] = None,
    prompt: Annotated[PromptChoice, typer.Option(help="chat, zero-shot or few-shot (as in cold eval).")] = PromptChoice.chat,
    shots: Shots = 4,
    instruction: Annotated[str, typer.Option(help="Text appended on its own line to every question.")] = "",
    max_new_tokens: MaxNewTokens = 256,
    limit: Annotated[Optional[int], typer.Option(help="Tune on a seeded sample of this many problems.")] = 100,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (records/, tune.md, tune.json, heatmap.png). Default: eval-runs/tune-TASK-SPLIT-PROMPT. Rerunning resumes.")] = None,
    headline: Annotated[Rule, typer.Option(help="Extraction rule the best setting is chosen by.")] = Rule.flexible,
    bootstrap: Bootstrap = 10_000,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    amateur_adapter: AmateurAdapter = None,
    amateur_scale: AmateurScale = 1.0,
) -> None:
    """Sweep CoLD's alpha x beta and the LoRA scale on a tuning split; report the whole grid and the best.

    Every setting runs on the same problems as `expert` (the adapter's greedy decoding) and is compared with it by a paired bootstrap. Writes tune.md, tune.json and heatmap.png, and prints the `cold eval` command that measures the chosen settings on the test split.

    With --amateur-adapter, every CoLD setting contrasts with that adapter instead of the base model.

    Example: cold tune --task coin_flip --limit 100 --alphas 0.1 --betas 0.5,1,2 --scales 1.5
    """
    from cold.evaluation import tune

    dtype = check_common(max_new_tokens, batch_size, limit, bootstrap, dtype, device)
    scorings = [s.strip() for s in scoring.split(",") if s.strip()]
    if not scorings or any(s not in tune.SCORINGS for s in scorings) or len(set(scorings)) != len(scorings):
        raise ColdError(f"--scoring must be logit, logprob or logit,logprob, got {scoring!r}")
    specs = tune.grid_specs(tune.parse_grid(alphas, "alphas", 0.0, 1.0), tune.parse_grid(betas, "betas", 0.0),
                            tune.parse_grid(scales, "scales", 1e-9), scorings, vs_amateur=amateur_adapter is not None,
                            schedules=tune.parse_schedules(schedules))
    if split is None and data is None and task not in TUNING_SPLITS:
        raise ColdError(f"task {task!r} has no tuning split; give --split or --data (a file disjoint from the test problems)")
    default = TUNING_SPLITS.get(task)
    run = prepare(task, data, split, specs, model, adapter, prompt, shots, instruction, max_new_tokens, limit, seed,
                  out_dir, "question", "answer", AnswerType.number, None, dtype, default_split=default, out_prefix="tune-",
                  amateur=amateur_adapter, amateur_scale=amateur_scale)
    if run.split == run.task.default_split and run.task.default_split in ("test", "dev"):
        err.print(f"[yellow]warning:[/] tuning on the {run.split} split: numbers reported on it afterwards are not held out")
    results = generate_all(run, specs, model, device, dtype, max_new_tokens, batch_size)
    summary = tune.summarize(results, specs, headline.value, bootstrap)

    where = f"{run.task.name} ({run.split})" if run.split else shown(run.path)
    title = f"cold tune: {where}, n = {len(run.problems)}, prompt {prompt.value}, max {max_new_tokens} new tokens"
    next_eval = ["cold", "eval", "--task", run.task.name, "--decoders", tune.chosen_decoders(summary)]
    if model != "smollm2":
        next_eval += ["--model", model]
    if dtype != "float32":
        next_eval += ["--dtype", dtype]
    if adapter:
        next_eval += ["--adapter", str(adapter)]
    if amateur_adapter:
        next_eval += ["--amateur-adapter", str(amateur_adapter)] + (["--amateur-scale", str(amateur_scale)] if amateur_scale != 1 else [])
    if prompt is not PromptChoice.chat:
        next_eval += ["--prompt", prompt.value]
    if max_new_tokens != 256:
        next_eval += ["--max-new-tokens", str(max_new_tokens)]
    given = dict(task=task, split=split, data=data, alphas=alphas, betas=betas, scales=scales, scoring=scoring,
                 schedules=schedules, model=model,
                 adapter=adapter, amateur_adapter=amateur_adapter, amateur_scale=amateur_scale, prompt=prompt.value,
                 max_new_tokens=max_new_tokens, limit=limit, seed=seed, out=run.out)
    facts = [
        ("command", "`" + shlex.join(["cold", "tune", *_given(given)]) + "`"),
        ("problems", run.sample),
        ("model", model),
        ("adapter", shown(run.adapter) if run.adapter else "none"),
        *([("amateur", f"{shown(run.amateur)} at scale {amateur_scale:g}")] if run.amateur else []),
        ("headline rule", headline.value),
        ("next (test split)", "`" + shlex.join(next_eval) + "`"),
    ]
    print_grid(*tune.table(summary), title)
    stdout.print("best: " + ", ".join(f"{kind} {label}" for kind, label in summary["best"].items()), markup=False)
    stdout.print("measure them on the test split: " + shlex.join(next_eval), markup=False)
    for written in tune.write_outputs(summary, run.out, title, facts):
        err.print(f"wrote {written}", markup=False)


DEFAULTS = dict(task="gsm8k", alphas="0.05,0.1,0.3", betas="0.25,0.5,1,2", scales="1.5,2", scoring="logit", schedules="constant",
                model="smollm2", prompt="chat", max_new_tokens=256, limit=100, seed=0, amateur_scale=1.0)


def _given(options: dict) -> list[str]:
    """Command-line flags for the options that differ from their defaults (for the reproduce line)."""
    args = []
    for key, value in options.items():
        if value is None or DEFAULTS.get(key) == value:
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args
