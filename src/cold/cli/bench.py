"""`cold bench`: decode-step speed of CoLD and its baselines, side by side; the machinery is `cold.bench`.

The measuring cells and the report (torch, numpy) are imported inside the command, so that `cold --help` does not
import them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cold.bench import run as bench
from cold.cli.common import Device, Dtype, EvalModel, check_positive, err, reports_errors, table_console
from cold.errors import ColdError
from cold.load.paths import check_writable
from cold.params import DecodeParams

out = table_console(200, soft_wrap=True)  # wide tables in files


@reports_errors
def bench_command(
    model: EvalModel = "smollm2",
    adapter: Annotated[Optional[str], typer.Option(help="PEFT LoRA directory. Default: the model's demo adapter, else a random rank-8 LoRA on all linear layers.")] = None,
    decoders: Annotated[Optional[str], typer.Option(help="Comma-separated: " + ", ".join(bench.DECODER_NAMES) + f". Default: {','.join(bench.DEFAULT_DECODER_NAMES)} (with --e2e: expert,cold). The llamacpp decoders need pip install 'cold-decoding[llamacpp]'.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated numbers of prompts decoded together.")] = "1,4,16",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens (random ids, seeded).")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Decode steps per prompt (EOS ignored); with --e2e: max new tokens.")] = 128,
    repeats: Annotated[int, typer.Option(help="Rounds: timed repetitions (prefill + all steps), each in a fresh process per decoder and batch size.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed decode steps after an untimed prefill, in every process before timing.")] = 16,
    alpha: Annotated[float, typer.Option(help="CoLD plausibility threshold.")] = 0.1,
    beta: Annotated[float, typer.Option(help="CoLD contrast strength.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the random prompts (and of a random LoRA).")] = 0,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    kv_dtype: Annotated[Optional[str], typer.Option(help="KV cache dtype of our engine's decoders (default: --dtype), e.g. bfloat16 under float32 weights: half the cache memory.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads in every measuring process (default: torch's default).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON here.")] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG chart here.")] = None,
    markdown_path: Annotated[Optional[Path], typer.Option("--markdown", help="Write the table as Markdown here (for bench/README.md).")] = None,
    isolate: Annotated[bool, typer.Option(help="Measure each decoder in its own process (separate memory peaks).")] = True,
    bandwidth_mb: Annotated[int, typer.Option(help="Size of the tensor copied to measure bandwidth, MiB.")] = 512,
    e2e: Annotated[int, typer.Option(help="End-to-end mode: decode this many problems of --e2e-task instead (0 = off).")] = 0,
    e2e_task: Annotated[Optional[str], typer.Option(help="End-to-end mode: the built-in task whose problems are decoded, as cold eval's chat prompts: " + ", ".join(bench.E2E_TASKS) + f". Default: {bench.DEFAULT_E2E_TASK}. The adapter: --adapter, else the model's demo adapter for the task.")] = None,
    e2e_file: Annotated[Optional[Path], typer.Option(help="End-to-end mode: the task file to read (default: the task's test split, commonsenseqa's dev, under the data directory); for gsm8k any JSONL with a 'question' field.")] = None,
    e2e_batch_size: Annotated[int, typer.Option(help="Problems decoded together in end-to-end mode.")] = 16,
    e2e_refill: Annotated[bool, typer.Option("--e2e-refill", help="End to end with continuous batching: a new problem joins as soon as one finishes (default: static batches, like cold generate).")] = False,
    cobatch_steps: Annotated[Optional[str], typer.Option(help="Lazy-amateur policies of the cold decoder, comma-separated: integers K >= 0 (an amateur stays co-batched with its expert K steps after it was needed; 0 = fully lazy) or 'always' (every step). Each policy is its own cold row, measured in the same run. Default: the engine's.")] = None,
) -> None:
    """Measure decode speed of CoLD and its baselines side by side (step time, prefill, memory, bandwidth floor).

    Examples:

      cold bench --json bench/latest.json --plot bench/latest.png --markdown bench/latest.md

      cold bench --batch-sizes 1 --decoders expert,cold,cold-naive --repeats 5 --threads 2

      cold bench --e2e 200 --new-tokens 256 --json bench/e2e.json --plot bench/e2e.png

      cold bench --e2e 100 --e2e-task coin_flip --cobatch-steps 0,4,always --new-tokens 128
    """
    from cold.bench import report as bench_report
    from cold.load.models import dtype_name, pick_device, pick_dtype

    if e2e < 0:
        raise ColdError(f"--e2e must be >= 0, got {e2e}")
    check_positive(prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, threads=threads,
                   bandwidth_mb=bandwidth_mb, e2e_batch_size=e2e_batch_size)
    if warmup < 0:
        raise ColdError(f"--warmup must be >= 0, got {warmup}")
    DecodeParams(alpha=alpha, beta=beta).validate()
    for option, path in (("--json", json_path), ("--plot", plot_path), ("--markdown", markdown_path)):
        if path is not None:
            check_writable(path, option)
    device = str(pick_device(device))  # "auto" -> what it means here
    dtype = dtype_name(pick_dtype(dtype, device))  # likewise: every recorded table names the dtype measured
    decoder_list = _decoder_list(decoders, bool(e2e))
    policies = _cobatch_list(cobatch_steps, decoder_list)
    kv_dtype = _kv_dtype(kv_dtype, dtype, decoder_list)
    if not e2e and (e2e_task is not None or e2e_file is not None):
        raise ColdError("--e2e-task and --e2e-file apply to end-to-end mode; give --e2e N too")
    task, task_file = bench.e2e_source(e2e_task, e2e_file) if e2e else (None, None)
    settings = {
        "model": model, "adapter_given": adapter, "decoders": decoder_list,
        "batch_sizes": _int_list(batch_sizes, "--batch-sizes"), "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup, "alpha": alpha, "beta": beta, "seed": seed,
        "device": device, "dtype": dtype, "kv_dtype": kv_dtype, "threads": threads, "bandwidth_mb": bandwidth_mb,
        "e2e": e2e, "e2e_task": task, "e2e_file": task_file, "e2e_batch_size": e2e_batch_size, "e2e_refill": e2e_refill,
        "cobatch_steps": policies,
    }
    with err.status("preparing the model") as status:
        report = bench.measure(settings, isolate, status.update)
    if e2e:
        bench_report.print_e2e(report, out)
    else:
        bench_report.print_report(report, out)
    _write_outputs(report, json_path, plot_path, markdown_path)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ColdError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ColdError(f"{option} must be integers >= 1, got {text!r}")
    return sorted(dict.fromkeys(values))


def _decoder_list(text: str | None, e2e: bool) -> list[str]:
    if text is None:
        return list(bench.DEFAULT_E2E_DECODERS if e2e else bench.DEFAULT_DECODER_NAMES)
    names = list(dict.fromkeys(v for v in text.replace(" ", "").split(",") if v))
    allowed = bench.E2E_DECODERS if e2e else bench.DECODER_NAMES
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ColdError(f"--decoders: {', '.join(unknown) or 'none given'}; choose from {', '.join(allowed)}")
    if any(n in bench.LLAMACPP_DECODER_NAMES for n in names):
        from cold.llamacpp.library import llama

        llama()  # without llama-cpp-python: one error naming the extra, before anything is measured
    return names


def _cobatch_list(text: str | None, decoders: list[str]) -> list[int | str]:
    """--cobatch-steps checked: distinct policies, integers >= 0 or "always", in the order given; by default
    [None], each engine's own. Refused when no decoder that takes a policy runs."""
    if text is None:
        return [None]  # each engine's own default (ours 16, llama.cpp's 0)
    policies: list[int | str] = []
    for item in (v for v in text.replace(" ", "").split(",") if v):
        if item.lower() == bench.ALWAYS:
            policies.append(bench.ALWAYS)
        elif item.isascii() and item.isdigit():
            policies.append(int(item))
        else:
            raise ColdError(f"--cobatch-steps: {item!r} is not a policy; give integers >= 0 or 'always', comma-separated "
                            f"(e.g. 0,4,always)")
    if not policies:
        raise ColdError("--cobatch-steps: no policy given; give integers >= 0 or 'always', comma-separated (e.g. 0,4,always)")
    if not any(d in bench.POLICY_DECODERS for d in decoders):
        raise ColdError(f"--cobatch-steps applies to the {' and '.join(bench.POLICY_DECODERS)} decoders; add one to --decoders")
    return list(dict.fromkeys(policies))


def _kv_dtype(kv_dtype: str | None, dtype: str, decoders: list[str]) -> str | None:
    """--kv-dtype checked: None when it is the weights' dtype; only our engine's decoders take another."""
    from cold.bench.cells import ENGINE_DECODERS
    from cold.load.models import pick_dtype

    if kv_dtype is None or pick_dtype(kv_dtype) == pick_dtype(dtype):
        return None
    others = [d for d in decoders if d not in ENGINE_DECODERS]
    if others:
        raise ColdError(f"--kv-dtype applies to our engine's decoders only ({', '.join(ENGINE_DECODERS)}); "
                        f"leave it out or drop {', '.join(others)} from --decoders")
    return kv_dtype


def _write_outputs(report: dict, json_path: Path | None, plot_path: Path | None, markdown_path: Path | None) -> None:
    from cold.bench import report as bench_report

    e2e = report["mode"] == "e2e"
    for path in (json_path, plot_path, markdown_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        err.print(f"[dim]wrote {json_path}")
    if plot_path is not None:
        (bench_report.plot_e2e if e2e else bench_report.plot)(report, plot_path)
        err.print(f"[dim]wrote {plot_path}")
    if markdown_path is not None:
        markdown_path.write_text((bench_report.markdown_e2e if e2e else bench_report.markdown)(report))
        err.print(f"[dim]wrote {markdown_path}")
