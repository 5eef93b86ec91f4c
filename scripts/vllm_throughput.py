"""Throughput, side by side in one run: our engine vs. vLLM-CoLD vs. vLLM plain LoRA greedy.

    python scripts/vllm_throughput.py --concurrency 16,64 --max-tokens 128 --markdown bench/vllm.md --json bench/vllm.json

Prompts: the first N GSM8K test questions (../shared/data/gsm8k/test.jsonl) in the chat template,
the same for every system; all N submitted together (N = concurrency); greedy, stop at EOS or
--max-tokens. Systems:

  engine-cold    cold.decoding.engine.Engine, decoder="cold" (expert + amateur rows in one pass)
  engine-expert  cold.decoding.engine.Engine, decoder="expert" (the LoRA alone)
  vllm-cold      cold.vllm.generate over vllm.LLM: expert/amateur request pairs + ColdPairProcessor
  vllm-expert    vllm.LLM with the LoRARequest, plain greedy (no pairing)

Each cell: a warm-up call on 2 prompts first (untimed), then --repeats timed calls; the median wall
time is reported. tok/s = generated tokens (EOS included) / wall seconds. Both engines use one
thread (`--threads`; vLLM binds its worker to one core and reserves the other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def gsm8k_questions(n: int) -> list[str]:
    from cold.tasks.readers import get_task

    task = get_task("gsm8k")
    problems = task.read(task.path("test"))
    return [p.question for p in problems[:n]]


def timed(fn, repeats: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="16,64", help="comma-separated numbers of prompts submitted together")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(args.threads)
    from cold.decoding.engine import Engine
    from cold.load.demo import demo_adapter_dir
    from cold.vllm import generate, make_llm

    sizes = [int(x) for x in args.concurrency.split(",")]
    prompts = gsm8k_questions(max(sizes))
    adapter = demo_adapter_dir("smollm2")
    engine = Engine.load("smollm2", {"demo": str(adapter)})
    llm, lora = make_llm("smollm2", adapter, max_model_len=1024, max_num_seqs=max(128, 2 * max(sizes)), kv_cache_gib=2.0)
    common = dict(max_tokens=args.max_tokens, chat=True)
    systems = {
        "engine-cold": lambda ps: engine.generate(ps, decoder="cold", alpha=args.alpha, beta=args.beta, max_new_tokens=args.max_tokens, chat=True),
        "engine-expert": lambda ps: engine.generate(ps, decoder="expert", max_new_tokens=args.max_tokens, chat=True),
        "vllm-cold": lambda ps: generate(llm, ps, lora, alpha=args.alpha, beta=args.beta, **common),
        "vllm-expert": lambda ps: generate(llm, ps, lora, decoder="expert", **common),
    }
    for fn in systems.values():  # warm-up
        fn(prompts[:2])
    rows = []
    for n in sizes:
        outputs = {}
        for name, fn in systems.items():
            seconds, out = timed(lambda: fn(prompts[:n]), args.repeats)
            outputs[name] = out
            tokens = sum(len(g.token_ids) for g in out)
            rows.append({"system": name, "concurrency": n, "wall_s": round(seconds, 2), "generated_tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1), "prompts_per_s": round(n / seconds, 2)})
            print(json.dumps(rows[-1]), flush=True)
        same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["engine-cold"], outputs["vllm-cold"]))
        rows.append({"system": "same CoLD tokens (engine vs vllm)", "concurrency": n, "prompts_identical": same})
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": "python scripts/vllm_throughput.py " + " ".join(os.sys.argv[1:]), "threads": args.threads,
              "max_tokens": args.max_tokens, "alpha": args.alpha, "beta": args.beta, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}` (max_tokens {report['max_tokens']}, alpha {report['alpha']}, beta {report['beta']}, "
             f"{report['threads']} thread(s), {report['cpus']} CPUs)", "",
             "| concurrency | system | wall s | generated tokens | tokens/s | prompts/s |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "prompts_identical" in r:
            continue
        lines.append(f"| {r['concurrency']} | {r['system']} | {r['wall_s']} | {r['generated_tokens']} | {r['tokens_per_s']} | {r['prompts_per_s']} |")
    lines.append("")
    for r in report["rows"]:
        if "prompts_identical" in r:
            lines.append(f"- concurrency {r['concurrency']}: vLLM-CoLD gave our engine's CoLD tokens on {r['prompts_identical']}/{r['concurrency']} prompts")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
