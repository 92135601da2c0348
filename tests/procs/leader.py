"""A replica that campaigns for a leader key and, while leading, appends fenced entries to a log.

usage: python -m tests.procs.leader KEY TTL
"""

from __future__ import annotations

import json
import sys
import time

import trio

from cordum.infra.aio import open_bridge, run_with_bridge
from cordum.infra.config import load_settings
from cordum.infra.redis import open_redis
from cordum.runtime.leader import LeaderElection
from cordum.runtime.lease import Lease, Leases


def say(**fields: object) -> None:
    print(json.dumps({"t": time.time(), **fields}), flush=True)


async def main(key: str, ttl: float) -> None:
    settings = load_settings()
    async with open_bridge(), open_redis(settings) as redis:
        election = LeaderElection(Leases(redis, settings.instance_id), key, ttl)

        async def lead(lease: Lease) -> None:
            say(event="elected", fence=lease.fence)
            while True:
                await redis.rpush(f"{key}:log", f"{settings.instance_id}:{lease.fence}")
                await trio.sleep(0.05)

        say(event="campaigning")
        await election.run(lead)


if __name__ == "__main__":
    run_with_bridge(main, sys.argv[1], float(sys.argv[2]))
