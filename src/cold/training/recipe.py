"""The fixed parts of the training recipe: LoRA on every linear layer of a block via PEFT, the loss
on labelled tokens only, AdamW with a linear warm-up and decay, gradient clipping.
"""

from __future__ import annotations

import torch

from cold.training.encoding import IGNORE_INDEX

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WARMUP_FRACTION = 0.05
LORA_DROPOUT = 0.05
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0


def attach_lora(model, rank: int, lora_alpha: int, target_modules) -> torch.nn.Module:
    """`model` wrapped by PEFT with fresh LoRA weights on `target_modules` (only they train)."""
    from peft import LoraConfig, get_peft_model  # peft is slow to import: only when a run starts

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
    """Linear warm-up over `warmup_steps`, then linear decay to 0 at `max_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
