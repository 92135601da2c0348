"""Shutdown stages on a MockClock: order, one absolute deadline for stages and closes,
idempotence; and the watchdog that ends a process whose shutdown ignores that deadline."""

from __future__ import annotations

import math
import threading

import pytest
import trio
import trio.testing

from cordum.runtime.lifecycle import CLOSE_RESERVE, Lifecycle, close_scope, shutdown_deadline
from cordum.runtime.service import ShutdownWatchdog


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_stages_run_in_declared_order_and_cancel_the_root(clock):
    lifecycle = Lifecycle("svc", ["taps", "http", "stores"], timeout=15)
    ran: list[str] = []

    def hook(name: str, seconds: float):
        async def run() -> None:
            await trio.sleep(seconds)
            ran.append(name)
        return run

    lifecycle.on("stores", hook("stores", 0.1))
    lifecycle.on("http", hook("http-b", 2))
    lifecycle.on("http", hook("http-a", 1))  # hooks of one stage run together
    lifecycle.on("taps", hook("taps", 0.5))
    with trio.CancelScope() as root:
        lifecycle.attach(root)
        await lifecycle.shutdown("test")
        await trio.sleep_forever()
    assert root.cancelled_caught
    assert ran == ["taps", "http-a", "http-b", "stores"]
    assert lifecycle.events == [(k, s) for s in ["taps", "http", "stores"] for k in ("stage.begin", "stage.end")]
    assert lifecycle.completed_in_time
    assert trio.current_time() == pytest.approx(2.6)


async def test_one_deadline_bounds_all_stages(clock):
    lifecycle = Lifecycle("svc", ["slow", "never"], timeout=15)
    reached: list[str] = []

    async def slow() -> None:
        await trio.sleep(60)
        reached.append("slow")

    async def never() -> None:
        reached.append("never")

    lifecycle.on("slow", slow)
    lifecycle.on("never", never)
    await lifecycle.shutdown("test")
    assert reached == [] and not lifecycle.completed_in_time
    # Stopped with the reserve for closing connections still left before the deadline.
    assert trio.current_time() == pytest.approx(15 - CLOSE_RESERVE)


async def test_a_second_shutdown_waits_for_the_first(clock):
    lifecycle = Lifecycle("svc", ["only"], timeout=15)
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep(1)

    lifecycle.on("only", once)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lifecycle.shutdown, "first")
        await trio.sleep(0.1)
        await lifecycle.shutdown("second")
        assert lifecycle.finished.is_set()
    assert calls == 1


def test_unknown_stage_is_refused():
    lifecycle = Lifecycle("svc", ["a"])
    with pytest.raises(ValueError, match="unknown shutdown stage 'b'"):
        lifecycle.on("b", None)  # type: ignore[arg-type]


async def test_close_scope_outside_a_shutdown_is_its_own_timeout_and_shielded(clock):
    assert shutdown_deadline() == math.inf
    with trio.CancelScope() as outer:
        try:
            outer.cancel()
            await trio.sleep(1)
        finally:
            with close_scope(2) as scope:
                await trio.sleep(1)  # runs although its task is cancelled
            closed_at = trio.current_time()
    assert scope.shield and not scope.cancelled_caught
    assert closed_at == pytest.approx(1)
    with close_scope(2) as scope:
        await trio.sleep(60)
    assert scope.cancelled_caught and trio.current_time() == pytest.approx(3)


async def _serve_with_slow_closes(lifecycle: Lifecycle, stage_seconds: float, closes: list[str]) -> None:
    """A root scope whose stage takes `stage_seconds`; on the way out two resources close,
    each trying to take 10 s (its own timeout) of a 60 s hang."""

    async def stage() -> None:
        await trio.sleep(stage_seconds)

    lifecycle.on("stores", stage)
    with trio.CancelScope() as root:
        lifecycle.attach(root)
        try:
            try:
                await lifecycle.shutdown("test")
                await trio.sleep_forever()
            finally:
                with close_scope(10):
                    await trio.sleep(60)
                closes.append(f"lease@{trio.current_time():g}")
        finally:
            with close_scope(10):
                await trio.sleep(60)
            closes.append(f"client@{trio.current_time():g}")


async def test_closes_end_at_the_shutdown_deadline(clock):
    lifecycle = Lifecycle("svc", ["stores"], timeout=15)
    closes: list[str] = []
    await _serve_with_slow_closes(lifecycle, 13, closes)
    # Stages done at 13 s; the first close is cut at the 15 s deadline, not at 13 + 10 s; the
    # second starts past it and ends at once, instead of adding its own 10 s.
    assert shutdown_deadline() == lifecycle.deadline == pytest.approx(15)
    assert closes == ["lease@15", "client@15"]
    assert lifecycle.completed_in_time  # the stages were on time ...
    assert not lifecycle.closes_done()  # ... the closes were not
    assert not lifecycle.completed_in_time


async def test_a_shutdown_whose_closes_fit_is_on_time(clock):
    lifecycle = Lifecycle("svc", ["stores"], timeout=15)
    with trio.CancelScope() as root:
        lifecycle.attach(root)
        try:
            await lifecycle.shutdown("test")
            await trio.sleep_forever()
        finally:
            with close_scope(2) as scope:
                await trio.sleep(1.5)
    assert not scope.cancelled_caught
    assert lifecycle.closes_done() and lifecycle.completed_in_time
    assert trio.current_time() == pytest.approx(1.5)


async def test_closes_done_before_any_shutdown_is_on_time(clock):
    lifecycle = Lifecycle("svc", ["stores"], timeout=15)
    await trio.sleep(100)
    assert lifecycle.closes_done()


async def test_on_begin_gets_the_seconds_to_the_deadline(clock):
    armed: list[float] = []
    lifecycle = Lifecycle("svc", ["stores"], timeout=7, on_begin=armed.append)
    await trio.sleep(3)
    await lifecycle.shutdown("test")
    await lifecycle.shutdown("again")
    assert armed == [7]
    assert lifecycle.deadline == pytest.approx(10)


def test_watchdog_exits_with_code_1_after_deadline_and_margin():
    codes: list[int] = []
    exited = threading.Event()

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    watchdog = ShutdownWatchdog(margin=0.05, exit=fake_exit)
    watchdog.arm(0.05)
    assert exited.wait(10)
    assert codes == [1] and watchdog.fired


def test_a_disarmed_watchdog_never_fires():
    codes: list[int] = []
    watchdog = ShutdownWatchdog(margin=0.05, exit=codes.append)
    watchdog.arm(0.05)
    watchdog.disarm()
    watchdog._timer.join(10)  # a cancelled timer's thread ends without calling its function
    assert codes == [] and not watchdog.fired
