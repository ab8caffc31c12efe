"""The backend's key names, and the one place a SCAN MATCH pattern is built."""

from __future__ import annotations

import re

from session_sidecar.problems import warn_once

STATUS_PREFIX = "task:status"
# `{stream prefix}:reservation:{conversation}:{run}` strings reserve a run id before its
# stream exists (SPEC section 1). They are not runs, and `reservation` is no conversation.
RESERVATION = "reservation"
SCAN_COUNT = 1000
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(value: str) -> str:
    """Escape `* ? [ ] \\` so a request value matches only itself in SCAN MATCH."""
    return _GLOB_SPECIAL.sub(r"\\\1", value)


class KeySchema:
    """The backend's key names. A conversation id never holds ':', a run id may."""

    def __init__(self, stream_prefix: str):
        self.stream_prefix = stream_prefix
        self.status_prefix = STATUS_PREFIX

    def stream_key(self, conversation_id: str, run_id: str) -> str:
        return f"{self.stream_prefix}:{conversation_id}:{run_id}"

    def status_key(self, conversation_id: str, run_id: str) -> str:
        return f"{self.status_prefix}:{conversation_id}:{run_id}"

    def match_patterns(self, conversation_id: str | None = None) -> tuple[str, str]:
        """SCAN MATCH patterns of the (stream, status) keys of one conversation, or of every
        run (None). Every pattern is built here: both the per-request SCAN and the index's
        seed SCAN would otherwise each have to remember that the prefix is text too (a
        `REDIS_STREAM_PREFIX` of `chat[1]` must not match `chat1:...` and miss its own keys).
        """
        runs = "*" if conversation_id is None else f"{glob_escape(conversation_id)}:*"
        return (
            f"{glob_escape(self.stream_prefix)}:{runs}",
            f"{glob_escape(self.status_prefix)}:{runs}",
        )

    def parse(self, key: str) -> tuple[str, str] | None:
        """`(conversation_id, run_id)` of a stream or status key, else None.

        The run id is everything after `{prefix}:{conversation}:`, colons included.
        Reservation keys are not runs: None.
        """
        for prefix in (self.stream_prefix, self.status_prefix):
            if key.startswith(prefix) and key[len(prefix) : len(prefix) + 1] == ":":
                conversation, sep, run_id = key[len(prefix) + 1 :].partition(":")
                if sep and conversation and run_id and conversation != RESERVATION:
                    return conversation, run_id
        return None

    @staticmethod
    def may_hold_runs(conversation_id: str) -> bool:
        """False for `reservation`: its "runs" would be other conversations' reservations."""
        return conversation_id != RESERVATION


def decode_key(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode()
    except UnicodeDecodeError:
        warn_once(("key", raw), "skipping a key that is not UTF-8: %r", raw[:80])
        return None
