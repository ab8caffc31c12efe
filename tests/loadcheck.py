"""The world a fault test asks about, steady load on both endpoints with every answer
recorded, and the verdict on a fault window.

An answer is *right* when it equals the fault-free answer of the same question
(status and every field that does not move with the clock), *unavailable* when
it is a 503 with `Retry-After`, and *wrong* otherwise: a 404 or another run
caused by a fault is wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from session_sidecar.simulator import BackendSimulator
from tests.conftest import Api

ENDPOINTS = ("active-session", "task-status")
# Fields that do not move with the clock (`estimatedCompletion` of a working run does).
STABLE_FIELDS = {
    "active-session": ("sessionId", "status", "cursor", "conversationId", "startedAt", "lastActivity"),
    "task-status": ("isActive", "sessionId", "conversationId"),
}

Question = tuple[str, str]  # (conversation id, endpoint)
Fingerprint = tuple[int, tuple[Any, ...]]


def fingerprint(endpoint: str, status: int, body: dict[str, Any]) -> Fingerprint:
    if status != 200:
        return status, (body.get("conversationId"),)
    return status, tuple(body.get(name) for name in STABLE_FIELDS[endpoint])


@dataclass(frozen=True)
class Answer:
    question: Question
    started: float
    ended: float
    status: int
    fingerprint: Fingerprint
    retry_after: str | None

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


async def ask(api: Api, question: Question) -> Answer:
    conversation, endpoint = question
    started = time.monotonic()
    response = await api.get(conversation, endpoint)
    ended = time.monotonic()
    return Answer(
        question,
        started,
        ended,
        response.status_code,
        fingerprint(endpoint, response.status_code, response.json()),
        response.headers.get("retry-after"),
    )


async def expected_answers(api: Api, conversations: list[str]) -> dict[Question, Fingerprint]:
    """The fault-free answer of every question, asked once."""
    questions = [(c, e) for c in conversations for e in ENDPOINTS]
    return {q: (await ask(api, q)).fingerprint for q in questions}


@dataclass
class Load:
    """`clients` concurrent callers cycling through every question, each pausing `pause_s`."""

    api: Api
    expected: dict[Question, Fingerprint]
    clients: int = 4
    pause_s: float = 0.005
    answers: list[Answer] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, offset: int) -> None:
        questions = sorted(self.expected)
        i = offset
        while not self._stop.is_set():
            self.answers.append(await ask(self.api, questions[i % len(questions)]))
            i += self.clients
            await asyncio.sleep(self.pause_s)

    def verdict(self, answer: Answer) -> str:
        if answer.fingerprint == self.expected[answer.question]:
            return "right"
        if answer.status == 503 and answer.retry_after == "1":
            return "unavailable"
        return "wrong"

    def needs_redis(self, answer: Answer) -> bool:
        """A question with runs: its answer reads Redis (a run-less one may come from the index)."""
        return self.expected[answer.question][0] == 200


@dataclass
class Window:
    """What the load saw around one fault, `on` to `off` (monotonic seconds)."""

    answers: int
    before: Counter[int]  # status -> count, answers that ended before the fault
    during: Counter[int]  # started before the fault ended, ended after it began
    after: Counter[int]
    wrong: list[Answer]
    not_right_outside: list[Answer]  # ended before the fault, or started `settle_s` after it
    right_while_faulty: int  # answers that read Redis and still came back right mid-fault
    slowest_s: float
    first_right_after_s: float | None  # fault end -> first right answer that read Redis
    last_unavailable_after_s: float  # fault end -> end of the last 503 (0 if none after it)

    def summary(self, name: str) -> str:
        first = "never" if self.first_right_after_s is None else f"{self.first_right_after_s * 1000:.0f} ms"
        return (
            f"{name}: {self.answers} answers; before {dict(self.before)}, during {dict(self.during)}, "
            f"after {dict(self.after)}; slowest {self.slowest_s * 1000:.0f} ms; first right answer "
            f"{first} after the fault; last 503 {self.last_unavailable_after_s * 1000:.0f} ms after it"
        )


def judge(load: Load, on: float, off: float, settle_s: float) -> Window:
    before: Counter[int] = Counter()
    during: Counter[int] = Counter()
    after: Counter[int] = Counter()
    wrong, outside = [], []
    right_while_faulty = 0
    first_right: float | None = None
    last_unavailable = 0.0
    for answer in load.answers:
        verdict = load.verdict(answer)
        if verdict == "wrong":
            wrong.append(answer)
        if answer.ended < on:
            before[answer.status] += 1
            if verdict != "right":
                outside.append(answer)
        elif answer.started < off:
            during[answer.status] += 1
            if verdict == "right" and load.needs_redis(answer) and answer.started > on and answer.ended < off:
                right_while_faulty += 1
        else:
            after[answer.status] += 1
            if verdict == "right" and load.needs_redis(answer):
                first_right = min(first_right or answer.ended, answer.ended)
            if answer.started > off + settle_s and verdict != "right":
                outside.append(answer)
        if verdict == "unavailable" and answer.ended > off:
            last_unavailable = max(last_unavailable, answer.ended - off)
    return Window(
        answers=len(load.answers),
        before=before,
        during=during,
        after=after,
        wrong=wrong,
        not_right_outside=outside,
        right_while_faulty=right_while_faulty,
        slowest_s=max(a.elapsed for a in load.answers),
        first_right_after_s=None if first_right is None else first_right - off,
        last_unavailable_after_s=last_unavailable,
    )


async def seed_world(url: str) -> tuple[list[str], dict[str, str]]:
    """Conversations with a live run, with finished runs only, with another user's runs
    only, and with none. Returns them and the run alice must be shown for each."""
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    sim = BackendSimulator(client)
    past = int(time.time() * 1000) - 120_000
    shown: dict[str, str] = {}
    for i in range(3):
        conv = f"live-{i}"
        await sim.full_run(conv, "alice", f"old{i}", start_ms=past)
        await sim.full_run(conv, "bob", f"b{i}", status=None)
        shown[conv] = await sim.full_run(conv, "alice", f"now{i}", status=None)
    for i in range(3):
        conv = f"done-{i}"
        await sim.full_run(conv, "alice", f"a{i}", start_ms=past, status="cancelled")
        shown[conv] = await sim.full_run(conv, "alice", f"b{i}", start_ms=past + 5_000)
    await sim.full_run("bobs", "bob", "m", status=None)
    await client.aclose()
    return [*shown, "bobs", "empty"], shown
