"""Train a LoRA adapter on a base model with PEFT and a plain PyTorch loop.

The default recipe fine-tunes the built-in SmolLM2-135M-Instruct on GSM8K: each example
is formatted with the tokenizer's chat template (user = question, assistant = worked
answer ending in ``#### N``) and only the assistant tokens carry loss. Models without a chat
template (Gemma 3 270M, a pretrained base) train on `cold eval`'s zero-shot text prompt instead,
``Question: ...\nAnswer:`` then `` <answer><eos>``. The run is seeded
and deterministic on CPU; the output directory is a standard PEFT adapter (float16
safetensors) plus ``training_log.json``, a model card ``README.md`` and ``loss.png``.

Run it as ``python -m cold.training.lora --max-steps 200 --threads 1 --output-dir DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cold.errors import ColdError
from cold.load.paths import data_root

_CSQA_TRAIN = "commonsenseqa/train_rand_split.jsonl"
DEFAULT_DATA = {  # task -> its train file, relative to the data root (cold.load.paths.data_root)
    "gsm8k": "gsm8k/train.jsonl",
    "commonsenseqa": _CSQA_TRAIN,
    "commonsenseqa-text": _CSQA_TRAIN,
    "commonsenseqa-text-wrong": _CSQA_TRAIN,
}
# CommonsenseQA tunes on its train file (it has no other labelled split besides dev, the test
# split): the rows of `cold tune`'s default sample (up to this many, seed 0) are kept out of training.
TUNING_RESERVE = 500
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"
PROMPT_FORMATS = ("auto", "chat", "zero-shot")  # zero-shot: `cold eval --prompt zero-shot`'s text prompt
WARMUP_FRACTION = 0.05
LORA_DROPOUT = 0.05
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


# --------------------------------------------------------------------------- data


@dataclass
class Example:
    """One tokenised training example: prompt tokens are masked out of the labels."""

    input_ids: list[int]
    labels: list[int]


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K's ``<<48/2=24>>`` calculator annotations; keep the final ``#### N`` line."""
    return _CALCULATOR_ANNOTATION.sub("", answer).strip()


def load_gsm8k(path: Path) -> list[tuple[str, str]]:
    """Read GSM8K jsonl into (question, cleaned answer) pairs."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            try:
                pairs.append((record["question"].strip(), clean_gsm8k_answer(record["answer"])))
            except KeyError as exc:
                raise ColdError(f"{path}:{line_no}: missing field {exc}") from exc
    return pairs


def load_worked_examples(path: Path) -> list[tuple[str, str]]:
    """A generated symbolic split ({"examples": [{"question", "worked", ...}]}) into (question, worked answer)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
        return [(row["question"], row["worked"]) for row in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise ColdError(f"{path}: expected {{\"examples\": [{{\"question\", \"worked\"}}, ...]}} ({exc!r})") from exc


def load_commonsenseqa(path: Path, answer_text: bool = False, wrong: bool = False) -> list[tuple[str, str]]:
    """CommonsenseQA rows as (question with its answer choices, `The answer is (X).`), or with
    `answer_text` `The answer is <the choice's text>.` (`cold eval`'s flexible rule maps the text
    back to its letter).

    `wrong` answers with one of the wrong choices instead (drawn per row, seeded by the row's id):
    the data of an anti-expert, an adapter that learns the answer format and what is *not* the
    answer, to serve as CoLD's amateur (`cold eval --amateur-adapter`).

    The question is worded exactly as `cold eval` words it, and the rows `cold tune` samples by
    default (`TUNING_RESERVE`, seed 0) are left out, so tuning on the train file stays held out.
    """
    from cold.tasks.prompts import question_text
    from cold.tasks.readers import read_commonsenseqa, select

    problems = read_commonsenseqa(path)
    reserved = {p.id for p in select(problems, TUNING_RESERVE, seed=0)}
    pairs = []
    for p in problems:
        if p.id not in reserved:
            label = p.gold
            if wrong:
                label = random.Random(f"wrong:{p.id}").choice(sorted(c for c, _ in p.choices if c != p.gold))
            answer = dict(p.choices)[label] if answer_text else f"({label})"
            pairs.append((question_text(p), f"The answer is {answer}."))
    return pairs


TASK_LOADERS = {
    "gsm8k": load_gsm8k,
    "coin_flip": load_worked_examples,
    "last_letters": load_worked_examples,
    "commonsenseqa": load_commonsenseqa,
    "commonsenseqa-text": lambda path: load_commonsenseqa(path, answer_text=True),
    "commonsenseqa-text-wrong": lambda path: load_commonsenseqa(path, answer_text=True, wrong=True),
}


_CSQA_NOTE = f"question and choices worded as `cold eval` words them; the {TUNING_RESERVE} rows of `cold tune`'s default sample left out"
TASK_FORMATS = {
    "gsm8k": "worked answer with the `<<a=b>>` calculator annotations removed, ending in `#### <number>`",
    "coin_flip": "worked answer (who flips, how often, parity) ending in `The answer is yes|no.`",
    "last_letters": "worked answer (each name's last letter, then the concatenation) ending in `The answer is <letters>.`",
    "commonsenseqa": f"`The answer is (X).` ({_CSQA_NOTE})",
    "commonsenseqa-text": f"`The answer is <the right choice's text>.` ({_CSQA_NOTE})",
    "commonsenseqa-text-wrong": f"`The answer is <a wrong choice's text>.`, one wrong choice per row drawn at random: an anti-expert, for use as CoLD's amateur ({_CSQA_NOTE})",
}


def default_data(task: str) -> Path:
    """GSM8K's public train file; the generated `gen-train` split of a symbolic task."""
    if task in DEFAULT_DATA:
        return data_root() / DEFAULT_DATA[task]
    from cold.tasks.readers import generated_file

    return generated_file(task, "gen-train")


def load_task(task: str, data_path: str | Path | None) -> tuple[Path, list[tuple[str, str]]]:
    if task not in TASK_LOADERS:
        raise ColdError(f"task {task!r} is not one of {', '.join(sorted(TASK_LOADERS))}")
    path = Path(data_path) if data_path else default_data(task)
    if not path.is_file():
        raise ColdError(f"training data {path} not found")
    pairs = TASK_LOADERS[task](path)
    if not pairs:
        raise ColdError(f"training data {path} is empty")
    return path, pairs


def has_chat_format(tokenizer) -> bool:
    """Whether the tokenizer has a chat template that ends turns with SmolLM2's END_OF_TURN."""
    return bool(getattr(tokenizer, "chat_template", None)) and END_OF_TURN in tokenizer.get_vocab()


def resolve_prompt_format(tokenizer, requested: str, model_name: str) -> str:
    """`auto` -> chat where the tokenizer has the chat format, else zero-shot text."""
    if requested == "auto":
        return "chat" if has_chat_format(tokenizer) else "zero-shot"
    if requested == "chat" and not has_chat_format(tokenizer):
        raise ColdError(f"{model_name}: the chat format needs a chat template ending turns in {END_OF_TURN} "
                        "(SmolLM2's); this model's tokenizer has none: train with --prompt zero-shot")
    return requested


def prompt_ids(tokenizer, question: str, prompt_format: str = "chat") -> list[int]:
    """Chat-template tokens up to and including the assistant header, or the zero-shot text prompt
    tokenised as the engine tokenises it at inference (with the tokenizer's special tokens)."""
    if prompt_format == "zero-shot":
        from cold.tasks.prompts import plain_prompt

        return list(tokenizer(plain_prompt(question)).input_ids)
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def completion_ids(tokenizer, answer: str, prompt_format: str = "chat") -> list[int]:
    """The answer and its end: END_OF_TURN (chat), or ` answer` and the EOS token (zero-shot)."""
    if prompt_format == "zero-shot":
        return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, question: str, answer: str, max_length: int, prompt_format: str = "chat") -> Example | None:
    """Prompt + answer + its end; loss only on answer and end. None if too long."""
    prompt = prompt_ids(tokenizer, question, prompt_format)
    completion = completion_ids(tokenizer, answer, prompt_format)
    if len(prompt) + len(completion) > max_length:
        return None
    return Example(input_ids=prompt + completion, labels=[IGNORE_INDEX] * len(prompt) + completion)


def encode_dataset(tokenizer, pairs, max_length: int, prompt_format: str = "chat") -> tuple[list[Example], int]:
    """Tokenise every pair; return the examples that fit and how many were skipped."""
    examples = [encode_example(tokenizer, q, a, max_length, prompt_format) for q, a in pairs]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


class BatchStream:
    """Endless batches over the examples, reshuffled each epoch with a seeded RNG."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.epoch = 0

    def next_indices(self) -> list[int]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            batch.append(self.order.pop())
        return batch

    def next_batch(self, pad_id: int) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in self.next_indices()], pad_id)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --------------------------------------------------------------------------- model


def attach_lora(model, rank: int, lora_alpha: int, target_modules) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def causal_lm_loss(peft_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions.

    The vocabulary projection is applied only at positions that predict a labelled
    token, which skips most of the (large) lm_head work on prompt and padding tokens.
    """
    causal_lm = peft_model.get_base_model()
    decoder, lm_head = getattr(causal_lm, "model", None), getattr(causal_lm, "lm_head", None)
    if decoder is None or lm_head is None:  # unusual architecture: let transformers do it
        return peft_model(**batch).loss
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def linear_schedule(optimizer, max_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- saving


def convert_safetensors_dtype(path: Path, dtype: str) -> None:
    """Rewrite a safetensors file with floating tensors cast to `dtype`, keeping metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cold.load.models import pick_dtype

    target = pick_dtype(dtype)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors = {n: (t.to(target) if t.is_floating_point() else t).contiguous() for n, t in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)


def save_adapter(peft_model, output_dir: Path, base_model: str, save_dtype: str) -> Path:
    """Save a standard PEFT adapter directory and shrink its weights to `save_dtype`."""
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    # Embeddings are never trained; False also stops PEFT looking the base name up online.
    peft_model.save_pretrained(str(output_dir), save_embedding_layers=False)
    weights = output_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ColdError(f"PEFT did not write {weights}")
    convert_safetensors_dtype(weights, save_dtype)
    return weights


def smoothed(losses: list[float], fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of the losses (at least one)."""
    tail = losses[-max(1, math.ceil(len(losses) * fraction)):]
    return sum(tail) / len(tail)


def plot_loss(losses: list[float], path: Path) -> bool:
    """Draw a small loss curve (raw + running mean); False if matplotlib is missing."""
    try:
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


def reproduce_command(hparams: dict) -> str:
    args = ["python", "-m", "cold.training.lora"]
    for key in ("base_model", "task", "data_path", "output_dir", "rank", "lora_alpha", "max_steps",
                "batch_size", "learning_rate", "max_length", "seed", "threads", "save_dtype", "save_at",
                "prompt_format"):
        value = hparams.get(key)
        if value is None:
            continue
        args += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    args += ["--target-modules", *hparams["target_modules"]]
    return shlex.join(args)


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
    hp = summary["hyperparameters"]
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hp.items())
    plot = "\n![loss curve](loss.png)\n" if has_plot else ""
    card = f"""---
library_name: peft
base_model: {hp['base_model']}
tags: [lora, {hp['task']}, cold]
---

# LoRA adapter: {hp['base_model']} on {hp['task']}

A rank-{hp['rank']} LoRA adapter trained with `cold.training.lora` for Contrastive LoRA Decoding.
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


# --------------------------------------------------------------------------- training


def train_lora(
    base_model: str = "smollm2",
    task: str = "gsm8k",
    data_path: str | None = None,
    output_dir: str = "src/cold/demo_adapters/smollm2-gsm8k",
    rank: int = 8,
    lora_alpha: int = 16,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
    max_steps: int = 600,
    batch_size: int = 8,
    learning_rate: float = 2e-4,
    max_length: int = 384,
    seed: int = 0,
    threads: int | None = None,
    save_dtype: str = "float16",
    log_every: int = 10,
    save_at: tuple[int, ...] = (),
    prompt_format: str = "auto",
) -> dict:
    """Train a LoRA adapter and save it (plus log, model card, loss plot) to `output_dir`."""
    from tqdm.auto import tqdm

    from cold.load.models import load_base

    hyperparameters = dict(
        base_model=base_model, task=task, data_path=data_path, output_dir=str(output_dir), rank=rank,
        lora_alpha=lora_alpha, target_modules=list(target_modules), max_steps=max_steps,
        batch_size=batch_size, learning_rate=learning_rate, max_length=max_length, seed=seed,
        threads=threads, save_dtype=save_dtype, save_at=list(save_at) or None, prompt_format=prompt_format,
    )
    if max_steps < 1 or batch_size < 1 or rank < 1:
        raise ColdError("max_steps, batch_size and rank must be positive")
    if prompt_format not in PROMPT_FORMATS:
        raise ColdError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if any(not 1 <= s < max_steps for s in save_at):
        raise ColdError(f"save_at steps must lie in 1..{max_steps - 1}, got {list(save_at)}")
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)

    data_file, pairs = load_task(task, data_path)
    base = load_base(base_model)
    tokenizer = base.tokenizer
    prompt_format = hyperparameters["prompt_format"] = resolve_prompt_format(tokenizer, prompt_format, base_model)
    examples, skipped = encode_dataset(tokenizer, pairs, max_length, prompt_format)
    if not examples:
        raise ColdError(f"no example fits in max_length={max_length} tokens")

    torch.manual_seed(seed)  # LoRA init independent of anything loading did
    model = attach_lora(base.model, rank, lora_alpha, target_modules)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    warmup_steps = max(1, round(max_steps * WARMUP_FRACTION))
    scheduler = linear_schedule(optimizer, max_steps, warmup_steps)
    stream = BatchStream(examples, batch_size, seed)
    pad_id = tokenizer.pad_token_id

    log: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(1, max_steps + 1), desc="train", unit="step", dynamic_ncols=True, mininterval=5)
    for step in bar:
        batch = stream.next_batch(pad_id)
        loss = causal_lm_loss(model, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        entry = dict(step=step, loss=loss.item(), lr=lr, grad_norm=float(grad_norm),
                     tokens=int(batch["attention_mask"].sum()), elapsed_s=round(time.perf_counter() - started, 3))
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.2e}")
        if log_every and (step % log_every == 0 or step == max_steps):
            recent = [e["loss"] for e in log[-log_every:]]
            bar.write(f"step {step}/{max_steps} loss {entry['loss']:.4f} "
                      f"avg{len(recent)} {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                      f"{entry['elapsed_s'] / step:.2f}s/step", file=sys.stderr)
        if step in save_at:  # an intermediate snapshot: a weaker adapter of the same run
            snapshot = Path(output_dir) / f"step-{step}"
            snapshot.mkdir(parents=True, exist_ok=True)
            save_adapter(model, snapshot, base_model, save_dtype)
    bar.close()
    wall_time = time.perf_counter() - started

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    weights = save_adapter(model, out, base_model, save_dtype)
    losses = [e["loss"] for e in log]
    summary = dict(
        output_dir=str(out),
        adapter_file=str(weights),
        adapter_bytes=weights.stat().st_size,
        data_path=str(data_file),
        num_train_examples=len(examples),
        skipped_too_long=skipped,
        examples_seen=max_steps * batch_size,
        epochs=max_steps * batch_size / len(examples),
        steps=max_steps,
        warmup_steps=warmup_steps,
        trainable_parameters=sum(p.numel() for p in trainable),
        first_loss=losses[0],
        final_loss=losses[-1],
        smoothed_loss=smoothed(losses),
        wall_time_s=wall_time,
        seconds_per_step=wall_time / max_steps,
        torch_version=torch.__version__,
        command=reproduce_command(hyperparameters),
        hyperparameters=hyperparameters,
    )
    (out / "training_log.json").write_text(json.dumps({**summary, "steps_log": log}, indent=1))
    has_plot = plot_loss(losses, out / "loss.png")
    write_model_card(out, summary, has_plot)
    summary["loss_plot"] = str(out / "loss.png") if has_plot else None
    return summary


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cold.training.lora", description=__doc__.splitlines()[0])
    p.add_argument("--base-model", default="smollm2")
    p.add_argument("--task", default="gsm8k", choices=sorted(TASK_LOADERS))
    p.add_argument("--data-path", default=None)
    p.add_argument("--output-dir", default="src/cold/demo_adapters/smollm2-gsm8k")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGET_MODULES))
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-at", type=int, nargs="*", default=[], help="also save snapshots at these steps (DIR/step-N)")
    p.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    args["target_modules"] = tuple(args["target_modules"])
    args["save_at"] = tuple(args["save_at"])
    try:
        summary = train_lora(**args)
    except ColdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "hyperparameters"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
