"""The expert's own wrong answers as training data: an anti-expert that learns the expert's
mistakes, to serve as CoLD's amateur.

    cold eval --task last_letters --split gen-train --limit 480 --decoders expert \
        --adapter src/cold/demo_adapters/smollm2-last_letters --out eval-runs/ll-gen-train-expert
    python scripts/self_negatives.py eval-runs/ll-gen-train-expert [MORE_RUNS ...] --out runs/data/ll-self-negatives.json
    cold train --task last_letters --data runs/data/ll-self-negatives.json ...

`cold anti-expert` runs this whole path (and tunes and measures the pair) in one command;
`scripts/hard_negatives.py` does this for multiple choice (the wrong choice the expert ranks
highest); here the task is generative, so a negative is what the expert actually wrote where the
answer it gives is wrong. The run must be on training problems (a generated `gen-train` split, or
any file the test and tuning splits do not share rows with); a run on a held-out split (`test`,
`dev`, `gen-tune`, `gen-test`) is refused. Each wrong output becomes one example
of the symbolic tasks' training format, {"examples": [{"question", "answer", "worked"}]}, with the
expert's output as `worked` and the right answer kept as `answer`; outputs cut off at the token
limit are left out (they teach length, not the mistake).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cold.errors import ColdError
from cold.training.negatives import self_negatives, write_negatives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="output directories of `cold eval` runs on training problems (their negatives are pooled)")
    parser.add_argument("--out", type=Path, required=True, help="training file to write (JSON)")
    parser.add_argument("--decoder", default="expert", help="the decoder whose mistakes to keep (default: expert)")
    parser.add_argument("--rule", default="flexible", choices=["flexible", "strict"], help="extraction rule that decides right or wrong")
    args = parser.parse_args()
    examples, counts = [], {}
    try:
        for run_dir in args.run_dirs:
            found, run_counts = self_negatives(run_dir, args.decoder, args.rule)
            examples += found
            counts = {k: counts.get(k, 0) + v for k, v in run_counts.items()}
    except ColdError as exc:
        sys.exit(f"error: {exc}")
    if not examples:
        sys.exit(f"error: no wrong, finished outputs in {', '.join(map(str, args.run_dirs))} ({counts})")
    write_negatives(examples, args.out)
    print(f"{args.out}: {counts['negatives']} negatives from {counts['records']} outputs "
          f"({counts['right']} right, {counts['cut off']} cut off at the token limit)")


if __name__ == "__main__":
    main()
