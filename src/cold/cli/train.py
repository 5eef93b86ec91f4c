"""`cold train`: the LoRA training recipe of `cold.training` on the command line.

The training code (torch, transformers, peft) is imported inside the command, so that `cold --help` does not import it.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cold.cli.common import Model, err, reports_errors


@reports_errors
def train(
    output_dir: Annotated[str, typer.Option(help="Where the PEFT adapter, log, model card and loss plot go.")],
    model: Model = "smollm2",
    task: Annotated[str, typer.Option(help="gsm8k or commonsenseqa (their train files in ../shared/data; for commonsenseqa the rows cold tune samples by default are left out; commonsenseqa-text answers with the choice's text instead of its letter, commonsenseqa-text-wrong with a wrong choice's text: an anti-expert to use as CoLD's amateur), coin_flip or last_letters (generated gen-train split), unless --data is given.")] = "gsm8k",
    data: Annotated[Optional[str], typer.Option(help="Training file (JSONL) instead of the task's default.")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / r).")] = 16,
    target: Annotated[Optional[list[str]], typer.Option(help="Target module (repeat); default: every linear layer of a Llama block.")] = None,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 600,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up and decay).")] = 2e-4,
    max_length: Annotated[int, typer.Option(help="Longer examples are skipped.")] = 384,
    seed: Annotated[int, typer.Option(help="Seed for the shuffle and the LoRA initialisation.")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice).")] = None,
    save_at: Annotated[Optional[list[int]], typer.Option(help="Also save a snapshot adapter at this step, in OUTPUT_DIR/step-N (repeat).")] = None,
    prompt: Annotated[str, typer.Option(help="Example format: chat (the chat template; SmolLM2), zero-shot (cold eval's 'Question: ...\\nAnswer:' text prompt, then the answer and EOS; for base models such as gemma3) or auto (chat where the tokenizer has it).")] = "auto",
) -> None:
    """Train a LoRA adapter with PEFT (loss on the answer only).

    Examples:

      cold train --output-dir my-gsm8k-lora --max-steps 600

      cold train --model gemma3 --task commonsenseqa-text --output-dir my-gemma-lora  (zero-shot text format)
    """
    from cold.training.recipe import DEFAULT_TARGET_MODULES
    from cold.training.trainer import train_lora

    summary = train_lora(
        base_model=model, task=task, data_path=data, output_dir=output_dir, rank=rank, lora_alpha=lora_alpha,
        target_modules=tuple(target or DEFAULT_TARGET_MODULES), max_steps=max_steps, batch_size=batch_size,
        learning_rate=learning_rate, max_length=max_length, seed=seed, threads=threads,
        save_at=tuple(save_at or ()), prompt_format=prompt,
    )
    err.print(f"adapter saved to {output_dir} (final loss {summary.get('final_loss', float('nan')):.4f})")
