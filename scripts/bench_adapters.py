"""What one Redis round trip and one NATS publish cost through the Trio adapters.

Starts its own redis-server and nats-server on free loopback ports (or uses REDIS_URL/NATS_URL),
then measures ops/s for: sequential Redis GETs (one bridge crossing + one round trip each),
GETs from 64 concurrent tasks, the same through `execute` (auto-pipelined), pipelined GETs; NATS core publishes awaited one by one, from
64 concurrent tasks (the batcher groups them), and `publish_many`; JetStream publishes (stored
and acked). Prints a table, or one JSON object with --json.

usage: .venv/bin/python scripts/bench_adapters.py [--n 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cordum.dev.servers import start_nats, start_redis  # noqa: E402
from cordum.infra.aio import run_with_bridge  # noqa: E402
from cordum.infra.bus import Outgoing, open_bus  # noqa: E402
from cordum.infra.config import load_settings  # noqa: E402
from cordum.infra.redis import open_redis  # noqa: E402
from cordum.runtime import log  # noqa: E402


async def _rate(n: int, run) -> float:
    started = time.perf_counter()
    await run()
    return n / (time.perf_counter() - started)


async def _concurrently(n: int, tasks: int, op) -> None:
    per_task = n // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await op()

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)


async def bench(n: int) -> dict[str, float]:
    settings = load_settings({**os.environ, "CORDUM_INSTANCE_ID": "bench"})
    log.configure(service="bench", instance="bench", level="warning")
    figures: dict[str, float] = {}
    async with open_redis(settings) as redis:
        await redis.set("bench:key", "x")

        async def sequential_gets() -> None:
            for _ in range(n):
                await redis.get("bench:key")

        figures["redis_get_sequential_ops_s"] = await _rate(n, sequential_gets)
        figures["redis_get_64_tasks_ops_s"] = await _rate(n, lambda: _concurrently(n, 64, lambda: redis.get("bench:key")))
        figures["redis_execute_64_tasks_ops_s"] = await _rate(
            n, lambda: _concurrently(n, 64, lambda: redis.execute("GET", "bench:key")))
        commands = [("GET", "bench:key")] * n
        figures["redis_get_pipelined_ops_s"] = await _rate(n, lambda: redis.pipeline(commands))

    async with open_bus(settings, name="bench") as bus:
        async def sequential_publishes() -> None:
            for _ in range(n):
                await bus.publish("bench.core", b"x" * 64)

        figures["nats_publish_sequential_msgs_s"] = await _rate(n, sequential_publishes)
        figures["nats_publish_64_tasks_msgs_s"] = await _rate(
            n, lambda: _concurrently(n, 64, lambda: bus.publish("bench.core", b"x" * 64)))
        batch = [Outgoing("bench.core", b"x" * 64)] * n
        figures["nats_publish_many_msgs_s"] = await _rate(n, lambda: bus.publish_many(batch))
        js_n = max(n // 5, 100)
        figures["jetstream_publish_64_tasks_msgs_s"] = await _rate(
            js_n, lambda: _concurrently(js_n, 64, lambda: bus.publish("sys.audit.export", b"x" * 64)))
    return {name: round(value) for name, value in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="operations per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    servers = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if "REDIS_URL" not in os.environ:
                servers.append(start_redis(Path(tmp) / "redis"))
                os.environ["REDIS_URL"] = servers[-1].url
            if "NATS_URL" not in os.environ:
                servers.append(start_nats(Path(tmp) / "nats"))
                os.environ["NATS_URL"] = servers[-1].url
            figures = run_with_bridge(bench, args.n)
        finally:
            for server in servers:
                server.stop()
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:40s} {value:>10,}")


if __name__ == "__main__":
    main()
