"""Warnings about bad data: each distinct problem once, at most `limit` per window, and a
count of the rest when the window ends."""

from __future__ import annotations

import asyncio
import logging

import pytest

from session_sidecar.problems import Problems


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="test.problems")
    return caplog


def make(clock: Clock, limit: int = 20, window_s: float = 60, remembered: int = 1000) -> Problems:
    logger = logging.getLogger("test.problems")
    return Problems(logger, limit=limit, window_s=window_s, remembered=remembered, clock=clock)


def test_a_problem_met_again_is_not_logged_again(log: pytest.LogCaptureFixture) -> None:
    problems = make(Clock())
    for _ in range(3):
        problems.warn(("key", b"\xff"), "key %r", b"\xff")
    assert log.messages == ["key b'\\xff'"]


def test_distinct_problems_past_the_limit_are_counted_then_reported(log: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    problems = make(clock, limit=3, window_s=60)
    for i in range(10_000):
        problems.warn(("key", i), "junk key %d", i)
    assert log.messages == ["junk key 0", "junk key 1", "junk key 2"]
    assert problems.unlogged == 9_997
    clock.now += 60  # the window is over: the next problem reports the count first
    problems.warn(("key", "next"), "junk key %s", "next")
    assert log.messages[3:] == [
        "9997 more problems with data in Redis were not logged (at most 3 per 60 s), the first: junk key 3",
        "junk key next",
    ]


def test_memory_of_problems_is_bounded(log: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    problems = make(clock, limit=100, window_s=1, remembered=2)
    for key in ("a", "b", "c"):
        problems.warn(key, key)
    clock.now += 1
    problems.warn("a", "a")  # forgotten (only the last 2 are remembered): logged again
    problems.warn("c", "c")  # remembered
    assert log.messages == ["a", "b", "c", "a"]


async def test_the_count_is_logged_when_the_window_ends_without_more_problems(
    log: pytest.LogCaptureFixture,
) -> None:
    problems = Problems(logging.getLogger("test.problems"), limit=1, window_s=0.05)
    problems.warn(1, "first")
    problems.warn(2, "second")
    await asyncio.sleep(0.2)
    assert log.messages == [
        "first",
        "1 more problems with data in Redis were not logged (at most 1 per 0.05 s), the first: second",
    ]
