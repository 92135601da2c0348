"""Shutdown stages on a MockClock: order, one absolute deadline, idempotence."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cordum.runtime.lifecycle import CLOSE_RESERVE, Lifecycle


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
