"""Where CoLD on llama.cpp spends its time at batch 1, next to llama.cpp's plain greedy loop.

    python scripts/llamacpp_breakdown.py --task coin_flip --problems 48 --new-tokens 128

One problem at a time (chat prompts, EOS honoured, the task's demo adapter), as `cold bench --e2e N
--e2e-batch-size 1 --decoders llamacpp,llamacpp-cold` runs them: the seconds spent in llama_decode,
per context (expert: with the LoRA; amateur: without) and per kind of call (one token, or a chunk:
a prompt or an amateur's catch-up), and the rest of the wall time (our decode loop). A probe, not a
benchmark: for numbers to compare, `cold bench`.
"""

from __future__ import annotations

import argparse
import collections
import time

from cold.bench import llamacpp as bench_llamacpp
from cold.bench.run import e2e_prompts, e2e_source
from cold.llamacpp import runner as llamacpp_runner
from cold.load.demo import demo_adapter_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="coin_flip")
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    questions = e2e_prompts(args.task, e2e_source(args.task, None)[1], args.problems)
    spec = dict(model="smollm2", adapter=str(demo_adapter_dir("smollm2", args.task)), threads=args.threads,
                questions=questions, batch_size=1, new_tokens=args.new_tokens, alpha=0.1, beta=0.5, cobatch_steps=None)
    seconds, tokens = collections.defaultdict(float), collections.Counter()
    decode, init = llamacpp_runner.Context.decode, llamacpp_runner.Context.__init__

    def init_noting_the_lora(self, model, lora, *rest, **kwargs):
        init(self, model, lora, *rest, **kwargs)
        self.role = "amateur" if lora is None else "expert"

    def timed_decode(self, work):
        started = time.perf_counter()
        out = decode(self, work)
        size = sum(len(t) for _, t, _ in work)
        kind = f"{self.role} {'one token' if size == 1 else 'chunk'}"
        seconds[kind] += time.perf_counter() - started
        tokens[kind] += size
        return out

    llamacpp_runner.Context.__init__, llamacpp_runner.Context.decode = init_noting_the_lora, timed_decode
    for decoder in ("llamacpp", "llamacpp-cold"):
        engine, params = bench_llamacpp.e2e_engine({**spec, "decoder": decoder})
        if params is None:  # the plain greedy loop
            prompts = engine.encode(questions)
            engine.generate(prompts[:2], max_new=4)
            run = [lambda p=p: engine.generate([p])[0][0] for p in prompts]
        else:
            engine.generate(questions[:2], params.with_(max_new_tokens=4), chat=True)
            run = [lambda q=q: len(engine.generate([q], params, chat=True)[0].token_ids) for q in questions]
        seconds.clear()
        tokens.clear()
        started = time.perf_counter()
        generated = sum(problem() for problem in run)
        wall = time.perf_counter() - started
        print(f"{decoder}: wall {wall:.2f} s, {generated} tokens")
        for kind in sorted(seconds):
            print(f"  {kind:18s} {seconds[kind]:6.2f} s  {tokens[kind]:5d} tokens  {1e3 * seconds[kind] / tokens[kind]:.2f} ms/token")
        print(f"  outside llama_decode {wall - sum(seconds.values()):.2f} s")


if __name__ == "__main__":
    main()
