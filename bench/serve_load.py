"""Load and soak test of the OpenAI-compatible server: N concurrent `openai` clients for a while.

    python -m bench.serve_load --clients 64 --duration 180 --disconnect 0.2 --start-server   # the soak
    python -m bench.serve_load --base-url http://127.0.0.1:8000/v1 --api-key K --clients 8 --duration 30
    python -m bench.serve_load --start-server --adapters ads,qa --server-args --adapter ads=DIR1 --adapter qa=DIR2

Each client loops until the deadline over a mix of requests: chat, streamed or not, some with n=2, and a share
(`--disconnect`) that hang up mid-request (a stream closed after a few chunks, or a non-streaming request
given up after a short timeout). With `--adapters`, each request names the base (`--model`) or one of the
adapters at random, so rows with different adapters share batches. It reports, over the clients that stay:
latency p50/p95, time to first token (streams), completion tokens per second, and errors (any exception or
non-2xx). With `--start-server` the script starts `python -m llama_e_jax.serve` itself, so it can also report
the server's RSS (after a warm-up phase that compiles every shape, at the end, and the ratio) and how long the
engine took to be idle after the last request (`/health`).
Exit status 1 if the acceptance fails: errors > 0, not idle within 5 s, or RSS grown more than 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

TOPICS = ["a red ceramic mug", "wireless earbuds", "a linen summer dress", "a cast iron pan", "trail running shoes",
          "a bamboo cutting board", "a kids' science kit", "noise-cancelling headphones"]
TASKS = ["Write a short ad for {}.", "Give three selling points of {}.", "Write a product title for {}.",
         "Answer briefly: who would buy {}?"]


@dataclasses.dataclass
class Stats:
    latencies: list[float] = dataclasses.field(default_factory=list)
    ttfts: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0
    completed: int = 0
    disconnects: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    last_end: float = 0.0


async def _stream_request(client: openai.AsyncOpenAI, ask: dict, hang_up_after: int | None, stats: Stats) -> None:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    chunks = 0
    async for chunk in stream:
        chunks += 1
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if hang_up_after is not None and chunks >= hang_up_after:
            await stream.close()
            stats.disconnects += 1
            return
    stats.latencies.append(time.perf_counter() - started)
    stats.ttfts.append(first if first is not None else stats.latencies[-1])
    stats.tokens += tokens
    stats.completed += 1


async def _plain_request(client: openai.AsyncOpenAI, ask: dict, hang_up_s: float | None, stats: Stats) -> None:
    started = time.perf_counter()
    try:
        caller = client if hang_up_s is None else client.with_options(timeout=hang_up_s)
        reply = await caller.chat.completions.create(**ask)
    except openai.APITimeoutError:
        if hang_up_s is None:
            raise
        stats.disconnects += 1
        return
    stats.latencies.append(time.perf_counter() - started)  # (a hang-up that came too late counts here)
    stats.ttfts.append(stats.latencies[-1])
    stats.tokens += reply.usage.completion_tokens
    stats.completed += 1


async def _client(index: int, args: argparse.Namespace, deadline: float, stats: Stats) -> None:
    rng = random.Random(args.seed * 1000 + index)
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    try:
        while time.perf_counter() < deadline:
            prompt = rng.choice(TASKS).format(rng.choice(TOPICS))
            ask = dict(model=rng.choice(args.models), messages=[{"role": "user", "content": prompt}],
                       max_tokens=rng.randint(16, args.max_tokens), temperature=rng.choice([0.0, 0.7]),
                       n=2 if rng.random() < 0.2 else 1)
            leave = rng.random() < args.disconnect
            try:
                if rng.random() < 0.5:
                    await _stream_request(client, ask, rng.randint(1, 4) if leave else None, stats)
                else:
                    await _plain_request(client, ask, rng.uniform(0.5, 3.0) if leave else None, stats)
            except Exception as error:  # noqa: BLE001 - every failure of a staying client is an error to report
                stats.errors.append(f"{type(error).__name__}: {error}"[:200])
            stats.last_end = time.perf_counter()
    finally:
        await client.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _health(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/health", timeout=10).json()


def _seconds_until_idle(base_url: str, since: float, limit_s: float = 60) -> float:
    while time.perf_counter() - since < limit_s:
        health = _health(base_url)
        if health["rows_in_use"] == 0 and health["queued_rows"] == 0:
            return time.perf_counter() - since
        time.sleep(0.1)
    return float("inf")


def _start_server(args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "llama_e_jax.serve", "--port", str(args.port), "--api-key", args.api_key,
               "--model-name", args.model, *args.server_args]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"))
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}); see {args.server_log}")
        try:
            _health(args.base_url)
            return server
        except httpx.HTTPError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the server did not start within 900 s")


async def _run(args: argparse.Namespace, duration_s: float) -> tuple[Stats, float]:
    stats = Stats()
    started = time.perf_counter()
    await asyncio.gather(*(_client(i, args, started + duration_s, stats) for i in range(args.clients)))
    return stats, time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default=None, help="default: http://127.0.0.1:PORT/v1")
    parser.add_argument("--api-key", default="load-test-key")
    parser.add_argument("--model", default="llama-e", help="the base model's id (the server's --model-name)")
    parser.add_argument("--adapters", default="", help="comma-separated adapter ids served next to the base; "
                                                         "each request picks the base or one of them at random")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=180, help="seconds during which clients start requests")
    parser.add_argument("--warmup", type=float, default=30, help="seconds of the same mix before measuring")
    parser.add_argument("--disconnect", type=float, default=0.2, help="share of requests that hang up mid-way")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--timeout", type=float, default=600, help="client timeout of the requests that stay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-server", action="store_true", help="start python -m llama_e_jax.serve here")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--server-log", default="/tmp/serve_load_server.log")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="passed to the server")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.base_url = args.base_url or f"http://127.0.0.1:{args.port}/v1"
    args.models = [args.model, *(name for name in args.adapters.split(",") if name)]
    server = _start_server(args) if args.start_server else None
    try:
        result: dict = {"clients": args.clients, "models": args.models, "duration_s": args.duration, "disconnect_share": args.disconnect,
                        "load_average_before": os.getloadavg()}
        if server is not None:
            result["rss_started_mib"] = _rss_mib(server.pid)
        if args.warmup > 0:
            asyncio.run(_run(args, args.warmup))
            _seconds_until_idle(args.base_url, time.perf_counter())
        if server is not None:
            result["rss_after_warmup_mib"] = _rss_mib(server.pid)
        stats, elapsed = asyncio.run(_run(args, args.duration))
        idle_s = _seconds_until_idle(args.base_url, stats.last_end) if stats.last_end else 0.0
        result.update(
            elapsed_s=round(elapsed, 1), completed=stats.completed, disconnects=stats.disconnects,
            errors=len(stats.errors), first_errors=stats.errors[:5],
            latency_p50_s=round(_percentile(stats.latencies, 50), 2), latency_p95_s=round(_percentile(stats.latencies, 95), 2),
            ttft_p50_s=round(_percentile(stats.ttfts, 50), 2), ttft_p95_s=round(_percentile(stats.ttfts, 95), 2),
            completion_tokens=stats.tokens, tokens_per_s=round(stats.tokens / elapsed, 1),
            idle_after_last_request_s=round(idle_s, 2), load_average_after=os.getloadavg())
        ok = not stats.errors and idle_s <= 5
        if server is not None:
            time.sleep(2)  # let freed buffers go back
            result["rss_end_mib"] = _rss_mib(server.pid)
            result["rss_growth"] = round(result["rss_end_mib"] / result["rss_after_warmup_mib"] - 1, 4)
            ok = ok and result["rss_growth"] <= 0.05
        result["acceptance"] = "pass" if ok else "FAIL"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
