"""Median decode-step time of our engine on one chat prompt per row, for quick A/B checks of a lever.

    python scripts/step_time.py --dtype bfloat16 --decoder cold --batch 1
    python scripts/step_time.py --dtype bfloat16 --decoder expert --batch 1 --compile   # torch.compile of the lean step
    PYTHONPATH=/path/to/other/checkout/src python scripts/step_time.py ...             # the same on another commit

`RunningBatch.step()` (pick + forward) over `--batch` copies of a GSM8K-style chat prompt with the
GSM8K demo adapter, EOS ignored: 20 untimed steps, then the median of 40 timed ones. With
`--compile`, the lean decode step is wrapped in `torch.compile(dynamic=True)` and the first
step's time (the compile) is printed too. `cold bench` is the full measurement; this is a probe.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cold.decoding.engine import Engine
from cold.decoding.running import RunningBatch
from cold.load.demo import demo_adapter_dir
from cold.params import DecodeParams

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decoder", default="cold", choices=["cold", "expert", "base"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load("smollm2", adapters=[demo_adapter_dir("smollm2", "gsm8k")], dtype=args.dtype)
    if args.compile:
        engine.lean.forward = torch.compile(engine.lean.forward, dynamic=True)
    params = DecodeParams(decoder=args.decoder, max_new_tokens=200, ignore_eos=True)
    requests = [engine.make_request(PROMPT, params, chat=True) for _ in range(args.batch)]
    batch = RunningBatch(engine.runner)
    with torch.inference_mode():
        batch.join(requests, list(range(args.batch)))
        started = time.perf_counter()
        batch.step()
        first_s = time.perf_counter() - started
        for _ in range(19):
            batch.step()
        times = []
        for _ in range(40):
            started = time.perf_counter()
            batch.step()
            times.append(time.perf_counter() - started)
    print(f"{args.decoder} {args.dtype} batch {args.batch}: median step {1e3 * statistics.median(times):.1f} ms"
          + (f" (first step, with the compile: {first_s:.1f} s)" if args.compile else ""))


if __name__ == "__main__":
    main()
