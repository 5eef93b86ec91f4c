"""llama.cpp's greedy decoding speed on the built-in GGUF, the reference `cold bench` is compared against.

    pip install llama-cpp-python==0.3.36      # compiles llama.cpp (~15 minutes on 2 cores, once)
    python scripts/llamacpp_greedy.py --batch-sizes 1,16 --threads 2 --json bench/lazy/llamacpp.json

Same shape of work as `cold bench`'s step mode: random prompts of `--prompt-tokens` ids (seeded),
`--new-tokens` greedy steps with EOS ignored, a warm-up round first; several sequences decode in
one llama.cpp context (one `llama_decode` per step over all of them, as llama.cpp's batched
example does), no LoRA. Prints, per batch size, the median step time and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

from cold.llamacpp.library import llama
from cold.load.gguf import builtin_gguf

L = llama()  # llama_cpp with its CPU backends loaded (a GGML_BACKEND_DL build has none until then)


def _add(batch, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
    batch.seq_id[i][0], batch.logits[i] = seq, logits


def measure(model, vocab_size: int, batch_size: int, prompt_tokens: int, new_tokens: int, threads: int, seed: int) -> dict:
    """One context holding `batch_size` sequences: a timed prefill, then `new_tokens` timed greedy steps."""
    params = L.llama_context_default_params()
    params.n_ctx = batch_size * (prompt_tokens + new_tokens + 8)
    params.n_batch = params.n_ubatch = max(batch_size * prompt_tokens, 512)
    params.n_seq_max = batch_size
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab_size) for _ in range(prompt_tokens)] for _ in range(batch_size)]
    batch = L.llama_batch_init(batch_size * prompt_tokens, 0, batch_size)
    try:
        timings = []
        for _ in range(2):  # round 0 warms up, round 1 is timed
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            t = time.perf_counter()
            n = 0
            for s, prompt in enumerate(prompts):
                for p, token in enumerate(prompt):
                    _add(batch, n, token, p, s, p == len(prompt) - 1)
                    n += 1
            batch.n_tokens = n
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the prompts")
            prefill_ms = (time.perf_counter() - t) * 1e3
            rows = [(s + 1) * prompt_tokens - 1 for s in range(batch_size)]  # logits index of each sequence
            steps = []
            for step in range(new_tokens):
                t = time.perf_counter()
                tokens = []
                for row in rows:
                    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(vocab_size,))
                    tokens.append(int(logits.argmax()))
                for s, token in enumerate(tokens):
                    _add(batch, s, token, prompt_tokens + step, s, True)
                batch.n_tokens = batch_size
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                rows = list(range(batch_size))
                steps.append((time.perf_counter() - t) * 1e3)
            timings.append((prefill_ms, steps))
        prefill_ms, steps = timings[-1]
        step_ms = statistics.median(steps)
        return {"batch_size": batch_size, "prefill_ms": prefill_ms, "step_ms": step_ms,
                "tokens_per_s_per_prompt": 1e3 / step_ms, "tokens_per_s_total": batch_size * 1e3 / step_ms}
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="built-in model name (its GGUF file)")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    path = builtin_gguf(args.model)
    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    vocab_size = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    rows = [measure(model, vocab_size, int(b), args.prompt_tokens, args.new_tokens, args.threads, args.seed)
            for b in args.batch_sizes.split(",")]
    L.llama_model_free(model)
    print(f"llama.cpp {L.__version__} greedy, {path.name}, {args.threads} threads, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} steps")
    for r in rows:
        print(f"batch {r['batch_size']:>3}: step {r['step_ms']:.1f} ms, {r['tokens_per_s_total']:.0f} tokens/s total, "
              f"prefill {r['prefill_ms']:.0f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gguf": path.name, "llama_cpp": L.__version__, "threads": args.threads,
                                         "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
