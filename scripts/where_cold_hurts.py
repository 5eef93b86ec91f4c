"""Where does CoLD lose on a multiple-choice task? Split the problems by what the amateur (the base
model) itself prefers at the first answer token, and compare `expert` and `cold` within each part.

    python scripts/where_cold_hurts.py eval-runs/commonsenseqa-dev-gemma3-commonsenseqa-text

(the model, prompt style and problems are the run's own, from its run.json).

For an adapter that answers `The answer is <choice text>.`, the answer is decided at the token
after `The answer is`. There, CoLD scores (1+beta) s_expert - beta s_base. This script runs the base
model once per problem on `<prompt> The answer is` (the context the amateur row sees at that
step) and takes, among the choices' first tokens, the one the base model ranks highest. Then it
reports, for the problems where the base model's choice is right and where it is wrong, the
accuracy of `expert` and of a `cold` run from the same run directory (its records).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cold.evaluation.decoders import parse_decoder
from cold.evaluation.stats import paired_difference
from cold.tasks.prompts import make_style
from cold.tasks.readers import read_commonsenseqa


def read_records(run: Path, decoder: str) -> dict[str, dict]:
    name = parse_decoder(decoder).filename
    rows = [json.loads(line) for line in (run / "records" / name).read_text().splitlines()]
    return {r["id"]: r for r in rows}


def print_parts(title: str, parts: dict[str, list[tuple[bool, bool]]], cold_label: str) -> None:
    """One Markdown table: per part, expert and cold accuracy and their paired difference."""
    print(f"\n| {title} | n | expert | {cold_label} | {cold_label} - expert, points (paired 95% CI) |")
    print("|---|---|---|---|---|")
    for key, pairs in parts.items():
        e, c = [a for a, _ in pairs], [b for _, b in pairs]
        diff = paired_difference(c, e)
        print(f"| {key} | {len(pairs)} | {100 * sum(e) / len(e):.1f}% | {100 * sum(c) / len(c):.1f}% | "
              f"{100 * diff.value:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `cold eval` run directory of a CommonsenseQA-style task")
    parser.add_argument("--cold", default="cold@0.1/0.5", help="the cold decoder label in the run")
    parser.add_argument("--answer-prefix", default="The answer is", help="what the adapter writes before the choice")
    args = parser.parse_args()

    from cold.decoding.engine import Engine
    from cold.load.models import load_base

    run_info = json.loads((args.run / "run.json").read_text())
    problems = {p.id: p for p in read_commonsenseqa(Path(run_info["data"]))}
    expert, cold = read_records(args.run, "expert"), read_records(args.run, args.cold)
    # no adapter: the bare base model, as the amateur row; in the run's dtype (float32 before it was recorded)
    engine = Engine(load_base(run_info["model"], dtype=run_info.get("dtype", "float32")))
    style = make_style(run_info["prompt"])
    by_base = {"base picks the gold choice": [], "base picks another choice": []}
    by_agreement = {"expert answers the base's choice": [], "expert answers another choice": []}
    gated = []  # (expert right, right when contrasting only where expert and base disagree)
    ties = 0
    with torch.inference_mode():
        for pid in expert:
            problem = problems[pid]
            _, ids = engine.encode(style.render(problem), chat=style.chat)
            ids = ids + engine.tokenizer(" " + args.answer_prefix, add_special_tokens=False).input_ids
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]  # [V]
            firsts = {label: engine.tokenizer(" " + text, add_special_tokens=False).input_ids[0] for label, text in problem.choices}
            if len(set(firsts.values())) < len(firsts):
                ties += 1  # two choices start with the same token: the first token does not decide
                continue
            pick = max(firsts, key=lambda label: logits[firsts[label]].item())
            pair = (expert[pid]["correct"]["flexible"], cold[pid]["correct"]["flexible"])
            by_base["base picks the gold choice" if pick == problem.gold else "base picks another choice"].append(pair)
            agree = expert[pid]["answer"]["flexible"] == pick
            by_agreement["expert answers the base's choice" if agree else "expert answers another choice"].append(pair)
            gated.append((pair[0], pair[0] if agree else pair[1]))
    print(f"{args.run.name}: {len(expert)} problems, {ties} left out (two choices share a first token)")
    print_parts("the base model's own choice", by_base, args.cold)
    print_parts("expert and base model", by_agreement, args.cold)
    e, g = [a for a, _ in gated], [b for _, b in gated]
    diff = paired_difference(g, e)
    print(f"\nEstimate, from these records, of contrasting only where the expert's answer differs from the base "
          f"model's choice: {100 * sum(g) / len(g):.1f}% vs expert {100 * sum(e) / len(e):.1f}%, "
          f"{100 * diff.value:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] points (n = {len(gated)}).")


if __name__ == "__main__":
    main()
