"""Time and memory of one prefill, the lean forward against transformers' forward, in a fresh process each.

    python scripts/prefill_time.py --path lean --rows 16
    python scripts/prefill_time.py --path reference --rows 16

Prefills `--rows` random prompts of `--tokens` tokens as one running batch of expert rows
(`RunningBatch.join`), `--repeats` times, and prints each prefill's wall time and the process's
peak resident memory before the first and after each. `--path lean` is the engine as it is
(chunks of up to `LEAN_CHUNK_TOKENS` through the lean forward; `--lean-chunk-tokens` changes
that limit), `reference` is `Engine(lean=False)`. A probe behind a lever, not a benchmark.
"""

from __future__ import annotations

import argparse
import time

import torch

import cold.runner.model_runner as model_runner
from cold.bench.cells import peak_rss_mb
from cold.decoding.engine import Engine
from cold.decoding.running import RunningBatch
from cold.load.adapters import read_adapter
from cold.load.demo import demo_adapter_dir
from cold.load.models import load_base
from cold.params import DecodeParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("lean", "reference"), default="lean")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lean-chunk-tokens", type=int, help="the lean forward's chunk limit (default: the engine's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.lean_chunk_tokens is not None:
        model_runner.LEAN_CHUNK_TOKENS = args.lean_chunk_tokens
    engine = Engine(load_base("smollm2", dtype=args.dtype), [read_adapter(demo_adapter_dir("smollm2", "gsm8k"))],
                    lean=args.path == "lean")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 40000, (args.rows, args.tokens), generator=gen).tolist()
    params = DecodeParams(decoder="expert", max_new_tokens=8, ignore_eos=True)
    before = peak_rss_mb()
    with torch.inference_mode():
        for _ in range(args.repeats):
            batch = RunningBatch(engine.runner)
            started = time.perf_counter()
            batch.join([engine.make_request(p, params) for p in prompts], list(range(args.rows)))
            seconds = time.perf_counter() - started
            batch.drop(range(args.rows))
            print(f"{args.path}, {args.rows} x {args.tokens} tokens: prefill {seconds * 1e3:.0f} ms, "
                  f"peak RSS {peak_rss_mb():.0f} MB (before the first prefill {before:.0f} MB)")


if __name__ == "__main__":
    main()
