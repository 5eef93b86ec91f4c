#!/usr/bin/env python
"""Bounded soak test of `cold serve`: C clients for D seconds, a mix of everything a server meets.

    # start the server itself (arguments after -- go to `cold serve`), soak it 10 minutes, stop it
    python scripts/soak.py --clients 16 --duration 600 --start -- --model smollm2

    # against a running server (give its process id to follow its memory)
    python scripts/soak.py --url http://127.0.0.1:8000 --pid 12345 --clients 16 --duration 600

Each client sends, in turn: chat and completion requests with decoders cold, expert and base,
streamed and not; every 7th request a stream it abandons after the first chunk (a disconnect);
every 10th a bad request (it must get a 4xx OpenAI-style error). A greedy probe (decoder cold,
fixed prompt) runs every --probe-every seconds and must answer the same text each time. The
server's resident memory (RSS, from /proc) is sampled every second.

Prints: requests by kind, errors (anything but the expected answer), latency p50/p99 of completed
requests, the probe's agreement, RSS at the end of warm-up, its largest deviation after it and its
trend (MB per minute, least squares), and the server's own counters (HTTP 500s, running and
queued sequences left at the end). Exit status 1 on any error, probe mismatch, 500, leftover
sequence, or RSS deviation above --rss-tolerance after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import (  # noqa: E402
    QUESTIONS,
    free_port,
    percentile,
    scrape,
    split_server_args,
    start_server,
    stop_server,
    wait_healthy,
)

PROBE = "Count from one to five:"
BAD_BODIES = [  # each must be answered with a 4xx error
    {"prompt": "hi", "max_tokens": 4, "beta": -1},
    {"prompt": "hi", "max_tokens": 4, "alpha": 7},
    {"prompt": "hi", "max_tokens": 4, "alpah": 0.2},
    {"prompt": [], "max_tokens": 4},
    {"prompt": "hi", "max_tokens": 0},
]


@dataclass
class Tally:
    kinds: dict[str, int] = field(default_factory=dict)  # requests sent, by kind
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # completed requests
    probes: list[str] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)

    def count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def generation(client: httpx.AsyncClient, args, tally: Tally, index: int) -> None:
    decoder = ("cold", "expert", "base")[index % 3]
    chat = index % 2 == 0
    stream = (index // 2) % 2 == 1
    abandon = index % 7 == 6
    kind = f"{'chat' if chat else 'completion'}-{decoder}" + ("-abandoned" if abandon else "-stream" if stream else "")
    tally.count(kind)
    question = QUESTIONS[index % len(QUESTIONS)]
    body = {"model": args.model if decoder != "base" else args.base_model, "max_tokens": args.max_tokens,
            "decoder": decoder, "temperature": 0}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": question}]
    else:
        path, body["prompt"] = "/v1/completions", f"Question: {question}\nAnswer:"
    started = time.perf_counter()
    if not (stream or abandon):
        response = await client.post(path, json=body)
        if response.status_code != 200:
            tally.errors.append(f"{kind}: {response.status_code} {response.text[:160]}")
            return
        tally.latencies.append(time.perf_counter() - started)
        return
    body["stream"] = True
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            tally.errors.append(f"{kind}: {response.status_code} {(await response.aread())[:160].decode()}")
            return
        async for line in response.aiter_lines():
            if abandon and line.startswith("data: "):
                return  # leaving the block closes the connection mid-stream
            if line.startswith("data: ") and line != "data: [DONE]" and "error" in json.loads(line[6:]):
                tally.errors.append(f"{kind}: {line[:160]}")
                return
    tally.latencies.append(time.perf_counter() - started)


async def bad_request(client: httpx.AsyncClient, args, tally: Tally, index: int) -> None:
    tally.count("bad")
    body = {"model": args.model, **BAD_BODIES[index % len(BAD_BODIES)]}
    response = await client.post("/v1/completions", json=body)
    try:
        well_formed = 400 <= response.status_code < 500 and set(response.json()["error"]) >= {"message", "type"}
    except (ValueError, KeyError, TypeError):
        well_formed = False
    if not well_formed:
        tally.errors.append(f"bad request {body}: {response.status_code} {response.text[:160]}")


async def client_loop(client: httpx.AsyncClient, args, tally: Tally, deadline: float, counter) -> None:
    while time.monotonic() < deadline:
        index = next(counter)
        try:
            if index % 10 == 9:
                await bad_request(client, args, tally, index)
            else:
                await generation(client, args, tally, index)
        except httpx.HTTPError as exc:
            tally.errors.append(f"request {index}: {type(exc).__name__}: {exc}")


async def probe_loop(client: httpx.AsyncClient, args, tally: Tally, deadline: float) -> None:
    body = {"model": args.model, "prompt": PROBE, "max_tokens": 16, "decoder": "cold", "temperature": 0}
    while time.monotonic() < deadline:
        try:
            response = await client.post("/v1/completions", json=body)
            if response.status_code == 200:
                tally.probes.append(response.json()["choices"][0]["text"])
            else:
                tally.errors.append(f"probe: {response.status_code} {response.text[:160]}")
        except httpx.HTTPError as exc:
            tally.errors.append(f"probe: {type(exc).__name__}: {exc}")
        await asyncio.sleep(args.probe_every)


async def rss_loop(args, tally: Tally, start: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        value = rss_mb(args.pid) if args.pid else None
        if value is not None:
            tally.rss.append((time.monotonic() - start, value))
        await asyncio.sleep(1.0)


async def soak(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    tally = Tally()
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        before = await scrape(client)
        start = time.monotonic()
        deadline = start + args.duration
        counter = itertools.count()
        await asyncio.gather(probe_loop(client, args, tally, deadline), rss_loop(args, tally, start, deadline),
                             *(client_loop(client, args, tally, deadline, counter) for _ in range(args.clients)))
        wall = time.monotonic() - start
        await asyncio.sleep(1.0)  # let abandoned rows be freed before the last scrape
        after = await scrape(client)
        metrics = (await client.get("/metrics")).text
    server_500s = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("cold_requests_total{") and 'status="500"' in line)
    report = {
        "clients": args.clients, "duration_s": round(wall, 1), "max_tokens": args.max_tokens,
        "requests": sum(tally.kinds.values()), "by_kind": dict(sorted(tally.kinds.items())),
        "errors": len(tally.errors), "first_errors": tally.errors[:5],
        "latency_p50_s": percentile(tally.latencies, 50), "latency_p99_s": percentile(tally.latencies, 99),
        "probes": len(tally.probes), "probe_variants": len(set(tally.probes)),
        "server_500s": server_500s,
        "server_disconnects": after.get("cold_client_disconnects_total", 0) - before.get("cold_client_disconnects_total", 0),
        "server_cancelled_sequences": after.get("cold_cancelled_sequences_total", 0) - before.get("cold_cancelled_sequences_total", 0),
        "left_running": after.get("cold_running_sequences", 0), "left_queued": after.get("cold_queue_length", 0),
    }
    report.update(rss_summary(tally.rss, args.warmup))
    report["rss_series"] = [(round(t), round(mb, 1)) for t, mb in tally.rss[::10]]  # every 10 s
    return report


def rss_summary(samples: list[tuple[float, float]], warmup: float) -> dict:
    """RSS at the end of warm-up, its largest deviation after it (%), and its trend (MB/min, least squares)."""
    after = [(t, mb) for t, mb in samples if t >= warmup]
    if len(after) < 2:
        return {"rss_samples": len(samples)}
    baseline = after[0][1]
    n = len(after)
    mean_t, mean_mb = sum(t for t, _ in after) / n, sum(mb for _, mb in after) / n
    spread = sum((t - mean_t) ** 2 for t, _ in after)
    slope = sum((t - mean_t) * (mb - mean_mb) for t, mb in after) / spread if spread else 0.0
    return {"rss_samples": len(samples), "rss_first_mb": round(samples[0][1], 1), "rss_warm_mb": round(baseline, 1),
            "rss_max_mb": round(max(mb for _, mb in after), 1), "rss_last_mb": round(after[-1][1], 1),
            "rss_max_deviation_pct": round(100 * max(abs(mb - baseline) for _, mb in after) / baseline, 2),
            "rss_trend_mb_per_min": round(60 * slope, 2)}


def verdict(report: dict, tolerance_pct: float) -> list[str]:
    """What failed (empty: the soak passed)."""
    failed = []
    if report["errors"]:
        failed.append(f"{report['errors']} errors")
    if report["probe_variants"] > 1:
        failed.append(f"the greedy probe answered {report['probe_variants']} different texts")
    if report["server_500s"]:
        failed.append(f"{report['server_500s']:.0f} HTTP 500s")
    if report["left_running"] or report["left_queued"]:
        failed.append(f"{report['left_running']:.0f} running and {report['left_queued']:.0f} queued sequences left")
    if report.get("rss_max_deviation_pct", 0) > tolerance_pct:
        failed.append(f"RSS moved {report['rss_max_deviation_pct']}% after warm-up (tolerance {tolerance_pct}%)")
    return failed


def print_report(report: dict, failed: list[str]) -> None:
    print(f"{report['requests']} requests from {report['clients']} clients in {report['duration_s']} s "
          f"(max_tokens {report['max_tokens']}): {report['errors']} errors")
    print("by kind: " + ", ".join(f"{k} {v}" for k, v in report["by_kind"].items()))
    print(f"latency of completed requests: p50 {report['latency_p50_s']:.2f} s, p99 {report['latency_p99_s']:.2f} s")
    print(f"greedy probe: {report['probes']} runs, {report['probe_variants']} distinct text(s)")
    print(f"server: {report['server_500s']:.0f} HTTP 500s, {report['server_disconnects']:.0f} client disconnects, "
          f"{report['server_cancelled_sequences']:.0f} cancelled sequences, {report['left_running']:.0f} running and "
          f"{report['left_queued']:.0f} queued at the end")
    if "rss_warm_mb" in report:
        print(f"RSS: {report['rss_first_mb']} MB at start, {report['rss_warm_mb']} MB after warm-up, max "
              f"{report['rss_max_mb']} MB, last {report['rss_last_mb']} MB; largest deviation after warm-up "
              f"{report['rss_max_deviation_pct']}%, trend {report['rss_trend_mb_per_min']} MB/min")
    for line in report["first_errors"]:
        print("error:", line)
    print("PASS" if not failed else "FAIL: " + "; ".join(failed))


def main(argv: list[str] | None = None) -> int:
    argv, server_args = split_server_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server to soak (ignored with --start)")
    parser.add_argument("--start", action="store_true", help="start `cold serve` (args after --) on a free port first")
    parser.add_argument("--pid", type=int, default=None, help="the server's process id, to sample its RSS (--start sets it)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline is taken")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--probe-every", type=float, default=10.0, help="seconds between greedy probes")
    parser.add_argument("--rss-tolerance", type=float, default=5.0, help="allowed RSS deviation after warm-up, percent")
    parser.add_argument("--model", default=None, help="adapter model id (default: the server's first adapter)")
    parser.add_argument("--api-key", default=os.environ.get("COLD_API_KEY"))
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.max_tokens < 1:
        parser.error("--clients and --max-tokens must be >= 1, --duration > 0, --warmup >= 0")

    process = None
    if args.start:
        port = free_port()
        args.url = f"http://127.0.0.1:{port}"
        process = start_server(server_args, port, os.environ.get("SOAK_SERVER_LOG", "soak_server.log"))
        args.pid = process.pid
    try:
        if process is not None:
            wait_healthy(args.url, process, timeout=600)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        ids = [m["id"] for m in httpx.get(args.url + "/v1/models", headers=headers).json()["data"]]
        if len(ids) < 2 and args.model is None:
            raise SystemExit("the server has no adapter: the soak mixes CoLD, expert and base requests")
        args.base_model, args.model = ids[0], args.model or ids[1]
        print(f"soaking {args.url} (model {args.model!r}, base {args.base_model!r}) with {args.clients} clients for "
              f"{args.duration:g} s; {platform.machine()} {os.cpu_count()} CPUs", file=sys.stderr)
        report = asyncio.run(soak(args))
        failed = verdict(report, args.rss_tolerance)
        report["failed"] = failed
        print_report(report, failed)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 1 if failed else 0
    finally:
        if process is not None:
            stop_server(process)


if __name__ == "__main__":
    raise SystemExit(main())
