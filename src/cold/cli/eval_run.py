"""What `cold eval` and `cold tune` share: their common options, reading a task and choosing its problems,
opening the run directory, and every decoder's records with a progress bar.

torch comes with the engine, imported on the first problem to generate (never for a fully resumed run), so that
`cold --help` does not import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cold.cli.common import check_llamacpp_options, check_positive, err, exits_on, load_engine, table_console
from cold.errors import ColdError
from cold.evaluation import runner
from cold.load.demo import demo_adapter_dir
from cold.load.pairs import shipped_pair
from cold.load.paths import fingerprint
from cold.tasks import readers as tasks
from cold.tasks.prompts import make_style

stdout = table_console(160)  # whole tables in files
EXIT_INTERRUPTED = 130
# task -> its tuning split (disjoint from the split `cold eval` reports by default)
TUNING_SPLITS = {"gsm8k": "train", "commonsenseqa": "train", "coin_flip": "gen-tune", "last_letters": "gen-tune"}

# Options that `cold eval` and `cold tune` share (typer reads the help from the type).
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop each answer after this many new tokens.")]
Seed = Annotated[int, typer.Option(help="Seed of the --limit sample.")]
BatchSize = Annotated[int, typer.Option(help="Problems decoded together in one batch.")]
Bootstrap = Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")]
Shots = Annotated[int, typer.Option(help="Worked examples in a few-shot prompt.")]
AmateurAdapter = Annotated[Optional[Path], typer.Option(help="A second PEFT LoRA adapter (same base) to be the amateur of the cold decoders marked :amateur, instead of the bare base model: for example an earlier snapshot of the same training, so that the contrast amplifies what later training added rather than subtracting what the base model knows; or an anti-expert from `cold anti-expert`. Default: a shipped expert's tuned anti-expert where it has one.")]
AmateurScale = Annotated[float, typer.Option(help="LoRA scale of the --amateur-adapter on the amateur row (1 = as trained).")]


class PromptChoice(str, Enum):
    chat = "chat"
    zero_shot = "zero-shot"
    few_shot = "few-shot"


class Rule(str, Enum):
    flexible = "flexible"
    strict = "strict"


class AnswerType(str, Enum):
    number = "number"
    yesno = "yesno"
    choice = "choice"
    text = "text"


def resumes_on_interrupt(command):
    """Ctrl-C stops a command with a hint that rerunning it resumes (finished batches are saved), and exit 130."""
    hint = "interrupted: finished batches are saved; rerun the same command to resume"
    return exits_on(KeyboardInterrupt, lambda exc: hint, EXIT_INTERRUPTED)(command)


@dataclass
class Prepared:
    """What `cold eval` and `cold tune` share: the problems, their prompt style, adapter and run directory."""

    task: object  # tasks.Task
    split: Optional[str]
    path: Path
    problems: list  # the chosen problems (tasks.Problem)
    style: object  # prompts.PromptStyle
    adapter: Optional[Path]
    amateur: Optional[Path]  # the amateur adapter of `:amateur` decoders
    amateur_scale: float
    settings: dict  # what a resumed run must share (run.json)
    sample: str  # "N of M problems ..." for reports
    out: Path
    directory: runner.RunDir  # OUT, locked while `generate_all` writes into it


def check_common(max_new_tokens, batch_size, limit, bootstrap, dtype, device, engine: str = "cold", kv_dtype=None) -> str:
    """Check the options cold eval and cold tune share; returns the dtype's name, "auto" made the one
    it means on `device`, so that the run records it (and resumes only in it); "gguf" on llama.cpp,
    which computes in the GGUF's own quantisation."""
    from cold.load.models import dtype_name, pick_dtype  # torch-bound: not at `cold --help`

    check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit)
    if bootstrap < 100:
        raise ColdError(f"--bootstrap must be >= 100, got {bootstrap}")
    if engine == "llamacpp":
        check_llamacpp_options(device, dtype, kv_dtype)
        return "gguf"
    return dtype_name(pick_dtype(dtype, device))


def prepare(task, data, split, specs, model, adapter, prompt, shots, instruction, max_new_tokens, limit, seed,
            out_dir, question_field, answer_field, answer_type, choices_field, dtype, default_split=None,
            out_prefix="", kv_dtype=None, amateur=None, amateur_scale=1.0, engine="cold") -> Prepared:
    """Read the task, pick the problems, build the prompt style, find the adapter, open the run directory."""
    the_task = tasks.get_task(task, question_field, answer_field, answer_type.value, choices_field)
    if the_task.name == tasks.GENERIC:
        if data is None:
            raise ColdError("--task jsonl needs --data FILE.jsonl")
        if split is not None:
            raise ColdError("--split applies to built-in tasks only; --task jsonl reads the --data file")
    elif split is not None and data is not None:
        raise ColdError("give either --split (a built-in file) or --data (your own file), not both")
    split_name = None if the_task.name == tasks.GENERIC or data is not None else (split or default_split or the_task.default_split)
    path = the_task.path(split_name, data)
    problems = the_task.read(path)
    total = len(problems)
    own = []
    if prompt is PromptChoice.few_shot and not the_task.family:  # exemplars from the file itself
        if shots >= len(problems):
            raise ColdError(f"--shots {shots}: {path} has only {len(problems)} rows (exemplars come from its first rows)")
        own, problems = problems[:shots], problems[shots:]
    style = make_style(prompt.value, the_task.family, shots, instruction, own)
    chosen = tasks.select(problems, limit, seed)

    adapter_path = _adapter_path(model, adapter, specs, the_task.name)
    if amateur is None and any(s.vs_amateur for s in specs):
        pair = shipped_pair(adapter_path)
        if pair is not None:  # a shipped expert's tuned anti-expert
            amateur = pair.amateur_dir
            err.print(f"amateur of the :amateur decoders: the shipped anti-expert {amateur.name} (tuned for this expert)", markup=False)
    _check_amateur(specs, amateur, amateur_scale)
    settings = {
        "task": the_task.name, "split": split_name, "data": str(path.resolve()), "data_sha1": fingerprint(path),
        "answer_type": the_task.answer_type, "model": model,
        "adapter": str(adapter_path) if adapter_path else None,
        "adapter_sha1": fingerprint(adapter_path) if adapter_path else None,
        "prompt": prompt.value, "shots": shots if prompt is PromptChoice.few_shot else None,
        "instruction": instruction, "max_new_tokens": max_new_tokens, "dtype": dtype,
        **({"kv_dtype": kv_dtype} if kv_dtype else {}),  # absent by default: older run directories still resume
        **({"engine": engine} if engine != "cold" else {}),  # likewise
        **({"amateur_adapter": str(amateur), "amateur_adapter_sha1": fingerprint(amateur),
            "amateur_scale": amateur_scale} if amateur else {}),
    }
    if the_task.name == tasks.GENERIC:
        settings.update(question_field=question_field, answer_field=answer_field, choices_field=choices_field)
    name = f"{the_task.name}-{split_name}" if split_name else path.stem
    out = out_dir or Path("eval-runs") / f"{out_prefix}{name}-{prompt.value}"
    directory = runner.open_run_dir(out, settings, informational=("data", "adapter", "amateur_adapter"))
    sample = f"{len(chosen)} of {total} problems" + (f" (seeded sample, --seed {seed})" if len(chosen) < len(problems) else "")
    if own:
        sample += f"; rows 0-{len(own) - 1} are the few-shot exemplars"
    return Prepared(the_task, split_name, path, chosen, style, adapter_path, amateur, amateur_scale, settings, sample, out,
                    directory)


def generate_all(run: Prepared, specs, model, device, dtype, max_new_tokens, batch_size, kv_dtype=None,
                 engine_name: str = "cold") -> dict[str, list[dict]]:
    """Every decoder on every chosen problem (records resumed from the run directory), with a progress bar."""
    engine = _LazyEngine(model, run.adapter, device, dtype, kv_dtype, run.amateur, run.amateur_scale, engine_name)
    err.print(f"{run.task.name}{f' ({run.split})' if run.split else ''}: {run.sample}; decoders {', '.join(s.label for s in specs)} -> {run.out}", markup=False)
    with run.directory, _progress() as progress:
        results, generated = runner.run_decoders(
            engine, run.problems, specs, run.style, run.task.answer_type, run.directory,
            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
        )
    n = len(run.problems)
    err.print("generated: " + "; ".join(f"{label} {k} new, {n - k} from records" for label, k in generated.items())
              if any(generated.values()) else "nothing to generate: every problem has a record for every decoder", markup=False)
    return results


def print_grid(header: list[str], rows: list[list[str]], title: str) -> None:
    """Print a tuning grid or a test table (`cold.evaluation.tune.table`'s header and rows) to stdout."""
    view = Table(title=escape(title), title_justify="left")
    for i, name in enumerate(header):
        view.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        view.add_row(*map(escape, row))
    stdout.print(view)


def shown(path: Path) -> str:
    """A path for reports: relative to the working directory when that is short, else absolute."""
    absolute = path.resolve()
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # another drive
        return str(absolute)
    return relative if relative.count("..") <= 2 else str(absolute)


def _adapter_path(model: str, adapter: Optional[Path], specs, task: str = "") -> Optional[Path]:
    if adapter is not None:
        if not adapter.is_dir():
            raise ColdError(f"--adapter {adapter}: directory not found")
        return adapter
    path = demo_adapter_dir(model, task)
    if path is None and any(s.needs_adapter for s in specs):
        needing = ", ".join(s.label for s in specs if s.needs_adapter)
        raise ColdError(f"decoders {needing} need a LoRA adapter and model {model!r} has no built-in one"
                        f"{f' for task {task!r}' if task else ''}; give --adapter DIR")
    return path


def _check_amateur(specs, amateur: Optional[Path], scale: float) -> None:
    """`:amateur` decoders and --amateur-adapter come together; the adapter exists; the scale is a number > 0."""
    marked = [s.label for s in specs if s.vs_amateur]
    if marked and amateur is None:
        raise ColdError(f"decoders {', '.join(marked)} contrast with an amateur adapter; give it with --amateur-adapter DIR")
    if amateur is None:
        if scale != 1.0:
            raise ColdError("--amateur-scale applies to the --amateur-adapter; give that too")
        return
    if not marked:
        raise ColdError("--amateur-adapter is used only by cold decoders marked :amateur (e.g. cold@0.1/0.5:amateur); none is given")
    if not amateur.is_dir():
        raise ColdError(f"--amateur-adapter {amateur}: directory not found")
    if not (scale > 0 and scale != float("inf")):
        raise ColdError(f"--amateur-scale must be a finite number > 0, got {scale}")


class _LazyEngine:
    """Loads the model on the first generation, so a fully resumed run never loads it.

    With an amateur adapter, the engine holds two adapters, named "expert" and "amateur"; a decoder
    spec's `vs_amateur` becomes the amateur row's adapter and scale.
    """

    def __init__(self, model: str, adapter: Optional[Path], device: str, dtype: str, kv_dtype: Optional[str] = None,
                 amateur: Optional[Path] = None, amateur_scale: float = 1.0, engine_name: str = "cold"):
        self.args = model, adapter, device, dtype, kv_dtype
        self.engine_name = engine_name
        self.amateur, self.amateur_scale = amateur, amateur_scale
        self.engine = None

    def generate(self, prompts, vs_amateur: bool = False, **kwargs):
        if self.amateur is not None and kwargs.get("decoder") != "base":
            kwargs["adapter"] = "expert"
        if vs_amateur:
            kwargs.update(amateur_adapter="amateur", amateur_scale=self.amateur_scale)
        return self.load().generate(prompts, **kwargs)

    def load(self):
        if self.engine is None:
            model, adapter, device, dtype, kv_dtype = self.args
            adapters = {adapter.name: str(adapter)} if adapter else {}
            if self.amateur is not None:
                adapters = {"expert": str(adapter), "amateur": str(self.amateur)}
            what = (f"Loading {model}" + (f" with adapter {adapter.name}" if adapter else "")
                    + (f" and amateur adapter {self.amateur.name}" if self.amateur else ""))
            self.engine = load_engine(self.engine_name, model, adapters, device, "auto" if dtype == "gguf" else dtype,
                                      kv_dtype, what)
            self.engine.generate(["Hello"], decoder="base", max_new_tokens=2)  # warm-up, outside any timing
        return self.engine


class _progress:
    """A rich progress bar on stderr, one line per decoder: `with _progress() as update: update(label, done, total)`."""

    def __enter__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=err)
        self.bar.__enter__()
        self.tasks: dict[str, int] = {}
        return self.update

    def update(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total, completed=done)
        self.bar.update(self.tasks[label], completed=done, total=total)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)
