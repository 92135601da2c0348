"""cordum.scheduler.waiting: which jobs a scheduler replica answers from memory while they wait
for a worker (pure: times are given)."""

from __future__ import annotations

from cordum.scheduler.waiting import WaitingJobs


def test_a_job_noted_waiting_is_recent_until_the_refresh():
    waiting = WaitingJobs(refresh=10.0)
    assert not waiting.recent("a", 0.0)  # never seen: the whole path
    waiting.note("a", 100.0)
    assert waiting.recent("a", 100.0) and waiting.recent("a", 109.9)
    assert not waiting.recent("a", 110.0)  # time for the whole path again
    waiting.note("a", 110.0)  # ... which notes it anew
    assert waiting.recent("a", 119.0)
    waiting.forget("a")  # dispatched
    assert not waiting.recent("a", 111.0) and len(waiting) == 0


def test_entries_past_the_refresh_are_dropped_as_others_are_noted():
    waiting = WaitingJobs(refresh=10.0)
    waiting.note("old", 0.0)
    waiting.note("mid", 5.0)
    waiting.note("new", 12.0)  # "old" no longer counts: dropped
    assert len(waiting) == 2 and waiting.recent("mid", 12.0) and not waiting.recent("old", 12.0)
    waiting.note("mid", 13.0)  # noted again: goes behind "new"
    waiting.note("last", 22.5)  # "new" (12.0) has expired, "mid" (13.0) not yet
    assert len(waiting) == 2 and waiting.recent("mid", 22.5) and waiting.recent("last", 22.5)


def test_past_capacity_the_oldest_are_forgotten():
    waiting = WaitingJobs(refresh=10.0, capacity=3)
    for k, job in enumerate("abcde"):
        waiting.note(job, float(k))
    assert len(waiting) == 3
    assert [waiting.recent(job, 4.0) for job in "abcde"] == [False, False, True, True, True]


def test_a_refresh_of_zero_answers_nothing_from_memory():
    waiting = WaitingJobs(refresh=0.0)
    waiting.note("a", 1.0)
    assert not waiting.recent("a", 1.0) and len(waiting) == 0
