"""Print every message of a subject, one per line: a queue-group member or a broadcast listener.

usage: python -m tests.procs.consumer SUBJECT QUEUE   (QUEUE "-" means broadcast)
"""

from __future__ import annotations

import sys


from cordum.infra.aio import open_bridge, run_with_bridge
from cordum.infra.bus import open_bus
from cordum.infra.config import load_settings


async def main(subject: str, queue: str) -> None:
    settings = load_settings()
    async with open_bridge(), open_bus(settings, name=settings.instance_id) as bus:
        source = bus.subscribe(subject) if queue == "-" else bus.consume(subject, queue)
        async with source as messages:
            print("ready", flush=True)
            async for msg in messages:
                print(msg.data.decode(), flush=True)
                await msg.ack()


if __name__ == "__main__":
    run_with_bridge(main, sys.argv[1], sys.argv[2])
