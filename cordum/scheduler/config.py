"""Where the scheduler's routing and timeouts come from: the pools file, overlaid by the
`pools` / `timeouts` sections of the system configuration document (`cfg:system:default`),
reloaded on `sys.config.changed` and by a poll (a missed broadcast heals within the interval).
A bad overlay is logged and ignored: the routing in force stays."""

from __future__ import annotations

from pathlib import Path

import trio

from cordum.infra.config import ConfigError
from cordum.runtime.log import get_logger
from cordum.scheduler.loops import Timeouts
from cordum.scheduler.routing import Pools, PoolsError, load_pools_text, parse_pools
from cordum.store.config import ConfigStore

log = get_logger("scheduler.config")


class PoolsSource:
    def __init__(self, path: Path, configs: ConfigStore, timeouts: Timeouts) -> None:
        self.path = path
        self.configs = configs
        self.timeouts = timeouts
        self._file: Pools | None = None
        self._current: Pools | None = None

    def current(self) -> Pools:
        assert self._current is not None, "pools not loaded"
        return self._current

    async def load(self) -> None:
        if self._file is None:
            try:
                text = await trio.Path(self.path).read_text()
                self._file = load_pools_text(text, str(self.path))
            except OSError as exc:
                raise ConfigError(f"SCHEDULER_POOLS_PATH={str(self.path)!r} is invalid: {exc.strerror}") from None
            except PoolsError as exc:
                raise ConfigError(f"SCHEDULER_POOLS_PATH={str(self.path)!r} is invalid: {exc}") from None
        doc = await self.configs.get("system", "default")
        data = (doc or {}).get("data") or {}
        pools = self._file
        if data.get("pools"):
            try:
                pools = parse_pools(data["pools"], "cfg:system:default pools")
            except PoolsError as exc:
                log.error("scheduler.pools_overlay_invalid", error=str(exc))
        timeouts = data.get("timeouts") or {}
        for name, attr in (("dispatch_timeout_seconds", "dispatch"), ("running_timeout_seconds", "running")):
            value = timeouts.get(name)
            if isinstance(value, (int, float)) and value > 0:
                setattr(self.timeouts, attr, float(value))
        if pools != self._current:
            log.info("scheduler.pools_loaded", topics=sorted(pools.topics))
        self._current = pools

    async def poll(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await self.load()
            except Exception as exc:  # Redis down: keep the routing in force
                log.warning("scheduler.config_poll_failed", error=repr(exc))
