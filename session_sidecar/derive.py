"""SPEC section 3 as pure functions: a run's raw facts in, its state and timestamps out.

No I/O here. `now_ms` is passed in, and the clock is only used where Redis holds
no real timestamp (a queued run with no stream yet is dated from its status
key's remaining TTL).
"""

from __future__ import annotations

import enum
import statistics
from collections import OrderedDict, deque
from collections.abc import Iterable

import msgspec

WORKING_STATUSES = frozenset({"queued", "pending", "running"})
FINISHED_STATUSES = frozenset({"completed", "error", "cancelled"})
KNOWN_STATUSES = WORKING_STATUSES | FINISHED_STATUSES
# Entry types that open a run: a stream whose first retained entry is one of
# these was not trimmed, so first-to-end is the run's real duration.
OPENING_TYPES = frozenset({"queued", "start"})


class RunState(enum.Enum):
    WORKING = "active"
    FINISHED = "completed"
    IDLE = "idle"


class RunFacts(msgspec.Struct, frozen=True):
    """What Redis holds about one run, read in one round trip."""

    run_id: str
    first_entry_id: str | None = None  # None: no stream, or an empty one
    first_entry_type: str | None = None
    last_entry_id: str | None = None
    last_entry_type: str | None = None
    status: str | None = None  # None: the status key is absent (expired)
    status_pttl_ms: int | None = None  # remaining TTL (>= 0); None when absent or persistent
    stream_length: int = 0  # with the last entry id: whether an ended run's stream changed (ended.py)


class RunView(msgspec.Struct, frozen=True):
    run_id: str
    state: RunState
    cursor: str
    started_at: int
    last_activity: int
    # When the run really ended (ms of its end entry, or its last one); None unless finished.
    finished_at: int | None


class Rules(msgspec.Struct, frozen=True):
    stale_after_ms: int = 600_000
    status_ttl_ms: int = 600_000
    # `cursor` is the first retained entry instead of the last (SIDECAR_ACTIVE_CURSOR=first):
    # the frontend's resume then replays the whole answer after a reload.
    cursor_first: bool = False


def entry_ms(entry_id: str) -> int:
    """The unix-ms part of a stream entry id `{ms}-{seq}`."""
    return int(entry_id.partition("-")[0])


def derive_run(facts: RunFacts, now_ms: int, rules: Rules) -> RunView | None:
    """The state of one run, or None when neither its stream nor its status exists."""
    if facts.first_entry_id is not None and facts.last_entry_id is not None:
        started_at = entry_ms(facts.first_entry_id)
        last_activity = entry_ms(facts.last_entry_id)
        cursor = facts.first_entry_id if rules.cursor_first else facts.last_entry_id
    elif facts.status is None:
        return None
    else:
        # No stream yet (a queued run): the status was set `status_ttl - PTTL` ago.
        if facts.status_pttl_ms is not None:
            started_at = now_ms - max(0, rules.status_ttl_ms - facts.status_pttl_ms)
        else:
            started_at = now_ms  # a status key with no TTL carries no date at all
        last_activity = started_at
        cursor = "0-0"

    ended = facts.last_entry_type == "end"
    finished = ended or facts.status in FINISHED_STATUSES
    if finished:
        # A stream's last entry is when the run really stopped writing.
        return RunView(facts.run_id, RunState.FINISHED, cursor, started_at, last_activity, last_activity)

    fresh = now_ms - last_activity <= rules.stale_after_ms
    # A status key expires after its TTL while a long run's stream keeps growing. (Without
    # a status the run has entries: a run with neither was None above.)
    stream_alone = facts.status is None
    working = (facts.status in WORKING_STATUSES or stream_alone) and fresh
    state = RunState.WORKING if working else RunState.IDLE
    return RunView(facts.run_id, state, cursor, started_at, last_activity, None)


def choose_run(views: Iterable[RunView]) -> RunView | None:
    """The working run with the latest activity; if none works, the latest run overall."""
    best: RunView | None = None
    for view in views:
        if best is None or _rank(view) > _rank(best):
            best = view
    return best


def _rank(view: RunView) -> tuple[bool, int, int, str]:
    # The run id only breaks exact ties, so the answer is deterministic.
    return (view.state is RunState.WORKING, view.last_activity, view.started_at, view.run_id)


def estimated_completion(view: RunView, now_ms: int, typical_duration_ms: int) -> int:
    if view.state is RunState.FINISHED:
        assert view.finished_at is not None
        return view.finished_at
    if view.state is RunState.WORKING:
        return max(view.started_at + typical_duration_ms, now_ms + 1000)
    return view.last_activity


def observed_duration_ms(facts: RunFacts) -> int | None:
    """First entry to `end` entry, only when the stream still holds the run's opening entry."""
    if (
        facts.last_entry_type == "end"
        and facts.first_entry_type in OPENING_TYPES
        and facts.first_entry_id is not None
        and facts.last_entry_id is not None
    ):
        return max(0, entry_ms(facts.last_entry_id) - entry_ms(facts.first_entry_id))
    return None


class DurationTracker:
    """Median duration of the last `keep` finished runs observed, each run counted once."""

    def __init__(self, default_ms: int, *, keep: int = 100, min_samples: int = 5):
        self._default_ms = default_ms
        self._min_samples = min_samples
        self._durations: deque[int] = deque(maxlen=keep)
        # Bounded memory of which runs were already counted (a run is polled many times).
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._seen_max = keep * 10
        # Every lookup asks for the median, and a new sample is rare: it is kept until one comes.
        self._median: int | None = None

    def observe(self, conversation_id: str, facts: RunFacts) -> None:
        # Every lookup observes every run it read, mostly runs already counted: that check first.
        key = (conversation_id, facts.run_id)
        if key in self._seen:
            return
        duration = observed_duration_ms(facts)
        if duration is None:
            return
        self._seen[key] = None
        if len(self._seen) > self._seen_max:
            self._seen.popitem(last=False)
        self._durations.append(duration)
        self._median = None

    def typical_ms(self) -> int:
        if len(self._durations) < self._min_samples:
            return self._default_ms
        if self._median is None:
            self._median = int(statistics.median(self._durations))
        return self._median
