"""One Markdown table from several `cold eval` run directories (the full results table of docs/accuracy.md).

    python scripts/accuracy_table.py eval-runs/coin_flip-test-smollm2-coin_flip eval-runs/gsm8k-test-smollm2 \
        --copy-to results/accuracy

Per decoder of each run: accuracy (headline rule) with its 95% interval, the paired difference
to `expert` on the same problems, mean generated tokens, share hitting the token limit, and end
to end seconds per problem. With --copy-to, each run's summary.md, summary.json and plot.png (and
a tune run's tune.md, tune.json and heatmap.png) are copied to DIR/<run name>/ for the record.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEPT = ("summary.md", "summary.json", "plot.png", "tune.md", "tune.json", "heatmap.png")


def pct(d: dict) -> str:
    return f"{100 * d['value']:.1f}% [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"


def versus_expert(summary: dict, label: str) -> str:
    """`label − expert` in points with its paired interval (pairs are stored as later − earlier)."""
    head = summary["headline"]
    for pair in summary["pairs"]:
        if (pair["a"], pair["b"]) == (label, "expert"):
            d = pair[head]
            return f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        if (pair["a"], pair["b"]) == ("expert", label):
            d = pair[head]
            return f"{-100 * d['value']:+.1f} [{-100 * d['high']:+.1f}, {-100 * d['low']:+.1f}]"
    return "—"


def rows(run: Path) -> list[str]:
    summary = json.loads((run / "summary.json").read_text())
    head = summary["headline"]
    return [
        f"| {run.name} | {d['n']} | {d['decoder']} | {pct(d['accuracy'][head])} | {versus_expert(summary, d['decoder'])} | "
        f"{d['mean_tokens']:.1f} | {100 * d['hit_max_fraction']:.0f}% | {d['time_per_problem_s']:.2f} |"
        for d in summary["decoders"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="cold eval output directories (with summary.json)")
    parser.add_argument("--copy-to", type=Path, help="copy each run's reports to DIR/<run name>/")
    args = parser.parse_args()
    print("| run | n | decoder | accuracy (95% CI) | vs expert, points (paired 95% CI) | mean tokens | hit max | s / problem |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        if (run / "summary.json").is_file():
            print("\n".join(rows(run)))
        if args.copy_to:
            target = args.copy_to / run.name
            target.mkdir(parents=True, exist_ok=True)
            for name in KEPT:
                if (run / name).is_file():
                    shutil.copy2(run / name, target / name)


if __name__ == "__main__":
    main()
