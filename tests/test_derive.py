"""SPEC section 3, table-driven, with no server: derivation is pure."""

from __future__ import annotations

from typing import Any

import pytest

from session_sidecar.derive import (
    DurationTracker,
    Rules,
    RunFacts,
    RunState,
    RunView,
    choose_run,
    derive_run,
    entry_ms,
    estimated_completion,
)

NOW = 1_704_124_000_000
RULES = Rules(stale_after_ms=600_000, status_ttl_ms=600_000)
MIN = 60_000


def stream(
    first_ms: int, last_ms: int, last_type: str = "chunk", first_type: str = "start"
) -> dict[str, Any]:
    return {
        "first_entry_id": f"{first_ms}-0",
        "first_entry_type": first_type,
        "last_entry_id": f"{last_ms}-3",
        "last_entry_type": last_type,
    }


CASES: list[tuple[str, dict[str, Any], RunState]] = [
    (
        "running status, fresh stream",
        {**stream(NOW - MIN, NOW - 1000), "status": "running"},
        RunState.WORKING,
    ),
    ("queued status, no stream yet", {"status": "queued", "status_pttl_ms": 590_000}, RunState.WORKING),
    (
        "pending status (old backend)",
        {**stream(NOW - MIN, NOW - 1000), "status": "pending"},
        RunState.WORKING,
    ),
    (
        "end entry wins over stale running",
        {**stream(NOW - MIN, NOW - 500, "end"), "status": "running"},
        RunState.FINISHED,
    ),
    ("completed status", {**stream(NOW - MIN, NOW - 500), "status": "completed"}, RunState.FINISHED),
    ("error status", {**stream(NOW - MIN, NOW - 500), "status": "error"}, RunState.FINISHED),
    ("cancelled status", {**stream(NOW - MIN, NOW - 500), "status": "cancelled"}, RunState.FINISHED),
    ("expired status, live stream", stream(NOW - 20 * MIN, NOW - 2000), RunState.WORKING),
    ("expired status, stale stream", stream(NOW - 30 * MIN, NOW - 11 * MIN), RunState.IDLE),
    (
        "running but worker gone (stale)",
        {**stream(NOW - 30 * MIN, NOW - 11 * MIN), "status": "running"},
        RunState.IDLE,
    ),
    (
        "exactly at the stale window",
        {**stream(NOW - 20 * MIN, NOW - 10 * MIN), "status": "running"},
        RunState.WORKING,
    ),
    ("unknown status", {**stream(NOW - MIN, NOW - 1000), "status": "thinking"}, RunState.IDLE),
    (
        "unknown last event type",
        {**stream(NOW - MIN, NOW - 1000, "heartbeat"), "status": "running"},
        RunState.WORKING,
    ),
    ("completed status, no stream", {"status": "completed", "status_pttl_ms": 300_000}, RunState.FINISHED),
]


@pytest.mark.parametrize(("name", "fields", "state"), CASES, ids=[c[0] for c in CASES])
def test_state(name: str, fields: dict[str, Any], state: RunState) -> None:
    view = derive_run(RunFacts(run_id="conversation:u:m", **fields), NOW, RULES)
    assert view is not None
    assert view.state is state


def test_no_stream_no_status_is_no_run() -> None:
    assert derive_run(RunFacts(run_id="r"), NOW, RULES) is None


def test_timestamps_come_from_entry_ids_not_the_clock() -> None:
    view = derive_run(
        RunFacts(run_id="r", status="running", **stream(1_704_123_456_789, 1_704_123_500_000)), NOW, RULES
    )
    assert view is not None
    assert (view.started_at, view.last_activity) == (1_704_123_456_789, 1_704_123_500_000)
    assert view.cursor == "1704123500000-3"


def test_queued_run_dated_from_pttl() -> None:
    # Status set with EX 600 and 590 s left: it was set 10 s ago.
    view = derive_run(RunFacts(run_id="r", status="queued", status_pttl_ms=590_000), NOW, RULES)
    assert view is not None
    assert view.started_at == NOW - 10_000
    assert view.last_activity == view.started_at
    assert view.cursor == "0-0"


def test_status_ttl_setting_is_used_for_queued_runs() -> None:
    rules = Rules(stale_after_ms=600_000, status_ttl_ms=300_000)
    view = derive_run(RunFacts(run_id="r", status="queued", status_pttl_ms=290_000), NOW, rules)
    assert view is not None and view.started_at == NOW - 10_000


def test_entry_ms() -> None:
    assert entry_ms("1704123500000-0") == 1704123500000
    assert entry_ms("1704123500000-17") == 1704123500000


def view(run_id: str, state: RunState, last: int, started: int = 0) -> RunView:
    return RunView(run_id, state, f"{last}-0", started, last, last if state is RunState.FINISHED else None)


def test_working_run_preferred_over_later_finished_run() -> None:
    chosen = choose_run([view("a", RunState.FINISHED, NOW), view("b", RunState.WORKING, NOW - MIN)])
    assert chosen is not None and chosen.run_id == "b"


def test_latest_activity_wins_among_working_runs() -> None:
    runs = [view("z-old", RunState.WORKING, NOW - MIN), view("a-new", RunState.WORKING, NOW - 1)]
    chosen = choose_run(runs)
    assert chosen is not None and chosen.run_id == "a-new"  # not lexicographic: "z" > "a"


def test_latest_activity_wins_when_none_working() -> None:
    runs = [
        view("conversation:u:m-9", RunState.IDLE, NOW - MIN),
        view("conversation:u:m-10", RunState.FINISHED, NOW),
    ]
    chosen = choose_run(runs)
    assert chosen is not None and chosen.run_id == "conversation:u:m-10"


def test_choose_nothing_from_nothing() -> None:
    assert choose_run([]) is None


def test_estimated_completion_finished_is_real_end() -> None:
    finished = view("r", RunState.FINISHED, NOW - 5 * MIN)
    assert estimated_completion(finished, NOW, 60_000) == NOW - 5 * MIN


def test_estimated_completion_idle_is_last_activity() -> None:
    assert estimated_completion(view("r", RunState.IDLE, NOW - 20 * MIN), NOW, 60_000) == NOW - 20 * MIN


def test_estimated_completion_working_is_start_plus_typical_but_not_past() -> None:
    young = view("r", RunState.WORKING, NOW, started=NOW - 10_000)
    assert estimated_completion(young, NOW, 60_000) == NOW - 10_000 + 60_000
    old = view("r", RunState.WORKING, NOW, started=NOW - 10 * MIN)
    assert estimated_completion(old, NOW, 60_000) == NOW + 1000


def finished_facts(run_id: str, duration_ms: int, first_type: str = "queued") -> RunFacts:
    return RunFacts(run_id=run_id, status="completed", **stream(NOW - duration_ms, NOW, "end", first_type))


def test_duration_tracker_default_until_five_samples() -> None:
    tracker = DurationTracker(60_000)
    for i, d in enumerate((10_000, 20_000, 30_000, 40_000)):
        tracker.observe("c", finished_facts(f"r{i}", d))
    assert tracker.typical_ms() == 60_000
    tracker.observe("c", finished_facts("r4", 50_000))
    assert tracker.typical_ms() == 30_000


def test_duration_tracker_counts_each_run_once() -> None:
    tracker = DurationTracker(60_000)
    for _ in range(10):
        tracker.observe("c", finished_facts("same", 1000))
    assert tracker.typical_ms() == 60_000  # one sample, not ten: still the default
    for i in range(4):
        tracker.observe("c", finished_facts(f"long{i}", 100_000))
    assert tracker.typical_ms() == 100_000  # the median of 1 s and four times 100 s


def test_duration_tracker_keeps_last_hundred() -> None:
    tracker = DurationTracker(60_000)
    for i in range(100):
        tracker.observe("c", finished_facts(f"slow{i}", 100_000))
    assert tracker.typical_ms() == 100_000
    for i in range(100):
        tracker.observe("c", finished_facts(f"fast{i}", 5_000))
    assert tracker.typical_ms() == 5_000  # all 200 kept would make it 52.5 s


def test_duration_tracker_ignores_trimmed_and_unfinished_runs() -> None:
    tracker = DurationTracker(60_000)
    tracker.observe("c", finished_facts("trimmed", 1000, first_type="chunk"))
    tracker.observe("c", RunFacts(run_id="open", status="running", **stream(NOW - 1000, NOW)))
    for i in range(4):
        tracker.observe("c", finished_facts(f"r{i}", 10_000))
    assert tracker.typical_ms() == 60_000  # four samples: the two above were not counted
    tracker.observe("c", finished_facts("r4", 10_000))
    assert tracker.typical_ms() == 10_000
