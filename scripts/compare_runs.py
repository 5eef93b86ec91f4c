"""Compare two `cold eval` runs of the same problems, decoder by decoder: accuracy in each, the
paired difference, and how many outputs are identical. For changes that should not matter, or
should matter little, e.g. the KV cache's dtype:

    cold eval --task commonsenseqa --adapter src/cold/demo_adapters/smollm2-commonsenseqa-text \
        --decoders expert,cold@0.1/0.5 --max-new-tokens 16 --kv-dtype bfloat16 --out eval-runs/csqa-kv-bf16
    python scripts/compare_runs.py eval-runs/commonsenseqa-dev-smollm2-commonsenseqa-text eval-runs/csqa-kv-bf16

Decoders are those both runs hold; problems are those both runs hold for that decoder. With
`--pair A,B`, decoder A of the first run is compared with decoder B of the second instead, e.g. an
adapter trained longer against a shorter one with CoLD:

    python scripts/compare_runs.py eval-runs/commonsenseqa-dev-gemma3-csqa-vs-wrong \
        eval-runs/commonsenseqa-dev-gemma3-csqa-600 --pair cold@0.3/0.5:amateur,expert
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cold.evaluation.stats import paired_difference


def read_records(run: Path) -> dict[str, dict[str, dict]]:
    """{decoder label: {problem id: record}} of a run directory."""
    out = {}
    for path in sorted((run / "records").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["decoder"]] = {r["id"]: r for r in rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="a `cold eval` run directory")
    parser.add_argument("b", type=Path, help="another run directory, of the same problems")
    parser.add_argument("--rule", default="flexible", choices=["flexible", "strict"], help="extraction rule")
    parser.add_argument("--pair", help="A,B: compare decoder A of the first run with decoder B of the second")
    args = parser.parse_args()
    a, b = read_records(args.a), read_records(args.b)
    if args.pair:
        pair = tuple(args.pair.split(",", 1))
        if len(pair) != 2:
            raise SystemExit(f"--pair needs two decoder labels, A,B (got {args.pair!r})")
        for label, run, records in zip(pair, (args.a, args.b), (a, b)):
            if label not in records:
                raise SystemExit(f"--pair: no decoder {label!r} in {run} (it has {', '.join(records)})")
        pairs = [pair]
    else:
        pairs = [(d, d) for d in a if d in b]
    if not pairs:
        raise SystemExit(f"no decoder label is in both runs ({', '.join(a)} / {', '.join(b)})")
    print(f"a = {args.a}, b = {args.b}, {args.rule} extraction\n")
    print("| decoder (a / b) | n | a | b | b - a, points (paired 95% CI) | identical outputs | identical answers |")
    print("|---|---|---|---|---|---|---|")
    for da, db in pairs:
        ids = [i for i in a[da] if i in b[db]]
        ra, rb = [a[da][i] for i in ids], [b[db][i] for i in ids]
        ca = [r["correct"][args.rule] for r in ra]
        cb = [r["correct"][args.rule] for r in rb]
        diff = paired_difference(cb, ca)
        same_out = sum(x["output"] == y["output"] for x, y in zip(ra, rb))
        same_ans = sum(x["answer"][args.rule] == y["answer"][args.rule] for x, y in zip(ra, rb))
        n = len(ids)
        label = da if da == db else f"{da} / {db}"
        print(f"| {label} | {n} | {100 * sum(ca) / n:.1f}% | {100 * sum(cb) / n:.1f}% | "
              f"{100 * diff.value:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] | "
              f"{100 * same_out / n:.1f}% | {100 * same_ans / n:.1f}% |")


if __name__ == "__main__":
    main()
