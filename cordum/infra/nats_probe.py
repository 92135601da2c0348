"""Wait until a NATS cluster's JetStream can hold a replicated stream (its meta leader elected,
enough peers known): `python -m cordum.infra.nats_probe SERVERS REPLICAS TIMEOUT`.

A separate process with a plain asyncio loop of its own, apart from any caller's Trio run
(DESIGN.md §4.7). Exit 0 when ready, else non-zero with the last error.
"""

from __future__ import annotations

import asyncio
import sys
import time

import nats
from nats.js.api import StorageType

PROBE = "CORDUM_CLUSTER_PROBE"


async def probe(servers: list[str], replicas: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(servers=servers, connect_timeout=2, max_reconnect_attempts=0,
                                    allow_reconnect=False)
            try:
                js = nc.jetstream(timeout=2)
                await js.add_stream(name=PROBE, subjects=["cordum.cluster.probe"], num_replicas=replicas,
                                    storage=StorageType.MEMORY)
                await js.delete_stream(PROBE)
                return
            finally:
                await nc.close()
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.25)
    sys.exit(f"JetStream cluster not ready: {last!r}")


if __name__ == "__main__":
    asyncio.run(probe(sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])))
