"""`python -m cold.training`: `train_lora` with one option per argument; the command line that the
Reproduce section of every model card gives (`cold train` is the everyday command).

    python -m cold.training --max-steps 200 --threads 1 --output-dir DIR
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from cold.errors import ColdError
from cold.training.card import COMMAND
from cold.training.data import TASK_LOADERS
from cold.training.encoding import PROMPT_FORMATS
from cold.training.trainer import train_lora


def build_parser() -> argparse.ArgumentParser:
    d = {name: param.default for name, param in inspect.signature(train_lora).parameters.items()}
    p = argparse.ArgumentParser(prog=" ".join(COMMAND),
                                description="Train a LoRA adapter on a base model with PEFT and a plain PyTorch loop.")
    p.add_argument("--base-model", default=d["base_model"])
    p.add_argument("--task", default=d["task"], choices=sorted(TASK_LOADERS))
    p.add_argument("--data-path", default=d["data_path"])
    p.add_argument("--output-dir", default=d["output_dir"])
    p.add_argument("--rank", type=int, default=d["rank"])
    p.add_argument("--lora-alpha", type=int, default=d["lora_alpha"])
    p.add_argument("--target-modules", nargs="+", default=list(d["target_modules"]))
    p.add_argument("--max-steps", type=int, default=d["max_steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--learning-rate", type=float, default=d["learning_rate"])
    p.add_argument("--max-length", type=int, default=d["max_length"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--threads", type=int, default=d["threads"])
    p.add_argument("--save-dtype", default=d["save_dtype"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--log-every", type=int, default=d["log_every"])
    p.add_argument("--save-at", type=int, nargs="*", default=list(d["save_at"]), help="also save snapshots at these steps (DIR/step-N)")
    p.add_argument("--prompt-format", default=d["prompt_format"], choices=PROMPT_FORMATS)
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
