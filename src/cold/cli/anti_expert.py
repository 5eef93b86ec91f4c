"""`cold anti-expert`: from an expert adapter to the anti-expert that repairs it, as a ready CoLD pair.

    OUT/mistakes/        stage 1: the expert's greedy answers on training problems (a `cold eval` run);
                         for multiple choice its ranking of each problem's choices (`choices.jsonl`)
    OUT/negatives.json   stage 2: its wrong, finished answers (`cold.training.negatives`); for
                         multiple choice its most tempting wrong choices (`cold.training.hard_negatives`)
    OUT/anti-expert/     stage 3: the anti-expert, trained on them with the expert's recipe; with
                         stage 6's `cold-pair.json` (the tuned setting) and its model card: the pair
    OUT/tune/            stage 4: the alpha x beta grid against the anti-expert on a tuning split (`cold tune`)
    OUT/test/            stage 5: expert and the tuned CoLD on the test split (skipped with --no-test)

Every stage keeps its output; a rerun skips what is finished (the eval stages resume problem by
problem). The training, tuning and test problems are disjoint (checked by question text), and the
tuning problems are drawn first where tuning and training share a file.

Torch and the training code are imported inside the command, so that `cold --help` does not import them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cold.cli.common import Device, Dtype, EvalModel, err, parse_adapter_specs, reports_errors
from cold.cli.eval_run import (
    TUNING_SPLITS,
    AnswerType,
    BatchSize,
    Bootstrap,
    MaxNewTokens,
    PromptChoice,
    Seed,
    _progress,
    check_common,
    generate_all,
    prepare,
    print_grid,
    resumes_on_interrupt,
    shown,
    stdout,
)
from cold.errors import ColdError
from cold.load.paths import fingerprint
from cold.tasks import readers as tasks

# task -> where mistakes come from
TRAINING_SPLITS = {"coin_flip": "gen-train", "last_letters": "gen-train", "gsm8k": "train", "commonsenseqa": "train"}
ANTI_EXPERT_DIR, MISTAKES_DIR, NEGATIVES_FILE, TUNE_DIR, TEST_DIR = "anti-expert", "mistakes", "negatives.json", "tune", "test"
CHOICES_FILE = "choices.jsonl"  # in OUT/mistakes, multiple choice: one line per problem, {"id", "ranked", "gold"}
STAGES = 6
TRAINED_STAMP = "anti-expert.trained.json"  # in OUT: the settings and data sha1 of the finished training
# the recipe where the expert's own training log does not say (the shipped adapters' recipe)
DEFAULT_RECIPE = {"batch_size": 8, "learning_rate": 5e-4, "max_length": 256, "seed": 0, "prompt_format": "auto"}


@reports_errors
@resumes_on_interrupt
def anti_expert_command(
    adapter: Annotated[str, typer.Option(help="The expert: a PEFT LoRA adapter directory, or a shipped adapter's name (e.g. smollm2-coin_flip-step-50).")],
    task: Annotated[str, typer.Option(help="coin_flip, last_letters, gsm8k, commonsenseqa (multiple choice: the expert's most tempting wrong choices train the anti-expert; each has a training, a tuning and a test split), or jsonl with --data, --tune-data and --test-data (question/answer JSONL).")] = "coin_flip",
    data: Annotated[Optional[Path], typer.Option(help="Training problems: your own file instead of the task's training split.")] = None,
    tune_data: Annotated[Optional[Path], typer.Option(help="Tuning problems: your own file instead of the task's tuning split (may be the --data file: its tuning sample is then kept out of training).")] = None,
    test_data: Annotated[Optional[Path], typer.Option(help="Test problems: your own file instead of the task's test split.")] = None,
    test: Annotated[bool, typer.Option("--test/--no-test", help="Measure the tuned pair against the expert on the test split (stage 5).")] = True,
    limit: Annotated[int, typer.Option(help="Training problems the expert answers (its wrong answers are the data).")] = 480,
    tune_limit: Annotated[int, typer.Option(help="Tuning problems (a seeded sample).")] = 100,
    test_limit: Annotated[Optional[int], typer.Option(help="Test problems (default: the whole test split).")] = None,
    alphas: Annotated[str, typer.Option(help="Plausibility thresholds alpha to tune (comma-separated).")] = "0.1,0.3",
    betas: Annotated[str, typer.Option(help="Contrast strengths beta to tune (comma-separated).")] = "0.5,1,2",
    schedules: Annotated[str, typer.Option(help="Beta schedules to tune: constant, entropy, jsd (comma-separated).")] = "constant",
    max_steps: Annotated[int, typer.Option(help="Training steps of the anti-expert (the rest of the recipe is the expert's).")] = 100,
    min_mistakes: Annotated[int, typer.Option(help="Refuse to train on fewer wrong answers than this.")] = 20,
    model: EvalModel = "smollm2",
    prompt: Annotated[PromptChoice, typer.Option(help="chat or zero-shot: how the expert is prompted (its training format).")] = PromptChoice.chat,
    max_new_tokens: MaxNewTokens = 256,
    answer_type: Annotated[AnswerType, typer.Option(help="--task jsonl: how answers are compared.")] = AnswerType.number,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    bootstrap: Bootstrap = 10_000,
    threads: Annotated[Optional[int], typer.Option(help="torch threads for training (default: torch's choice).")] = None,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default: runs/anti-expert/EXPERT). Rerunning resumes.")] = None,
) -> None:
    """Train the anti-expert that repairs an expert adapter, tune CoLD against it, and write the pair.

    The expert answers training problems; its wrong, finished answers train an anti-expert with the expert's own recipe; CoLD's alpha and beta are tuned against it on a tuning split; the tuned pair is measured on the test split. Each stage's output is kept: rerunning skips what is finished.

    The result, OUT/anti-expert, is a PEFT adapter with `cold-pair.json` (the tuned setting) that `cold generate --amateur`, `cold eval --amateur-adapter` and `cold serve` take as CoLD's amateur.

    Example (the shipped coin-flip pair, from its expert, in about 25 minutes on 2 cores):

      cold anti-expert --adapter smollm2-coin_flip-step-50 --task coin_flip --out runs/anti-expert/cf50
    """
    from cold.evaluation import tune as tuning
    from cold.evaluation.decoders import DecoderSpec

    dtype = check_common(max_new_tokens, batch_size, limit, bootstrap, dtype, device)
    for name, value in (("tune-limit", tune_limit), ("test-limit", test_limit), ("max-steps", max_steps), ("min-mistakes", min_mistakes)):
        if value is not None and value < 1:
            raise ColdError(f"--{name} must be >= 1, got {value}")
    if prompt is PromptChoice.few_shot:
        raise ColdError("--prompt few-shot: an anti-expert learns the expert's answers in its training format; use chat or zero-shot")
    expert = _expert_dir(adapter, model)
    grid = tuning.grid_specs(tuning.parse_grid(alphas, "alphas", 0.0, 1.0), tuning.parse_grid(betas, "betas", 0.0), [], ["logit"],
                             vs_amateur=True, schedules=tuning.parse_schedules(schedules))
    the_task = tasks.get_task(task, answer_type=answer_type.value)
    choice = the_task.answer_type == "choice"
    if the_task.name != tasks.GENERIC and the_task.name not in TRAINING_SPLITS and data is None:
        raise ColdError(f"task {task!r} has no training split: give --data, --tune-data and --test-data")
    if the_task.name == tasks.GENERIC and (data is None or tune_data is None or (test and test_data is None)):
        raise ColdError("--task jsonl needs --data (training problems), --tune-data and --test-data (or --no-test)")
    out = out_dir or Path("runs") / "anti-expert" / expert.name
    amateur = out / ANTI_EXPERT_DIR
    splits = _Splits(the_task, data, tune_data, test_data if test else None, limit, tune_limit, test_limit, seed, test)
    common = dict(model=model, prompt=prompt, shots=0, instruction="", max_new_tokens=max_new_tokens, seed=seed,
                  question_field="question", answer_field="answer", answer_type=answer_type, choices_field=None, dtype=dtype)

    if choice:
        _stage(1, f"the expert's ranking of the choices of {len(splits.train)} training problems -> "
                  f"{shown(out / MISTAKES_DIR / CHOICES_FILE)}")
        ranked = _rank_choices(expert, model, splits.train, out / MISTAKES_DIR / CHOICES_FILE, _prompt_format(expert, prompt),
                               device, dtype)
        _stage(2, f"its most tempting wrong choices -> {shown(out / NEGATIVES_FILE)}")
        examples = _hard_negatives(out, splits.train, ranked, min_mistakes)
    else:
        _stage(1, f"the expert's answers on {len(splits.train)} training problems -> {shown(out / MISTAKES_DIR)}")
        run = prepare(task, data, splits.train_split, [DecoderSpec("expert")], adapter=expert, limit=None,
                      out_dir=out / MISTAKES_DIR, **common)
        _restrict(run, splits.train)
        generate_all(run, [DecoderSpec("expert")], model, device, dtype, max_new_tokens, batch_size)
        _stage(2, f"its wrong answers -> {shown(out / NEGATIVES_FILE)}")
        examples = _negatives(out, min_mistakes)

    _stage(3, f"the anti-expert, {max_steps} steps of the expert's recipe -> {shown(amateur)}")
    recipe = _train(expert, model, out, amateur, max_steps, threads, prompt, "hard-negatives" if choice else "self-negatives")

    _stage(4, f"alpha x beta against it on {len(splits.tune)} tuning problems -> {shown(out / TUNE_DIR)}")
    specs = [DecoderSpec("expert"), *grid[1:]]
    run = prepare(task, tune_data, splits.tune_split, specs, adapter=expert, limit=None, out_dir=out / TUNE_DIR,
                  amateur=amateur, **common)
    _restrict(run, splits.tune)
    summary = tuning.summarize(generate_all(run, specs, model, device, dtype, max_new_tokens, batch_size), specs, "flexible", bootstrap)
    tuned, best = summary, tuning.best_contrast(summary)
    chosen = next(s for s in specs if s.label == best["decoder"])
    title = f"cold anti-expert, tuning: {the_task.name} ({run.split or shown(run.path)}), n = {len(splits.tune)}"
    tuning.write_outputs(summary, out / TUNE_DIR, title, [("expert", shown(expert)), ("amateur", shown(amateur))])
    print_grid(*tuning.table(summary), title)
    if best["vs_expert"]["value"] <= 0:
        err.print(f"[yellow]warning:[/] no setting beat the expert on the tuning problems (best {escape(chosen.label)}: "
                  f"{100 * best['vs_expert']['value']:+.1f} points); the pair is written, but the expert alone may be better")

    result = None
    if test:
        _stage(5, f"expert and {chosen.label} on {len(splits.test)} test problems -> {shown(out / TEST_DIR)}")
        specs = [DecoderSpec("expert"), chosen]
        run = prepare(task, test_data, splits.test_split, specs, adapter=expert, limit=None, out_dir=out / TEST_DIR,
                      amateur=amateur, **common)
        _restrict(run, splits.test)
        summary = tuning.summarize(generate_all(run, specs, model, device, dtype, max_new_tokens, batch_size), specs, "flexible", bootstrap)
        print_grid(*tuning.table(summary), f"cold anti-expert, test: {the_task.name} ({run.split or shown(run.path)}), n = {len(splits.test)}")
        result = _result(summary, chosen.label, run)
    else:
        _stage(5, "skipped (--no-test)")

    _stage(6, f"the pair -> {shown(amateur)}")
    _write_pair(amateur, expert, model, chosen, best, run_info={
        "task": the_task.name, "recipe": recipe, "negatives": len(examples),
        "tuning": {"split": splits.tune_split or str(tune_data), "n": len(splits.tune), "alphas": alphas, "betas": betas,
                   "schedules": schedules, "chosen": chosen.label, "accuracy": best["accuracy"], "vs_expert_points": _points(best["vs_expert"]),
                   "grid": [{k: r[k] for k in ("decoder", "accuracy", "vs_expert")} for r in tuned["settings"]]},
        **({"test": result} if result else {}),
    })
    _print_usage(expert, amateur, chosen.label, the_task.name, model)


# ---- the stages' pieces ---------------------------------------------------------------------


def _stage(number: int, what: str) -> None:
    err.print(f"[bold]\\[{number}/{STAGES}][/] {escape(what)}")


def _expert_dir(adapter: str, model: str) -> Path:
    """The expert's directory (a shipped name resolved); ColdError when it is not an adapter of `model`."""
    path = Path(next(iter(parse_adapter_specs([adapter]).values())))
    config = path / "adapter_config.json"
    if not config.is_file():
        raise ColdError(f"--adapter {adapter}: no PEFT adapter there (adapter_config.json not found)")
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    from cold.load.models import BUILTIN_MODELS

    if base in BUILTIN_MODELS and model in BUILTIN_MODELS and base != model:
        raise ColdError(f"--adapter {adapter} was trained on base model {base!r}, not {model!r}: give --model {base}")
    return path


class _Splits:
    """The training, tuning and test problems: seeded samples, disjoint by question text."""

    def __init__(self, task, data, tune_data, test_data, limit, tune_limit, test_limit, seed, test: bool):
        generic = task.name == tasks.GENERIC
        self.train_split = None if generic or data else TRAINING_SPLITS[task.name]
        self.tune_split = None if generic or tune_data else TUNING_SPLITS[task.name]
        self.test_split = None if generic or test_data else task.default_split
        train_path, tune_path = task.path(self.train_split, data), task.path(self.tune_split, tune_data)
        self.tune = tasks.select(task.read(tune_path), tune_limit, seed)
        taken = {p.id for p in self.tune} if tune_path.resolve() == train_path.resolve() else set()
        self.train = tasks.select([p for p in task.read(train_path) if p.id not in taken], limit, seed)
        self.test = tasks.select(task.read(task.path(self.test_split, test_data)), test_limit, seed) if test else []
        named = [("training", self.train, train_path), ("tuning", self.tune, tune_path)]
        if test:
            named.append(("test", self.test, task.path(self.test_split, test_data)))
        for i, (a, first, a_path) in enumerate(named):
            for b, second, b_path in named[i + 1 :]:
                shared = {_key(p) for p in first} & {_key(p) for p in second}
                if shared:
                    raise ColdError(f"the {a} problems ({a_path}) and the {b} problems ({b_path}) share {len(shared)} "
                                    f"question(s), e.g. {next(iter(shared))[:80]!r}: give disjoint files")


def _restrict(run, problems: list) -> None:
    """Run on `problems` (chosen by `_Splits`) instead of the sample `prepare` drew."""
    run.problems, run.sample = problems, f"{len(problems)} problems (seed-sampled, disjoint from the other stages')"


def _key(problem) -> str:
    return " ".join(problem.question.split()).lower()


def _negatives(out: Path, min_mistakes: int) -> list[dict]:
    from cold.training.negatives import self_negatives, write_negatives

    examples, counts = self_negatives(out / MISTAKES_DIR)
    found = (f"{counts['negatives']} wrong, finished answers in {counts['records']} ({counts['right']} right, "
             f"{counts['cut off']} cut off at the token limit)")
    if counts["negatives"] < min_mistakes:
        raise ColdError(f"the expert gave {found}: too few mistakes to learn from (--min-mistakes {min_mistakes}); "
                        "give more training problems (--limit) or an expert with room to improve")
    write_negatives(examples, out / NEGATIVES_FILE)
    err.print(escape(found))
    return examples


def _rank_choices(expert: Path, model: str, problems: list, path: Path, prompt_format: str, device, dtype) -> dict[str, list[str]]:
    """{problem id: its choice labels, the expert's favourite first} for every problem, kept one line
    per problem in `path` (a rerun ranks only the problems not there yet)."""
    ranked = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            ranked[record["id"]] = record["ranked"]
    todo = [p for p in problems if p.id not in ranked]
    if not todo:
        err.print("nothing to score: every problem's choices are ranked")
        return ranked
    import torch
    from peft import PeftModel

    from cold.load.models import load_base
    from cold.training.encoding import resolve_prompt_format
    from cold.training.hard_negatives import rank_choices

    base = load_base(model, device=device, dtype=dtype)
    scorer = PeftModel.from_pretrained(base.model, str(expert)).eval()
    resolved = resolve_prompt_format(base.tokenizer, prompt_format, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), path.open("a", encoding="utf-8") as records, _progress() as progress:
        for done, problem in enumerate(todo, 1):
            ranked[problem.id] = rank_choices(scorer, base.tokenizer, problem, resolved)
            records.write(json.dumps({"id": problem.id, "ranked": ranked[problem.id], "gold": problem.gold}) + "\n")
            records.flush()
            progress("expert's ranking", done, len(todo))
    return ranked


def _hard_negatives(out: Path, problems: list, ranked: dict[str, list[str]], min_mistakes: int) -> list[dict]:
    from cold.training.hard_negatives import hard_negative
    from cold.training.negatives import write_negatives

    mistakes = sum(ranked[p.id][0] != p.gold for p in problems)
    found = f"the expert ranks a wrong choice first on {mistakes} of {len(problems)} training problems"
    if mistakes < min_mistakes:
        raise ColdError(f"{found}: too few mistakes to learn from (--min-mistakes {min_mistakes}); "
                        "give more training problems (--limit) or an expert with room to improve")
    examples = [hard_negative(p, ranked[p.id]) for p in problems]
    write_negatives(examples, out / NEGATIVES_FILE)
    err.print(escape(f"{found}; on every problem its most tempting wrong choice is the anti-expert's answer"))
    return examples


def _prompt_format(expert: Path, prompt) -> str:
    """The prompt format the expert was trained in, as `cold train --prompt` takes it."""
    from cold.training.recipe import recipe_of

    recipe = {**DEFAULT_RECIPE, **recipe_of(expert)[0]}
    if recipe["prompt_format"] == "auto":
        return "zero-shot" if prompt is PromptChoice.zero_shot else "auto"
    return recipe["prompt_format"]


def _train(expert: Path, model: str, out: Path, amateur: Path, max_steps: int, threads, prompt, task: str) -> dict:
    """Train the anti-expert on OUT's negatives (`task`: their training format) unless a finished one
    with this recipe and data is there; its recipe."""
    from cold.training.recipe import recipe_of

    recipe, source = recipe_of(expert)
    recipe = {**DEFAULT_RECIPE, **recipe, "prompt_format": _prompt_format(expert, prompt)}
    settings = dict(base_model=model, task=task, data_path=str(out / NEGATIVES_FILE), output_dir=str(amateur),
                    max_steps=max_steps, threads=threads, **{**recipe, "target_modules": tuple(recipe["target_modules"])})
    err.print(f"recipe from {escape(source)}: " + ", ".join(f"{k} {v}" for k, v in recipe.items() if k != "target_modules"))
    stamp = out / TRAINED_STAMP  # what the finished anti-expert was trained with: its settings and data
    trained = {**{k: v for k, v in settings.items() if k != "threads"}, "target_modules": list(recipe["target_modules"]),
               "data_sha1": fingerprint(out / NEGATIVES_FILE)}
    if stamp.is_file() and (amateur / "adapter_model.safetensors").is_file() and json.loads(stamp.read_text()) == trained:
        err.print("already trained: skipped")
        return recipe
    from cold.training.trainer import train_lora

    stamp.unlink(missing_ok=True)
    train_lora(**settings)
    stamp.write_text(json.dumps(trained, indent=2) + "\n", encoding="utf-8")
    return recipe


def _points(interval: dict) -> dict:
    return {k: round(100 * interval[k], 1) for k in ("value", "low", "high")}


def _result(summary: dict, label: str, run) -> dict:
    rows = {r["decoder"]: r for r in summary["settings"]}
    return {"split": run.split or str(run.path), "n": len(run.problems), "expert": rows["expert"]["accuracy"]["value"],
            "cold": rows[label]["accuracy"]["value"], "vs_expert_points": _points(rows[label]["vs_expert"])}


def _write_pair(amateur: Path, expert: Path, model: str, chosen, best: dict, run_info: dict) -> None:
    from cold.load.pairs import write_pair

    setting = {"alpha": chosen.alpha, "beta": chosen.beta, "beta_schedule": chosen.beta_schedule,
               "scoring": "logprob" if chosen.kind == "cold-logprob" else "logit"}
    write_pair(amateur, expert, model, setting, **run_info)
    card = amateur / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    section = (f"\n## CoLD pair\n\nAn anti-expert: trained on the wrong answers of the expert `{expert.name}` "
               f"(`{expert}`), to be its amateur in CoLD. Tuned setting: `{chosen.label}` "
               f"({100 * best['vs_expert']['value']:+.1f} points over the expert on {run_info['tuning']['n']} tuning problems)"
               + (f"; on the test split {run_info['test']['vs_expert_points']['value']:+.1f} "
                  f"[{run_info['test']['vs_expert_points']['low']:+.1f}, {run_info['test']['vs_expert_points']['high']:+.1f}] points"
                  if "test" in run_info else "")
               + ". The setting and the whole grid are in `cold-pair.json`.\n")
    marker = "\n## CoLD pair\n"
    card.write_text((text.split(marker)[0] if marker in text else text).rstrip("\n") + "\n" + section, encoding="utf-8")


def _print_usage(expert: Path, amateur: Path, label: str, task: str, model: str) -> None:
    model_flag = [] if model == "smollm2" else ["--model", model]
    lines = [
        ["cold", "generate", *model_flag, "--adapter", str(expert), "--amateur", str(amateur), "--compare", "--chat", "..."],
        ["cold", "eval", *model_flag, "--task", task, "--adapter", str(expert), "--amateur-adapter", str(amateur),
         "--decoders", f"expert,{label}"],
        ["cold", "serve", *model_flag, "--adapter", f"expert={expert}", "--adapter", f"anti-expert={amateur}"],
    ]
    stdout.print("use the pair:\n" + "\n".join("  " + shlex.join(line) for line in lines), markup=False)
