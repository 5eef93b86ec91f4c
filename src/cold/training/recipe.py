"""The fixed parts of the training recipe: LoRA on every linear layer of a block via PEFT, the loss
on labelled tokens only, AdamW with a linear warm-up and decay, gradient clipping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cold.errors import ColdError
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


# the hyper-parameters an adapter trained with the same recipe shares with it (not data, steps or output)
RECIPE_FIELDS = ("rank", "lora_alpha", "target_modules", "batch_size", "learning_rate", "max_length", "seed", "prompt_format")


def recipe_of(adapter_dir: Path) -> tuple[dict, str]:
    """(the recipe an adapter was trained with, where it was read): rank, LoRA alpha and target modules
    from its `adapter_config.json`; the rest (batch size, learning rate, length limit, seed, example
    format) from the `training_log.json` of `cold train` in its directory or, for a `--save-at`
    snapshot (`RUN/step-N`), its run's. Fields no file records are left out."""
    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        recipe = {"rank": int(config["r"]), "lora_alpha": int(config["lora_alpha"]),
                  "target_modules": sorted(config["target_modules"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ColdError(f"{adapter_dir}: not a PEFT LoRA adapter directory ({exc})") from None
    for log in (adapter_dir / "training_log.json", adapter_dir.parent / "training_log.json"):
        if log.is_file():
            hyper = json.loads(log.read_text(encoding="utf-8")).get("hyperparameters", {})
            recipe.update({k: hyper[k] for k in RECIPE_FIELDS if hyper.get(k) is not None and k not in recipe})
            return recipe, f"{adapter_dir / 'adapter_config.json'} and {log}"
    return recipe, str(adapter_dir / "adapter_config.json")
