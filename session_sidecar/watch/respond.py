"""The watch inside a request: which form it asked for, holding it, the headers it gets."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.types import Receive

from session_sidecar.access import RunFilter
from session_sidecar.sessions import Lookup
from session_sidecar.watch.hub import WatchHub
from session_sidecar.watch.versions import Endpoint, Wanted, etag, matches, wanted


class Outcome(NamedTuple):
    found: Lookup | None
    headers: dict[str, str]  # ETag, and Preference-Applied when `Prefer: wait` was honoured
    not_modified: bool  # the HTTP form, and the client's version is still current: 304


NO_QUERY = QueryParams()


def wanted_from(request: Request, cap_s: float) -> Wanted | None:
    """None for an answer at once, as without a watch; BadRequest for a malformed `wait`."""
    # Most requests carry no query string: parsing an empty one is measurable per request.
    query = request.query_params if request.scope.get("query_string") else NO_QUERY
    headers = request.headers
    return wanted(
        query.get("wait"), query.get("since"), headers.get("if-none-match"), headers.getlist("prefer"), cap_s
    )


async def lookup(
    request: Request,
    hub: WatchHub,
    endpoint: Endpoint,
    conversation_id: str,
    visible: RunFilter,
    asked: Wanted | None,
) -> Outcome:
    if asked is None:
        found = await hub.sessions.lookup(conversation_id, visible)
        return Outcome(found, {"ETag": etag(endpoint, found)}, False)
    gone: asyncio.Future[Any] = asyncio.ensure_future(_disconnect(request.receive))
    try:
        found = await hub.hold(conversation_id, visible, endpoint, asked, gone)
    finally:
        gone.cancel()
    headers = {"ETag": etag(endpoint, found)}
    if asked.preference_applied is not None:
        headers["Preference-Applied"] = asked.preference_applied
    return Outcome(found, headers, asked.not_modified and matches(asked.since, endpoint, found))


async def _disconnect(receive: Receive) -> None:
    """Returns when the client goes away (a GET's empty body comes first)."""
    while (await receive())["type"] != "http.disconnect":
        pass
