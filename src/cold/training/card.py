"""What a training run writes beside its adapter for a reader: the model card `README.md`, the loss
curve `loss.png` and the command that reproduces the run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from cold.load.paths import data_root
from cold.training.data import DEFAULT_DATA, TASK_FORMATS
from cold.training.encoding import END_OF_TURN
from cold.training.recipe import LORA_DROPOUT, MAX_GRAD_NORM, WEIGHT_DECAY

COMMAND = ("python", "-m", "cold.training")  # the command line of cold/training/__main__.py
# train_lora's arguments in the order the reproduce command gives them (target modules come last)
COMMAND_OPTIONS = ("base_model", "task", "data_path", "output_dir", "rank", "lora_alpha", "max_steps",
                   "batch_size", "learning_rate", "max_length", "seed", "threads", "save_dtype", "save_at",
                   "prompt_format")


def reproduce_command(hparams: dict) -> str:
    """The `python -m cold.training` command line that trains the same adapter."""
    args = list(COMMAND)
    for key in COMMAND_OPTIONS:
        value = hparams.get(key)
        if value is None:
            continue
        args += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    args += ["--target-modules", *hparams["target_modules"]]
    return shlex.join(args)


def plot_loss(losses: list[float], path: Path) -> bool:
    """Draw a small loss curve (raw + running mean); False if matplotlib is missing."""
    try:  # matplotlib is optional
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 20)
    running = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(steps, losses, alpha=0.35, linewidth=0.8, label="loss")
    ax.plot(steps, running, linewidth=1.5, label=f"running mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _data_shown(data_path: str, hp: dict) -> str:
    """The training file as a reader can find it: the generated split by name, else the path given."""
    if hp.get("data_path") is None and hp["task"] not in DEFAULT_DATA:
        return f"the generated `gen-train` split of `cold.tasks.generators` (`{Path(data_path).name}`)"
    path, shared = Path(data_path), data_root()
    if path.is_absolute() and path.is_relative_to(shared):  # the shared data beside the repository
        return f"`../shared/data/{path.relative_to(shared)}`"
    return f"`{data_path}`"


def _format_shown(hp: dict) -> str:
    if hp.get("prompt_format") == "zero-shot":
        return ("`cold eval --prompt zero-shot`'s text prompt `Question: <question>\\nAnswer:` (evaluate with "
                "`--prompt zero-shot`), then ` <answer>` and the EOS token, with <answer> =")
    return f"the tokenizer's chat template, user = question, assistant (ending in `{END_OF_TURN}`) ="


def write_model_card(output_dir: Path, summary: dict, has_plot: bool) -> None:
    """`output_dir/README.md` from a run's summary: data, format, hyper-parameters, losses, reproduce command."""
    hp = summary["hyperparameters"]
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hp.items())
    plot = "\n![loss curve](loss.png)\n" if has_plot else ""
    card = f"""---
library_name: peft
base_model: {hp['base_model']}
tags: [lora, {hp['task']}, cold]
---

# LoRA adapter: {hp['base_model']} on {hp['task']}

A rank-{hp['rank']} LoRA adapter trained with `cold.training` for Contrastive LoRA Decoding.
Weights are stored as {hp['save_dtype']} safetensors; load with
`peft.PeftModel.from_pretrained(base_model, "<this directory>")`.

## Data

- {_data_shown(summary['data_path'], hp)}: {summary['num_train_examples']} examples used
  ({summary['skipped_too_long']} longer than {hp['max_length']} tokens skipped).
- Format: {_format_shown(hp)} {TASK_FORMATS.get(hp['task'], 'the answer')}.
- Loss only on the answer tokens and its end; prompt tokens are masked.
- Examples seen: {summary['examples_seen']} ({summary['epochs']:.3f} epochs), seeded shuffle.

## Training

| hyper-parameter | value |
|---|---|
{rows}

AdamW (weight decay {WEIGHT_DECAY}), linear warm-up over {summary['warmup_steps']} steps then linear decay
to 0, gradient clipping at {MAX_GRAD_NORM}, LoRA dropout {LORA_DROPOUT}.

## Results

- Steps: {summary['steps']}
- Final loss: {summary['final_loss']:.4f}
- Smoothed loss (mean of the last 10% of steps): {summary['smoothed_loss']:.4f}
- First-step loss: {summary['first_loss']:.4f}
- Wall time: {summary['wall_time_s']:.0f} s ({summary['seconds_per_step']:.2f} s/step,
  {hp['threads'] or 'default'} CPU thread(s), torch {summary['torch_version']})
{plot}
## Reproduce

From the repository root, with the project installed:

```bash
{summary['command']}
```
"""
    (output_dir / "README.md").write_text(card)
