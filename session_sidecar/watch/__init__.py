"""Watch instead of polling: versions, long-poll and one shared watch per conversation
(SPEC 8.3; docs/watch.md)."""

from session_sidecar.watch.hub import TooManyWaiters, WatchHub
from session_sidecar.watch.respond import Outcome, lookup, wanted_from
from session_sidecar.watch.versions import Endpoint, Wanted, etag, version

__all__ = [
    "Endpoint",
    "Outcome",
    "TooManyWaiters",
    "Wanted",
    "WatchHub",
    "etag",
    "lookup",
    "version",
    "wanted_from",
]
