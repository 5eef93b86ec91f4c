"""Time streaming detokenisation of one sequence: `cold.sampling.detokenize.TextTracker` against
decoding every id again for every new token (what a non-incremental tracker does).

    python scripts/detokenize_bench.py --lengths 128,512,2048 --repeats 5

Prints, per sequence length, the median milliseconds to stream the whole sequence and per token,
with the built-in SmolLM2 tokenizer (its model is not loaded).
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformers import AutoTokenizer

from cold.load.models import resolve_model_dir
from cold.sampling.detokenize import TextTracker

TEXT = "The quick brown fox jumps over the lazy dog; naïve café, 東京 and 🙂 too. "


def full_redecode(tokenizer, ids: list[int]) -> str:
    """Streaming by decoding ids[:n] in full after every token n (the quadratic way)."""
    out, emitted = "", 0
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        safe = len(text.rstrip("\ufffd"))
        out += text[emitted:safe]
        emitted = max(emitted, safe)
    return out


def incremental(tokenizer, ids: list[int]) -> str:
    tracker = TextTracker(tokenizer, ("\n\nQuestion:",))
    return "".join(tracker.add(i) for i in ids) + tracker.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"), local_files_only=True)
    ids = tokenizer(TEXT * 400, add_special_tokens=False).input_ids
    print("| tokens | full re-decode ms | incremental ms | per token: full / incremental us | speed-up |")
    print("|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        part = ids[:length]
        assert incremental(tokenizer, part) == tokenizer.decode(part, skip_special_tokens=True)
        times = {}
        for name, fn in (("full", full_redecode), ("incremental", incremental)):
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn(tokenizer, part)
                runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs) * 1e3
        full, inc = times["full"], times["incremental"]
        print(f"| {length} | {full:.1f} | {inc:.1f} | {full / length * 1e3:.0f} / {inc / length * 1e3:.0f} | {full / inc:.1f}x |")


if __name__ == "__main__":
    main()
