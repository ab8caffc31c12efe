"""What a watch compares and what a watch request asks for (SPEC 8.3). Pure: no I/O.

A version is a digest of the facts a client reacts to, and of nothing that moves
with every chunk or every second: task-status `sessionId` and `isActive`,
active-session `sessionId` and `status`. It depends on the Redis state alone, so
every replica computes the same version for the same state.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Literal

import msgspec

from session_sidecar.errors import BadRequest
from session_sidecar.sessions import Lookup

Endpoint = Literal["active-session", "task-status"]

# A non-negative decimal number: `5`, `2.5`, `.5`, `5.`. Not `-1`, `1e3`, `inf`, `nan` or empty.
_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")
ANY = "*"  # `If-None-Match: *`: any current representation (a 200)


def version(endpoint: Endpoint, found: Lookup | None) -> str:
    """The version of an answer; a 404 (`found` None) has one too."""
    facts: tuple[object, ...]
    if found is None:
        facts = (endpoint, None)
    elif endpoint == "task-status":
        facts = (endpoint, found.run.run_id, found.working)
    else:
        facts = (endpoint, found.run.run_id, found.run.state.value)
    return hashlib.blake2b(msgspec.json.encode(facts), digest_size=8).hexdigest()


def etag(endpoint: Endpoint, found: Lookup | None) -> str:
    return f'"{version(endpoint, found)}"'


def matches(since: frozenset[str], endpoint: Endpoint, found: Lookup | None) -> bool:
    """Does the client already have the current answer?"""
    return version(endpoint, found) in since or (ANY in since and found is not None)


class Wanted(msgspec.Struct, frozen=True):
    """A request that may be held: while the current version is in `since`, for up to `wait_s`."""

    since: frozenset[str]
    wait_s: float  # after the SIDECAR_WATCH_MAX_S cap
    not_modified: bool  # the HTTP form: 304 when the client's version is still current
    preference_applied: str | None = None  # `Preference-Applied` value, when `Prefer: wait` was honoured


def wanted(
    wait: str | None,
    since: str | None,
    if_none_match: str | None,
    prefer: Sequence[str],
    cap_s: float,
) -> Wanted | None:
    """What the request asks for; None for an answer at once without a watch.

    The query form (`wait`, `since`) wins over the HTTP form (`If-None-Match`,
    `Prefer: wait=N`). A malformed `wait` is a 400; a malformed `Prefer` is
    ignored, as RFC 7240 asks of preferences a server does not understand.
    """
    if wait is not None:
        wait_s = parse_seconds(wait)
        if wait_s is None:
            raise BadRequest("Malformed wait: a number of seconds >= 0")
        tag = _tag(since) if since is not None else ""
        if not tag:
            return None  # nothing to compare with: the answer is news
        return Wanted(frozenset({tag}), min(wait_s, cap_s), not_modified=False)
    if if_none_match is None:
        return None
    tags = frozenset(t for t in (_tag(part) for part in if_none_match.split(",")) if t)
    if not tags:
        return None
    asked = prefer_wait(prefer)
    if asked is None:
        return Wanted(tags, 0.0, not_modified=True)  # a plain conditional GET
    applied = min(asked, cap_s)
    return Wanted(tags, applied, not_modified=True, preference_applied=f"wait={seconds_text(applied)}")


def parse_seconds(text: str) -> float | None:
    return float(text) if _SECONDS.fullmatch(text) else None


def prefer_wait(headers: Sequence[str]) -> float | None:
    """`wait=N` from any `Prefer` header (comma-separated preferences, `;` parameters)."""
    for header in headers:
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].partition("=")
            if name.strip().lower() == "wait":
                return parse_seconds(value.strip().strip('"'))
    return None


def seconds_text(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"


def _tag(text: str) -> str:
    """`"v"`, `W/"v"` or a bare `v`, as sent back from an `ETag`."""
    text = text.strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"')
