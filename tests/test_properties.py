"""Properties over any input, against the service under uvicorn on its own Redis:

* any conversation id string is a 400 or the right answer, never another
  conversation's (or another user's) run;
* hostile Redis contents (keys of the wrong type, binary junk keys under both
  prefixes, 10 MB values, a stream of 1,000,000 entries, a conversation with 5,000
  runs) leave the right answer, bounded latency and flat memory; the conversation
  with 5,000 runs answers too, after a few 503s while its runs are first read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import psutil
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from session_sidecar import problems
from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.settings import DEFAULT_CONVERSATION_ID_PATTERN, Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import TEST_SECRET, auth
from tests.live_server import serve_in_thread

BUDGET_MS = 500
MARGIN_S = 1.0  # 2 shared cores
ANSWERABLE_S = 15.0  # the 5,000-run conversation answers steadily within this of the first question
PATTERN = re.compile(DEFAULT_CONVERSATION_ID_PATTERN)
ENDPOINTS = ("active-session", "task-status")
# Near neighbours: prefixes of each other, case and separator variants, the longest id.
KNOWN = ["conv-1", "conv-10", "conv-1.x", "Conv-1", "conv_1", "c", "a.b", "-", "x" * 128]
HOSTILE = ("junk", "huge", "long", "crowd")
WORKING = {b"queued", b"pending", b"running"}


@dataclass(frozen=True)
class World:
    base_url: str
    redis_url: str
    runs: dict[str, str]  # conversation -> the run alice must be shown


async def _seed(url: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(url)
    sim = BackendSimulator(client)
    runs = {}
    for i, conv in enumerate([*KNOWN, *HOSTILE]):
        # Bob's run is newer and working: shown to alice, it would be a leak.
        await sim.full_run(conv, "alice", f"{i:03d}z", status=None if i % 2 else "completed")
        runs[conv] = f"conversation:alice:{i:03d}z"
        await sim.full_run(conv, "bob", f"{i:03d}b", status=None)
    for conv in HOSTILE:  # a working run, the one every hostile neighbour must not hide
        runs[conv] = await sim.full_run(conv, "alice", f"live-{conv}", status=None)
    await client.aclose()
    return runs


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with EmbeddedRedis() as server:
        runs = asyncio.run(_seed(server.url))
        settings = Settings(
            redis_url=server.url,
            jwt_secret=TEST_SECRET,
            access_policy="run-owner",
            redis_timeout_ms=BUDGET_MS,
        )
        settings.validate()
        with serve_in_thread(settings) as (base_url, _):
            yield World(base_url, server.url, runs)


@pytest.fixture(scope="module")
def http(world: World) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=world.base_url, headers=auth("alice"), timeout=10) as client:
        yield client


def get(http: httpx.Client, conversation: str, endpoint: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = http.get(f"/api/v1/conversations/{quote(conversation, safe='')}/{endpoint}")
    return response, time.monotonic() - started


def assert_right(world: World, conversation: str, response: httpx.Response) -> None:
    assert response.status_code == 200, (conversation, response.text)
    body = response.json()
    assert body["conversationId"] == conversation and body["sessionId"] == world.runs[conversation]


ids = st.one_of(
    st.sampled_from(KNOWN),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=140),
    st.from_regex(r"[A-Za-z0-9._-]{1,130}", fullmatch=True),
    # A known id with glob characters, a colon, a slash or an escape appended.
    st.builds(str.__add__, st.sampled_from(KNOWN), st.text(":*?[]\\/%.-_", min_size=1, max_size=3)),
)


@given(conversation=ids, endpoint=st.sampled_from(ENDPOINTS))
@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_conversation_id_is_400_or_its_own_answer(
    world: World, http: httpx.Client, conversation: str, endpoint: str
) -> None:
    response, _ = get(http, conversation, endpoint)
    others = [run for conv, run in world.runs.items() if conv != conversation]
    assert not any(run in response.text for run in others), response.text
    assert "conversation:bob:" not in response.text
    if conversation in world.runs:
        assert_right(world, conversation, response)
    elif conversation in ("", ".", "..") or "/" in conversation:
        # Never reaches the route (an empty or dot segment, or a second one): the router's flat 404.
        assert response.status_code == 404 and "sessionId" not in response.json()
    elif ":" in conversation or not PATTERN.fullmatch(conversation):
        assert response.status_code == 400, response.text
    else:
        assert response.status_code == 404, response.text


def _junk_key(target: bytes) -> st.SearchStrategy[bytes]:
    binary = st.binary(max_size=24)
    # Run ids alice may see (UTF-8, no colon after her prefix), so their keys are read.
    hers = st.text(st.characters(exclude_characters=":", exclude_categories=["Cs"]), min_size=1, max_size=12)
    run = st.one_of(binary, hers.map(lambda t: b"conversation:alice:" + t.encode()))
    prefixes = st.sampled_from([b"chat:stream:", b"task:status:"])
    return st.one_of(
        st.builds(bytes.__add__, prefixes, binary),
        st.builds(lambda p, r: p + target + b":" + r, prefixes, run),
    )


_fields = st.dictionaries(st.binary(min_size=1, max_size=8), st.binary(max_size=16), min_size=1, max_size=3)
_members = st.lists(st.binary(max_size=16), min_size=1, max_size=3)
_values = st.one_of(
    st.tuples(st.just("string"), st.binary(max_size=64).filter(lambda v: v not in WORKING)),
    st.tuples(st.sampled_from(["hash", "stream"]), _fields),
    st.tuples(st.sampled_from(["list", "set", "zset"]), _members),
)


def _write(client: redis.Redis, key: bytes, kind: str, value: object) -> None:
    """One junk key; a key written twice with two types keeps the first (WRONGTYPE ignored)."""
    try:
        if kind == "string":
            client.set(key, value)  # type: ignore[arg-type]
        elif kind == "hash":
            client.hset(key, mapping=value)  # type: ignore[arg-type]
        elif kind == "stream":
            # An entry from 1970: silent for decades, so never a working run.
            client.xadd(key, value, id="1-*")  # type: ignore[arg-type]
        elif kind == "list":
            client.rpush(key, *value)  # type: ignore[misc]
        elif kind == "set":
            client.sadd(key, *value)  # type: ignore[misc]
        else:
            client.zadd(key, {member: 1 for member in value})  # type: ignore[attr-defined]
    except redis.ResponseError:
        pass


@given(junk=st.lists(st.tuples(_junk_key(b"junk"), _values), min_size=1, max_size=8))
@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_junk_keys_never_hide_the_right_answer(
    world: World, http: httpx.Client, junk: list[tuple[bytes, tuple[str, object]]]
) -> None:
    client = redis.Redis.from_url(world.redis_url)
    try:
        for key, (kind, value) in junk:
            _write(client, key, kind, value)
        for endpoint in ENDPOINTS:
            response, elapsed = get(http, "junk", endpoint)
            assert_right(world, "junk", response)
            assert elapsed < BUDGET_MS / 1000 + MARGIN_S
    finally:
        client.delete(*{key for key, _ in junk})
        client.close()


def _fill_hostile(url: str) -> None:
    """10 MB values, a 1,000,000-entry stream, 5,000 runs, 10,000 binary junk keys."""
    client = redis.Redis.from_url(url)
    ten_mb = os.urandom(10 * 2**20)
    huge = "chat:stream:huge:conversation:alice:"
    client.xadd(huge + "big-entry", {"type": "start", "content": ten_mb}, id="1000-1")
    client.set("task:status:huge:conversation:alice:big-status", ten_mb)
    client.set("chat:stream:huge:conversation:alice:big-string", ten_mb)  # a 10 MB wrong type
    long = "chat:stream:long:conversation:alice:million"
    client.xadd(long, {"type": "start"}, id="1000-1")
    for _ in range(10):  # 100,000 per script, so Redis never blocks for long
        client.eval(
            "for i=1,100000 do redis.call('XADD', KEYS[1], '*', 'type', 'chunk', 'content', 'x') end",
            1,
            long,
        )
    client.xadd(long, {"type": "end"})  # ended: the live run is the one to show
    pipe = client.pipeline(transaction=False)
    for i in range(5000):
        stream = f"chat:stream:crowd:conversation:alice:r{i}"
        pipe.xadd(stream, {"type": "start"}, id=f"{1000 + i}-1")
        pipe.xadd(stream, {"type": "end"}, id=f"{1000 + i}-2")
        pipe.set(f"task:status:crowd:conversation:alice:r{i}", "completed")
    for i in range(5000):
        pipe.set(b"chat:stream:" + os.urandom(16) + b"%d" % i, b"x")
        pipe.set(b"task:status:junk:" + os.urandom(16) + b"%d" % i, os.urandom(8))
    pipe.execute()
    assert client.xlen(long) == 1_000_002
    client.close()


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1


@contextlib.contextmanager
def _slowest_health(base_url: str) -> Iterator[list[float]]:
    """`/healthz` asked every 10 ms meanwhile: it never touches Redis, so its slowest answer
    is the longest the service's event loop was held (in this process, the fill's own GIL
    share included)."""
    seen: list[float] = []
    done = threading.Event()

    def ask() -> None:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            while not done.is_set():
                started = time.monotonic()
                client.get("/healthz")
                seen.append(time.monotonic() - started)
                done.wait(0.01)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def hostile(world: World, http: httpx.Client) -> float:
    """Fills once; returns how long the service took to answer steadily again."""
    # The fill is a burst of ~30,000 key events, 10,000 of them of undecodable keys, for the
    # live index to digest: answers may be slow or 503 until it has, but the event loop keeps
    # turning, and the warnings about the junk are bounded (problems.LIMIT a minute + a count).
    counter = _Counter()
    store_log = logging.getLogger("session_sidecar.store")
    store_log.addHandler(counter)
    try:
        with _slowest_health(world.base_url) as health:
            _fill_hostile(world.redis_url)
            filled = time.monotonic()
            _settle(http, world.redis_url, filled + 15)
    finally:
        store_log.removeHandler(counter)
    settled = time.monotonic() - filled
    print(
        f"hostile fill: /healthz slowest {max(health) * 1000:.0f} ms over {len(health)} answers; "
        f"{counter.records} warnings logged; answering steadily {settled:.1f} s after the fill"
    )
    assert max(health) < BUDGET_MS / 1000 + MARGIN_S
    # Two windows at most: the fill may straddle the end of one.
    assert counter.records <= 2 * (problems.LIMIT + 1)
    return settled


def _settle(http: httpx.Client, redis_url: str, deadline: float) -> None:
    """Five quick right answers in a row, from the live index, with no key event left to
    digest. The fill's million `XADD` events can overflow the index subscriber's output
    buffer: Redis drops it, and until the index has re-seeded every request SCANs, which
    with the `huge` conversation's 30 MB read may exceed the budget (a 503, as it should
    be). When they do not overflow it, the index digests them for a second or two after
    answering again, and meanwhile answers are slow (the first `huge` reads went over the
    budget 5 times in a row: 1 run in about 30). Steady means both are over."""
    in_a_row = 0
    with redis.Redis.from_url(redis_url) as client:
        while in_a_row < 5:
            assert time.monotonic() < deadline, "no steady right answers"
            response, elapsed = get(http, "junk", "task-status")
            steady = response.status_code == 200 and elapsed < STEADY_S
            in_a_row = in_a_row + 1 if steady and _index_in_sync(http) and _events_sent(client) else 0
            time.sleep(0.05)


# A `junk` answer takes 3-5 ms here once the service is idle, 60-95 ms while the index
# still digests the fill's events.
STEADY_S = 0.03


def _index_in_sync(http: httpx.Client) -> bool:
    return "\nsidecar_index_enabled 1.0\n" in http.get("/metrics").text


def _events_sent(client: redis.Redis) -> bool:
    """Redis holds no key event for a subscriber any more (each one's output buffer empty)."""
    subscribers: list[dict[str, str]] = client.client_list(_type="pubsub")
    return all(int(subscriber["omem"]) == 0 for subscriber in subscribers)


def test_hostile_contents_keep_answers_right_latency_bounded_memory_flat(
    world: World, http: httpx.Client, hostile: float
) -> None:
    conversations = ("junk", "huge", "long")

    def round_trip() -> float:
        slowest = 0.0
        for conversation in conversations:
            for endpoint in ENDPOINTS:
                response, elapsed = get(http, conversation, endpoint)
                assert_right(world, conversation, response)
                slowest = max(slowest, elapsed)
        return slowest

    # Warm: caches, the index's memory of ended runs, the duration samples. The first `huge`
    # read after a fill that dropped the index's subscriber took 1.0-1.2 s on a 2-core CI
    # machine (the next ones 110-170 ms): 503s are allowed here, a few, never another answer;
    # every answer of the measured rounds below must be right.
    for _ in range(3):
        for conversation in conversations:
            for endpoint in ENDPOINTS:
                for _ in range(5):
                    response, _ = get(http, conversation, endpoint)
                    if response.status_code != 503:
                        break
                assert_right(world, conversation, response)
    # The Python heap, counted after a full collection: RSS would mostly show when the
    # allocator returns the 30 MB each `huge` answer reads, and when the cyclic collector runs.
    gc.collect()
    tracemalloc.start()
    try:
        rounds = 8
        slowest = max(round_trip() for _ in range(rounds))
        gc.collect()
        growth, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # No reference cycle keeps a reply alive: with the cyclic collector off, the ~30 MB that
    # each `huge` answer reads (a WRONGTYPE error among the replies) are freed all the same.
    gc.disable()
    tracemalloc.start()
    try:
        for endpoint in ENDPOINTS:
            assert_right(world, "huge", get(http, "huge", endpoint)[0])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    print(
        f"hostile contents: answering steadily {hostile:.1f} s after the fill; {rounds * 6} answers, "
        f"slowest {slowest * 1000:.0f} ms; Python heap growth {growth / 2**20:.2f} MiB "
        f"(peak {peak / 2**20:.0f} MiB); without the cyclic collector, 2 `huge` answers left "
        f"{held / 2**20:.2f} MiB"
    )
    assert slowest < BUDGET_MS / 1000 + MARGIN_S
    assert growth < 4 * 2**20, f"the heap grew {growth / 2**20:.1f} MiB over {rounds * 6} answers"
    assert held < 4 * 2**20, f"replies held in reference cycles: {held / 2**20:.1f} MiB"


def test_five_thousand_runs_answer_within_budget(world: World, http: httpx.Client, hostile: float) -> None:
    """Reading 5,000 runs' facts (25,000 pipelined commands) cold may not fit the budget: then
    a 503 at the deadline, never another answer, and the conversations beside it still answer.
    The read goes on after the 503 and leaves the ended runs' facts in the index, so the
    conversation soon answers, and then steadily."""
    process = psutil.Process()
    rss_before = process.memory_info().rss
    answers: list[tuple[int, float]] = []
    asked = time.monotonic()
    first_right: float | None = None
    right_in_a_row = 0
    while right_in_a_row < 5:
        assert time.monotonic() < asked + ANSWERABLE_S, f"no steady right answers: {answers}"
        for endpoint in ENDPOINTS:
            response, elapsed = get(http, "crowd", endpoint)
            answers.append((response.status_code, elapsed))
            if response.status_code == 503:
                assert response.json()["error"] == "Session store too slow"
                right_in_a_row = 0
            else:
                assert_right(world, "crowd", response)
                first_right = first_right or time.monotonic() - asked
                right_in_a_row += 1
            assert elapsed < BUDGET_MS / 1000 + MARGIN_S
            beside, elapsed = get(http, "junk", endpoint)
            assert beside.status_code == 503 or beside.json()["sessionId"] == world.runs["junk"]
            assert elapsed < BUDGET_MS / 1000 + MARGIN_S
    _settle(http, world.redis_url, time.monotonic() + 10)
    # Small replies only here, so RSS is a fair measure (a generous bound on 2 noisy cores).
    growth = process.memory_info().rss - rss_before
    assert first_right is not None
    shown = ", ".join(f"{status} in {seconds * 1000:.0f} ms" for status, seconds in answers)
    print(
        f"5,000 runs: {shown}; first right answer {first_right * 1000:.0f} ms after the first "
        f"question; RSS growth {growth / 2**20:.1f} MiB"
    )
    assert growth < 64 * 2**20
