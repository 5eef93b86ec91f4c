"""Where continuous batching spends its time: the runner's calls, timed, over GSM8K or coin-flip chat prompts.

    python scripts/refill_profile.py --problems 48 --decoders expert,cold

Decodes the first `--problems` problems of `--task` with continuous batching of `--batch`
(`cold.bench.cells.decode_refilling`, as `cold bench --e2e N --e2e-refill` does), once per
decoder, and prints the wall time and the seconds spent in each wrapped call (prefill, step,
merge, keep, catch-ups, the cache's row copies). Calls nest (a step's forward is also counted
under `forward`), so the rows do not add up to the wall time. A probe, not a benchmark: for
numbers to compare, `cold bench --e2e`.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import cold.runner.model_runner as model_runner
from cold.bench.cells import decode_refilling, peak_rss_mb
from cold.bench.run import e2e_prompts, e2e_source
from cold.decoding.engine import Engine
from cold.load.adapters import read_adapter
from cold.load.demo import demo_adapter_dir
from cold.load.models import load_base
from cold.params import DecodeParams
from cold.runner import kvcache

RUNNER_CALLS = ("prefill", "merge", "keep", "_catch_up", "step", "_arrange", "expert_logits", "scores", "forward")
CACHE_CALLS = ((kvcache.GrowingLayer, "_grown"), (kvcache.GrowingLayer, "_rows"), (model_runner, "move_rows"),
               (model_runner, "write_rows"), (model_runner, "merge_caches"))


def timed(owner, name: str, seconds: dict, calls: collections.Counter) -> None:
    """Wrap owner.name so that each call adds its wall time to seconds[name] and counts in calls[name]."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started
            calls[name] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--task", default="gsm8k", choices=("gsm8k", "coin_flip"))
    parser.add_argument("--decoders", default="expert,cold")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    questions = e2e_prompts(args.task, e2e_source(args.task, None)[1], args.problems)
    engine = Engine(load_base("smollm2", dtype=args.dtype), [read_adapter(demo_adapter_dir("smollm2", args.task))])
    seconds, calls = collections.defaultdict(float), collections.Counter()
    for name in RUNNER_CALLS:
        timed(engine.runner, name, seconds, calls)
    for owner, name in CACHE_CALLS:
        timed(owner, name, seconds, calls)
    for decoder in args.decoders.split(","):
        params = DecodeParams(decoder=decoder, alpha=0.1, beta=0.5, max_new_tokens=args.new_tokens)
        engine.generate(questions[:2], params.with_(max_new_tokens=4), chat=True)  # warm-up
        seconds.clear()
        calls.clear()
        started = time.perf_counter()
        lengths, _, _, steps = decode_refilling(engine, questions, params, args.batch)
        wall = time.perf_counter() - started
        print(f"{decoder}: wall {wall:.1f} s, {sum(lengths)} tokens, {steps} steps, {1e3 * wall / sum(lengths):.2f} ms/token, "
              f"peak RSS so far {peak_rss_mb():.0f} MB")
        for name, spent in sorted(seconds.items(), key=lambda item: -item[1]):
            print(f"  {name:14s} {spent:7.2f} s  calls {calls[name]}")


if __name__ == "__main__":
    main()
