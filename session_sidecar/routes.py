"""The HTTP surface: two conversation endpoints and the operational ones.

Every refusal is an `ApiError` mapped to the flat `{"error", "conversationId"}`
body in `_refusal`, the one place statuses are chosen; `observability` logs and counts it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from session_sidecar import docs_page, observability, watch
from session_sidecar.auth import Identity
from session_sidecar.errors import ApiError, BadRequest, NotFound
from session_sidecar.models import ENCODER, ActiveSession, ErrorBody, TaskStatus
from session_sidecar.sessions import Lookup

log = logging.getLogger("session_sidecar.routes")
NO_STORE = {"Cache-Control": "no-store"}


def json_response(body: msgspec.Struct | dict[str, Any], status: int = 200, **headers: str) -> Response:
    return Response(
        ENCODER.encode(body), status, headers={**NO_STORE, **headers}, media_type="application/json"
    )


def _active_session_body(conversation_id: str, found: Lookup) -> msgspec.Struct:
    run = found.run
    return ActiveSession(
        session_id=run.run_id,
        status=run.state.value,
        cursor=run.cursor,
        conversation_id=conversation_id,
        started_at=run.started_at,
        last_activity=run.last_activity,
    )


def _task_status_body(conversation_id: str, found: Lookup) -> msgspec.Struct:
    return TaskStatus(
        is_active=found.working,
        session_id=found.run.run_id,
        estimated_completion=found.estimated_completion,
        conversation_id=conversation_id,
    )


class Answer:
    """`active-session` or `task-status`, as a plain ASGI app. As a function it would be
    wrapped by Starlette in a second exception layer, with a Request and a send wrapper of its
    own, on every request: of no use to an endpoint that answers its own refusals (anything
    else still reaches `server_error` through the app's outer layer)."""

    def __init__(
        self, endpoint: watch.Endpoint, not_found: str, render: Callable[[str, Lookup], msgspec.Struct]
    ):
        self._endpoint = endpoint
        self._not_found = not_found
        self._render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await _answer(request, self._endpoint, self._not_found, self._render)
        await response(scope, receive, send)


active_session = Answer("active-session", "No active session found", _active_session_body)
task_status = Answer("task-status", "No background task found", _task_status_body)


async def _answer(
    request: Request,
    endpoint: watch.Endpoint,
    not_found: str,
    render: Callable[[str, Lookup], msgspec.Struct],
) -> Response:
    sidecar = request.app.state.sidecar
    conversation_id: str = request.path_params["conversation_id"]
    try:
        identity = await identify(request, conversation_id)
        asked = watch.wanted_from(request, sidecar.settings.watch_max_s)
        visible = await sidecar.policy.visible_runs(identity, conversation_id)
        # Answered at once, or held by the watch (SPEC 8.3); either way with its ETag.
        outcome = await watch.lookup(request, sidecar.watch, endpoint, conversation_id, visible, asked)
        if outcome.not_modified:
            return Response(status_code=304, headers={**NO_STORE, **outcome.headers})
        if outcome.found is None:
            raise NotFound(not_found, headers=outcome.headers)
    except ApiError as refusal:
        return _refusal(request, refusal, conversation_id)
    return json_response(render(conversation_id, outcome.found), 200, **outcome.headers)


async def identify(request: Request, conversation_id: str) -> Identity:
    """What every conversation endpoint checks first: the caller (401), then the id (400)."""
    sidecar = request.app.state.sidecar
    identity: Identity = await sidecar.authenticator.authenticate(request.headers.get("authorization"))
    observability.identified(request.scope, identity.user_id)
    if not _valid_id(sidecar.id_pattern, conversation_id):
        raise BadRequest("Malformed conversation id")
    return identity


def _valid_id(pattern: re.Pattern[str], conversation_id: str) -> bool:
    # The colon check stands even if a custom pattern slips one through.
    return ":" not in conversation_id and pattern.fullmatch(conversation_id) is not None


def _refusal(request: Request, refusal: ApiError, conversation_id: str | None) -> Response:
    observability.refused(request.scope, refusal)
    body = ErrorBody(error=refusal.message, conversation_id=conversation_id)
    return json_response(body, refusal.status_code, **refusal.headers)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods keep the flat body too."""
    assert isinstance(exc, HTTPException)
    body = ErrorBody(error=exc.detail, conversation_id=request.path_params.get("conversation_id"))
    return json_response(body, exc.status_code, **(exc.headers or {}))


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    body = ErrorBody(error="Internal error", conversation_id=request.path_params.get("conversation_id"))
    return json_response(body, 500)


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Never touches Redis, so a Redis outage restarts nothing."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    sidecar = request.app.state.sidecar
    reason = await sidecar.not_ready_reason()
    if reason is None:
        return json_response({"status": "ready"})
    return json_response({"status": "unavailable", "reason": reason}, 503, **{"Retry-After": "1"})


class MetricsApp:
    """`GET /metrics`: prometheus-client's own ASGI app, which negotiates OpenMetrics from
    `Accept` and gzips for `Accept-Encoding: gzip`. A class, not a function, so that Starlette
    routes to it as an ASGI app rather than as a request handler."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._app = make_asgi_app(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


async def openapi(request: Request) -> Response:
    return Response(request.app.state.sidecar.openapi_json, media_type="application/json")


async def docs(request: Request) -> Response:
    return HTMLResponse(docs_page.HTML, headers={**NO_STORE, "Content-Security-Policy": docs_page.CSP})
