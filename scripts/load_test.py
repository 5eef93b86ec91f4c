#!/usr/bin/env python
"""Bounded load test of `cold serve`: N requests at concurrency C, from a separate process.

    # against a running server
    python scripts/load_test.py --url http://127.0.0.1:8000 -n 32 -c 8 --max-tokens 64

    # 64 clients arriving as a Poisson process (4 requests/s), half of them streaming
    python scripts/load_test.py -n 64 -c 64 --arrival-rate 4 --stream-share 0.5

    # start the server itself (arguments after --start go to `cold serve`), test, stop it
    python scripts/load_test.py -n 32 -c 8 --max-tokens 64 --start -- --model smollm2

Reports throughput (requests/s, generated tokens/s), client-side latency p50/p90/p99, time to
first token when streaming, and the server's own mean decode-step latency and batch size
(scraped from /metrics before and after). Prompts are short GSM8K-style questions sent with
the chat template, cycled. Needs httpx (installed with the project's test extras).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time

import httpx

QUESTIONS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four. "
    "She sells the rest for $2 each. How much does she make every day?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Josh buys a house for $80,000 and puts in $50,000 in repairs. This increased the value of the house by 150%. "
    "How much profit did he make?",
    "James runs 3 sprints 3 times a week. He runs 60 meters each sprint. How many total meters does he run a week?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty needs $100 for a wallet. She has half of the money. Her parents give her $15 and her grandparents twice "
    "as much as her parents. How much more money does Betty need?",
    "Albert buys 2 large pizzas with 16 slices each and 2 small pizzas with 8 slices each. "
    "How many slices does he eat if he eats them all?",
]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def read_questions(path: str | None) -> list[str]:
    """The prompts: the "question" field of each line of a JSONL file (GSM8K's), else QUESTIONS."""
    if path is None:
        return QUESTIONS
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line)["question"] for line in lines if line.strip()]


async def one_request(client: httpx.AsyncClient, args, index: int, stream: bool | None = None) -> dict:
    """One chat request for question `index`; its latency, time to first token (streamed), tokens and text."""
    stream = args.stream if stream is None else stream
    questions = args.questions
    body = {"model": args.model, "messages": [{"role": "user", "content": questions[index % len(questions)]}],
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    body.update(args.extra)
    start = time.perf_counter()
    try:
        if not stream:
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                return {"ok": False, "status": response.status_code, "error": response.text[:200]}
            answer = response.json()
            return {"ok": True, "latency": time.perf_counter() - start, "tokens": answer["usage"]["completion_tokens"],
                    "text": answer["choices"][0]["message"]["content"], "index": index, "stream": False}
        body.update(stream=True, stream_options={"include_usage": True})
        first, tokens, text = None, 0, ""
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "status": response.status_code, "error": (await response.aread())[:200].decode()}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": 200, "error": chunk["error"]["message"]}
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - start
                text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return {"ok": True, "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens, "text": text,
                "index": index, "stream": True}
    except httpx.HTTPError as exc:
        return {"ok": False, "status": None, "error": f"{type(exc).__name__}: {exc}"}


async def run_load(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        before = await scrape(client)
        gate = asyncio.Semaphore(args.concurrency)
        rng = random.Random(args.seed)
        arrivals, at = [], 0.0  # seconds after the start: a Poisson process at --arrival-rate, or all at once
        for _ in range(args.requests):
            arrivals.append(at)
            at += rng.expovariate(args.arrival_rate) if args.arrival_rate > 0 else 0.0
        streamed = [args.stream or rng.random() < args.stream_share for _ in range(args.requests)]

        async def bounded(i: int) -> dict:
            await asyncio.sleep(arrivals[i])
            async with gate:
                return await one_request(client, args, i, streamed[i])

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
        after = await scrape(client)
    ok = [r for r in results if r["ok"]]
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in ok)
    steps = after.get("cold_step_seconds_count", 0) - before.get("cold_step_seconds_count", 0)
    report = {
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "ok": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
        "requests_per_s": len(ok) / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_p50_s": percentile(latencies, 50), "latency_p90_s": percentile(latencies, 90),
        "latency_p99_s": percentile(latencies, 99), "latency_mean_s": sum(latencies) / max(len(latencies), 1),
        "server_steps": steps,
        "server_step_ms_mean": 1000 * _delta_ratio(before, after, "cold_step_seconds_sum", "cold_step_seconds_count"),
        "server_sequences_per_step": _delta_ratio(before, after, "cold_step_sequences_sum", "cold_step_sequences_count"),
    }
    if ttfts:
        report.update(ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99))
    errors = [r for r in results if not r["ok"]]
    if errors:
        report["first_error"] = errors[0]
    report["results"] = results
    return report


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(cold_\w+) (\S+)$", text, re.M)}


def _delta_ratio(before: dict, after: dict, total: str, count: str) -> float:
    n = after.get(count, 0) - before.get(count, 0)
    return (after.get(total, 0) - before.get(total, 0)) / n if n else float("nan")


def start_server(server_args: list[str], port: int, log_path: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "cold.cli.serve", "--port", str(port), *server_args]
    print("starting:", " ".join(command), f"(log: {log_path})", file=sys.stderr)
    log = open(log_path, "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} before becoming healthy")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not healthy after {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def split_server_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, those after `--`, which go to `cold serve`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_report(report: dict, args) -> None:
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
        return
    print(f"{report['ok']}/{report['requests']} requests ok at concurrency {report['concurrency']}, "
          f"max_tokens {report['max_tokens']}, in {report['wall_s']:.1f} s")
    print(f"throughput: {report['requests_per_s']:.2f} requests/s, {report['tokens_per_s']:.1f} generated tokens/s "
          f"({report['completion_tokens']} tokens)")
    print(f"latency: p50 {report['latency_p50_s']:.2f} s, p90 {report['latency_p90_s']:.2f} s, "
          f"p99 {report['latency_p99_s']:.2f} s, mean {report['latency_mean_s']:.2f} s")
    if "ttft_p50_s" in report:
        print(f"time to first token: p50 {report['ttft_p50_s']:.2f} s, p99 {report['ttft_p99_s']:.2f} s")
    print(f"server: {report['server_steps']:.0f} decode steps, {report['server_step_ms_mean']:.1f} ms per step, "
          f"{report['server_sequences_per_step']:.1f} sequences per step")
    if "first_error" in report:
        print(f"first error: {report['first_error']}")


def main(argv: list[str] | None = None) -> int:
    argv, server_args = split_server_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server to test (ignored with --start)")
    parser.add_argument("--start", action="store_true", help="start `cold serve` (args after --) on a free port first")
    parser.add_argument("-n", "--requests", type=int, default=32)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model id (default: the server's first adapter, else its base model)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--extra", type=json.loads, default={}, help='extra JSON body fields, e.g. \'{"beta": 1.0}\'')
    parser.add_argument("--stream", action="store_true", help="stream responses and measure time to first token")
    parser.add_argument("--stream-share", type=float, default=0.0, help="share of requests streamed (0..1), drawn per request")
    parser.add_argument("--arrival-rate", type=float, default=0.0,
                        help="requests per second arriving as a Poisson process (0: all at once, bounded by -c)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals and of the streamed share")
    parser.add_argument("--questions", metavar="JSONL", default=None,
                        help="prompts: the 'question' of each line (e.g. ../shared/data/gsm8k/test.jsonl); default: 8 built in")
    parser.add_argument("--api-key", default=os.environ.get("COLD_API_KEY"))
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")
    if not 0 <= args.stream_share <= 1 or args.arrival_rate < 0:
        parser.error("--stream-share must be in [0, 1] and --arrival-rate >= 0")
    args.questions = read_questions(args.questions)

    process = None
    if args.start:
        port = free_port()
        args.url = f"http://127.0.0.1:{port}"
        process = start_server(server_args, port, os.environ.get("LOAD_TEST_SERVER_LOG", "load_test_server.log"))
    try:
        if process is not None:
            wait_healthy(args.url, process, timeout=600)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        if args.model is None:
            ids = [m["id"] for m in httpx.get(args.url + "/v1/models", headers=headers).json()["data"]]
            args.model = ids[1] if len(ids) > 1 else ids[0]
        print(f"model {args.model!r} on {args.url}; {platform.machine()} {os.cpu_count()} CPUs, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", file=sys.stderr)
        report = asyncio.run(run_load(args))
        report["model"] = args.model
        print_report(report, args)
        return 0 if report["failed"] == 0 else 1
    finally:
        if process is not None:
            stop_server(process)


if __name__ == "__main__":
    raise SystemExit(main())
