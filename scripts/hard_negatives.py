"""Relabel CommonsenseQA train rows with the expert's most tempting wrong choice: the training data
of a hard-negative anti-expert, to serve as CoLD's amateur.

    python scripts/hard_negatives.py --model gemma3 \
        --adapter src/cold/demo_adapters/gemma3-commonsenseqa-text --threads 2 \
        --out runs/data/csqa-train-hard-negatives.jsonl
    cold train --model gemma3 --task commonsenseqa-text \
        --data runs/data/csqa-train-hard-negatives.jsonl ...

The anti-expert of `cold train --task commonsenseqa-text-wrong` answers each question with a wrong
choice drawn at random; alone it picks the right choice about as often as chance, so it knows little
about which wrong answers tempt the expert. Here each row's `answerKey` becomes the wrong choice the
expert ranks highest after the prompt it was trained on: by the token that decides which choice
greedy decoding writes after `The answer is`, or, where two choices start with that same token, by
the summed log-probability of `The answer is <choice>.` (`cold.training.hard_negatives`; `cold
anti-expert --task commonsenseqa` ranks its own training sample so). The file keeps CommonsenseQA's
format (the right label kept as `goldKey`), so `cold train --task commonsenseqa-text --data FILE` trains
on it unchanged. The rows `cold tune` samples are copied unchanged, in place, so the training
loader finds and drops them as it does in the train file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from cold.load.paths import data_root
from cold.tasks.readers import jsonl_rows, read_commonsenseqa, select
from cold.training.data import DEFAULT_DATA, TUNING_RESERVE
from cold.training.encoding import resolve_prompt_format
from cold.training.hard_negatives import rank_choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="base model, as `cold train --model` takes it")
    parser.add_argument("--adapter", type=Path, required=True, help="the expert adapter whose temptations to learn")
    parser.add_argument("--prompt", default="auto", help="the expert's training prompt format: chat, zero-shot or auto")
    parser.add_argument("--data", type=Path, default=data_root() / DEFAULT_DATA["commonsenseqa"], help="CommonsenseQA train file")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write (CommonsenseQA format)")
    args = parser.parse_args()

    from peft import PeftModel

    from cold.load.models import load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    problems = read_commonsenseqa(args.data)
    reserved = {p.id for p in select(problems, TUNING_RESERVE, seed=0)}
    base = load_base(args.model, dtype="float32")  # as the recorded study ran, whatever the CPU's default
    model = PeftModel.from_pretrained(base.model, str(args.adapter)).eval()
    prompt_format = resolve_prompt_format(base.tokenizer, args.prompt, args.model)
    raw = [row for _, row in jsonl_rows(args.data)]  # the reader's own rows: aligned with `problems`
    args.out.parent.mkdir(parents=True, exist_ok=True)
    expert_right = scored = 0
    with torch.inference_mode(), args.out.open("w", encoding="utf-8") as out:
        for p, row in tqdm(list(zip(problems, raw)), desc="scoring choices"):
            if p.id not in reserved:
                ranked = rank_choices(model, base.tokenizer, p, prompt_format)
                expert_right += ranked[0] == p.gold
                scored += 1
                row = dict(row, answerKey=next(label for label in ranked if label != p.gold), goldKey=p.gold)
            out.write(json.dumps(row) + "\n")
    print(f"{scored} rows relabelled in {args.out} ({len(reserved)} reserved rows copied unchanged); the expert "
          f"ranks the right choice first on {100 * expert_right / max(scored, 1):.1f}% of them")


if __name__ == "__main__":
    from cold.errors import ColdError

    try:
        main()
    except ColdError as exc:  # a missing or malformed file, an adapter that does not fit: one line, no traceback
        raise SystemExit(f"error: {exc}") from None
