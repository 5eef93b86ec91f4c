"""`train_lora`: run the training recipe on a task and write the adapter directory.

The run is seeded and deterministic on CPU. The output directory is a standard PEFT adapter
(`adapter_config.json`, `adapter_model.safetensors` in `save_dtype`) plus `training_log.json`
(the summary and every step's loss), the model card `README.md` and `loss.png`; `save_at` steps
also leave snapshot adapters in `step-N/`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cold.errors import ColdError
from cold.load.models import load_base, pick_dtype
from cold.load.paths import check_writable
from cold.training.card import plot_loss, reproduce_command, write_model_card
from cold.training.data import load_task
from cold.training.encoding import PROMPT_FORMATS, BatchStream, encode_dataset, resolve_prompt_format
from cold.training.recipe import (
    DEFAULT_TARGET_MODULES,
    MAX_GRAD_NORM,
    WARMUP_FRACTION,
    WEIGHT_DECAY,
    attach_lora,
    causal_lm_loss,
    linear_schedule,
)


def convert_safetensors_dtype(path: Path, dtype: str) -> None:
    """Rewrite a safetensors file with floating tensors cast to `dtype`, keeping metadata."""
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


def _check_options(output_dir, rank, lora_alpha, target_modules, max_steps, batch_size, learning_rate, max_length,
                   threads, save_at, prompt_format) -> None:
    """ColdError naming the first bad option, before anything loads."""
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size), ("rank", rank), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ColdError(f"{name} must be an integer >= 1, got {value!r}")
    if threads is not None and threads < 1:
        raise ColdError(f"threads must be >= 1 (or left out for torch's choice), got {threads}")
    for name, value in (("lora_alpha", lora_alpha), ("learning_rate", learning_rate)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ColdError(f"{name} must be a finite number > 0, got {value!r}")
    if not target_modules:
        raise ColdError("target_modules is empty: name at least one module to adapt")
    if prompt_format not in PROMPT_FORMATS:
        raise ColdError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if any(not 1 <= s < max_steps for s in save_at):
        raise ColdError(f"save_at steps must lie in 1..{max_steps - 1}, got {list(save_at)}")
    out = Path(output_dir)
    check_writable(out, "--output-dir", directory=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").is_file():
        raise ColdError(f"output directory {out}: not empty and holds no adapter; give a new or empty directory")


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
    hyperparameters = dict(
        base_model=base_model, task=task, data_path=data_path, output_dir=str(output_dir), rank=rank,
        lora_alpha=lora_alpha, target_modules=list(target_modules), max_steps=max_steps,
        batch_size=batch_size, learning_rate=learning_rate, max_length=max_length, seed=seed,
        threads=threads, save_dtype=save_dtype, save_at=list(save_at) or None, prompt_format=prompt_format,
    )
    _check_options(output_dir, rank, lora_alpha, target_modules, max_steps, batch_size, learning_rate, max_length,
                   threads, save_at, prompt_format)
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)

    data_file, pairs = load_task(task, data_path)
    base = load_base(base_model, dtype="float32")  # the recipe trains in float32, whatever the inference default
    tokenizer = base.tokenizer
    prompt_format = hyperparameters["prompt_format"] = resolve_prompt_format(tokenizer, prompt_format, base_model)
    examples, skipped = encode_dataset(tokenizer, pairs, max_length, prompt_format)
    if not examples:
        raise ColdError(f"no example fits in max_length={max_length} tokens")

    torch.manual_seed(seed)  # LoRA init independent of anything loading did
    missing = sorted(set(target_modules) - {name.rsplit(".", 1)[-1] for name, _ in base.model.named_modules()})
    if missing:
        raise ColdError(f"--target {', '.join(missing)}: no module of {base_model} has that name "
                        f"(the default targets: {', '.join(DEFAULT_TARGET_MODULES)})")
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
