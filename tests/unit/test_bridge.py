"""The Trio/asyncio bridge under each runtime: values and errors cross both ways, and a cancel on
either side stops the other side's work before the canceller moves on."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cordum.infra.aio import (
    BridgeConfigError,
    BridgeError,
    aio,
    bridge_from_env,
    open_bridge,
    run_with_bridge,
    trio_from_aio,
)

# Importing trio_asyncio patches asyncio for the whole process, so the emulated runtime is tested
# in a pytest process of its own (test_the_emulated_runtime_in_its_own_process).
EMULATED_ONLY = os.environ.get("CORDUM_TEST_EMULATED_BRIDGE") == "1"
each_bridge = pytest.mark.parametrize("bridge", ["trio-asyncio"] if EMULATED_ONLY else ["uvloop", "asyncio"])
guest_bridges = pytest.mark.parametrize("bridge", ["uvloop", "asyncio"])


def run(bridge: str, fn, *args):
    return run_with_bridge(fn, *args, bridge=bridge)


@each_bridge
def test_values_and_errors_cross_to_trio(bridge: str) -> None:
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("asyncio side")

    async def main() -> tuple[int, str]:
        async with open_bridge():
            total = await aio(add)(2, b=3)
            with pytest.raises(KeyError, match="asyncio side"):
                await aio(fail)()
            return total, type(asyncio.get_running_loop()).__module__

    total, loop_module = run(bridge, main)
    assert total == 5
    assert loop_module.startswith({"uvloop": "uvloop", "asyncio": "asyncio", "trio-asyncio": "trio_asyncio"}[bridge])


@each_bridge
def test_trio_cancel_stops_the_asyncio_task_first(bridge: str) -> None:
    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # cleanup that takes a while: the Trio caller waits for it
            events.append("asyncio cleaned up")
            raise

    async def main() -> None:
        async with open_bridge():
            with trio.move_on_after(0.1) as scope:
                await aio(slow)()
            events.append("trio resumed")
            assert scope.cancelled_caught

    run(bridge, main)
    assert events == ["asyncio cleaned up", "trio resumed"]


@guest_bridges
def test_a_call_made_while_cancelled_never_starts(bridge: str) -> None:
    started: list[int] = []

    async def work() -> None:
        started.append(1)

    async def main() -> None:
        async with open_bridge():
            with trio.CancelScope() as scope:
                scope.cancel()
                await aio(work)()
            await trio.sleep(0.05)

    run(bridge, main)
    assert started == []


@each_bridge
def test_values_errors_and_cancels_cross_to_asyncio(bridge: str) -> None:
    events: list[str] = []

    async def trio_double(x: int) -> int:
        await trio.sleep(0)
        return 2 * x

    async def trio_fail() -> None:
        await trio.sleep(0)
        raise ValueError("trio side")

    async def trio_slow() -> None:
        try:
            await trio.sleep(30)
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.05)
            events.append("trio cleaned up")

    async def on_asyncio() -> int:
        doubled = await trio_from_aio(trio_double)(21)
        with pytest.raises(ValueError, match="trio side"):
            await trio_from_aio(trio_fail)()
        task = asyncio.ensure_future(trio_from_aio(trio_slow)())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        events.append("asyncio resumed")
        return doubled

    async def main() -> int:
        async with open_bridge():
            return await aio(on_asyncio)()

    assert run(bridge, main) == 42
    assert events == ["trio cleaned up", "asyncio resumed"]


@each_bridge
def test_signals_reach_trio(bridge: str) -> None:
    async def main() -> str:
        async with open_bridge():
            with trio.open_signal_receiver(signal.SIGUSR1) as signals:
                os.kill(os.getpid(), signal.SIGUSR1)
                with trio.fail_after(10):
                    async for signum in signals:
                        return signal.Signals(signum).name
        return "none"

    assert run(bridge, main) == "SIGUSR1"


@pytest.mark.parametrize("value", ["", "uvloop", "asyncio", "trio-asyncio"])
def test_the_setting_names_a_runtime(value: str) -> None:
    chosen = bridge_from_env({"CORDUM_BRIDGE": value})
    assert chosen == (value or "uvloop")


def test_a_bad_setting_is_named() -> None:
    with pytest.raises(BridgeConfigError, match=r"CORDUM_BRIDGE='tokio' is not one of uvloop, asyncio, trio-asyncio"):
        bridge_from_env({"CORDUM_BRIDGE": "tokio"})


def test_plain_trio_run_gets_a_clear_error() -> None:
    async def main() -> None:
        async with open_bridge():
            pass

    with pytest.raises(BridgeError, match="run_with_bridge"):
        trio.run(main)


@pytest.mark.skipif(EMULATED_ONLY, reason="this is the run it starts")
def test_the_emulated_runtime_in_its_own_process() -> None:
    env = {**os.environ, "CORDUM_TEST_EMULATED_BRIDGE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "trio-asyncio"],
        env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "5 passed" in proc.stdout  # the four crossings + the setting


@pytest.mark.parametrize("bridge", ["uvloop", "asyncio"])
def test_trio_waits_for_io_on_the_host_loop_not_in_a_thread(bridge: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trio's stock guest mode polls its I/O in a helper thread; ours parks it on the host loop."""
    import trio._core._run as trio_run

    def no_thread(*args, **kwargs):
        raise AssertionError("Trio's guest I/O thread was started")

    monkeypatch.setattr(trio_run, "start_thread_soon", no_thread)

    async def sleeper_and_sockets() -> bytes:
        await trio.sleep(0.02)  # a timer only
        a, b = trio.socket.socketpair()
        with a, b:
            async with trio.open_nursery() as nursery:
                async def later() -> None:
                    await trio.sleep(0.02)
                    await a.send(b"ping")
                nursery.start_soon(later)
                data = await b.recv(4)  # Trio's own I/O, woken through the host loop
        async def echo() -> int:
            await asyncio.sleep(0.01)
            return 7
        assert await aio(echo)() == 7  # a host-side wake-up
        return data

    assert run(bridge, sleeper_and_sockets) == b"ping"


@pytest.mark.parametrize("bridge", ["uvloop", "asyncio"])
def test_a_short_sleep_wakes_trio_once_not_in_a_spin(bridge: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's timers fire on whole milliseconds of a cached clock: a timer set to the exact
    deadline fired early, found nothing due, and parked again, dozens of times per sleep."""
    from cordum.infra import aio as bridge_module

    ticks = [0]
    original = bridge_module._ThreadlessTicks._tick

    def counting(self) -> None:
        ticks[0] += 1
        original(self)

    monkeypatch.setattr(bridge_module._ThreadlessTicks, "_tick", counting)

    async def sleeps() -> int:
        before = ticks[0]
        for _ in range(20):
            await trio.sleep(0.0015)
        return ticks[0] - before

    assert run(bridge, sleeps) <= 20 * 4  # about two ticks per sleep: one to park, one to wake


@guest_bridges
def test_a_crossing_wakes_trio_without_its_wakeup_socket(bridge: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An asyncio reply wakes a parked Trio by a callback on the host loop: no write to Trio's
    wake-up socket (a syscall, a drain and one more loop iteration each), and a burst of replies
    in one host iteration costs one tick, not one each."""
    from trio._core._wakeup_socketpair import WakeupSocketpair

    from cordum.infra import aio as bridge_module

    writes, ticks = [0], [0]
    original_write, original_tick = WakeupSocketpair.wakeup_thread_and_signal_safe, bridge_module._ThreadlessTicks._tick

    def counting_write(self) -> None:
        writes[0] += 1
        original_write(self)

    def counting_tick(self) -> None:
        ticks[0] += 1
        original_tick(self)

    monkeypatch.setattr(WakeupSocketpair, "wakeup_thread_and_signal_safe", counting_write)
    monkeypatch.setattr(bridge_module._ThreadlessTicks, "_tick", counting_tick)

    async def nothing() -> int:
        return 1

    async def crossings() -> tuple[int, int]:
        call = aio(nothing)
        await call()
        before = writes[0]
        for _ in range(50):
            assert await call() == 1
        single = writes[0] - before

        results: list[int] = []
        waiters = [asyncio.get_running_loop().create_future() for _ in range(20)]

        async def one(i: int) -> None:
            async def wait() -> int:
                return await waiters[i]
            results.append(await aio(wait)())

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
            await trio.sleep(0.02)  # all 20 parked in their crossings, Trio itself parked too
            asyncio.get_running_loop().call_soon(lambda: [w.set_result(1) for w in waiters])
            burst = ticks[0]
        assert results == [1] * 20
        return single, ticks[0] - burst

    single, burst_ticks = run(bridge, crossings)
    assert single == 0
    assert burst_ticks <= 6  # one wake for the burst (and a few ticks to run the 20 tasks), not 20


@guest_bridges
def test_acks_queued_when_the_flusher_is_cancelled_go_out_with_the_final_flush(bridge: str) -> None:
    """Items nobody waits for (acks, lingering for company) stay queued when the flusher task is
    cancelled, so the final flush at shutdown still sends them."""
    from cordum.infra.aio import Batcher

    sent: list[str] = []

    async def send(items: list[str]) -> list[None]:
        sent.extend(items)
        return [None] * len(items)

    async def cancelled_then_flushed() -> list[str]:
        batcher: Batcher[str, None] = Batcher("acks", send, linger=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            batcher.submit_nowait("ack-1")
            await trio.sleep(0.005)  # the flusher lingers for company
            nursery.cancel_scope.cancel()
        await batcher.flush_now(close=True)
        return sent

    assert run(bridge, cancelled_then_flushed) == ["ack-1"]


@guest_bridges
def test_metrics_count_crossings_and_wakeups(bridge: str) -> None:
    """`cordum_bridge_crossings_total` and `cordum_bridge_wakeups_total` (every service's /metrics)
    follow what the bridge did: one per call into asyncio, one per wake-up of a parked Trio."""
    from cordum.infra.aio import COUNTS
    from cordum.infra.metrics import Metrics

    async def nothing() -> int:
        return 1

    async def some_work() -> tuple[int, int]:
        crossings, wakeups = COUNTS.crossings, COUNTS.wakeups
        for _ in range(5):
            await aio(nothing)()
        await trio.sleep(0.01)  # parked until its timer wakes it
        return COUNTS.crossings - crossings, COUNTS.wakeups - wakeups

    crossed, woken = run(bridge, some_work)
    assert crossed == 5 and woken >= 1
    text = Metrics("replica-1").exposition().decode()
    assert f'cordum_bridge_crossings_total{{pod="replica-1"}} {float(COUNTS.crossings)}' in text
    assert f'cordum_bridge_wakeups_total{{pod="replica-1"}} {float(COUNTS.wakeups)}' in text
