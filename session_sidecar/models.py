"""Response bodies as msgspec Structs (field order is the wire order) and the OpenAPI schema.

The schema is generated from these types, so the docs cannot drift from the wire.
"""

from __future__ import annotations

# The parser behind `re.compile` (sre_parse before 3.11), for the id pattern's length bounds.
from re import _parser as regex_parser  # type: ignore[attr-defined,unused-ignore]
from typing import Annotated, Any, Literal

import msgspec


def _doc(description: str) -> msgspec.Meta:
    return msgspec.Meta(description=description)


ConversationId = Annotated[str, _doc("The conversation id of the request path, echoed.")]
RunId = Annotated[
    str,
    _doc(
        "The run's id, as the backend names it (e.g. `conversation:{user}:{message}`); with "
        "`conversationId` it names the Redis stream to resume."
    ),
]


class ActiveSession(msgspec.Struct, rename="camel"):
    """The run that is streaming for this conversation, or else the one that last streamed."""

    session_id: RunId
    status: Annotated[
        Literal["active", "completed", "idle"],
        _doc(
            "`active`: a worker is producing output; `completed`: the run ended (completed, "
            "cancelled or failed); `idle`: neither (the worker is gone, or the status is unknown)."
        ),
    ]
    cursor: Annotated[
        str,
        _doc(
            "A stream entry id (`{ms}-{seq}`; `0-0` before the first entry) to resume from: "
            "the last entry by default, the first with SIDECAR_ACTIVE_CURSOR=first."
        ),
    ]
    conversation_id: ConversationId
    started_at: Annotated[int, _doc("When the run started: milliseconds since the Unix epoch (UTC).")]
    last_activity: Annotated[
        int, _doc("When the run last wrote to its stream: milliseconds since the Unix epoch (UTC).")
    ]


class TaskStatus(msgspec.Struct, rename="camel"):
    """Whether a background task still works on this conversation."""

    is_active: Annotated[
        bool, _doc("True while the run is working: not finished, and its worker still writes.")
    ]
    session_id: RunId
    estimated_completion: Annotated[
        int,
        _doc(
            "Milliseconds since the Unix epoch (UTC): when a finished run ended; for a working run, "
            "its start plus the typical run duration (never earlier than one second from now); "
            "for an idle run, its last activity."
        ),
    ]
    conversation_id: ConversationId


class ErrorBody(msgspec.Struct, rename="camel"):
    """Every refusal: one flat shape, never wrapped in `detail`."""

    error: Annotated[str, _doc("A one-line reason, safe to show.")]
    conversation_id: Annotated[
        str | None, _doc("The conversation id of the request path, or null when it had none.")
    ]


ENCODER = msgspec.json.Encoder()

# status -> description, for what routes.py can refuse with (404 is per endpoint).
_ERRORS: dict[str, str] = {
    "400": "Malformed conversation id, or a `wait` that is not a non-negative number",
    "401": "No token, or a token that fails verification",
    "403": "Authenticated, but not allowed to see this conversation",
    "503": "Session store, token issuer or backend unavailable, or too many held watch requests: "
    "retry after `Retry-After` seconds",
}

_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "The request's id: the caller's own `X-Request-ID` if it sent a sane one "
        "(1-128 of `A-Za-z0-9._:-`), else a fresh one. The access log line carries it too.",
        "schema": {"type": "string"},
    },
    "Cache-Control": {"description": "Always `no-store`.", "schema": {"type": "string"}},
    "Retry-After": {
        "description": "Seconds to wait before asking again.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "ETag": {
        "description": "The version of the facts a client reacts to (task-status: `sessionId`, "
        "`isActive`; active-session: `sessionId`, `status`); give it back as `since` or "
        "`If-None-Match` to wait for a change.",
        "schema": {"type": "string"},
    },
    "Preference-Applied": {
        "description": "`wait=<seconds>` actually applied (after the cap), on answers to `Prefer: wait`.",
        "schema": {"type": "string"},
    },
    "WWW-Authenticate": {
        "description": 'A Bearer challenge (RFC 6750): `error="invalid_token"` when a token was sent.',
        "schema": {"type": "string"},
    },
}
_EXTRA_HEADERS = {"401": "WWW-Authenticate", "503": "Retry-After"}


# The watch (long-poll) forms; see docs/watch.md.
_WATCH_PARAMETERS: tuple[dict[str, Any], ...] = (
    {
        "name": "wait",
        "in": "query",
        "description": "Seconds to hold the request while the version is still `since` "
        "(capped by SIDECAR_WATCH_MAX_S); the answer is always the normal 200 or 404.",
        "schema": {"type": "number", "minimum": 0},
    },
    {
        "name": "since",
        "in": "query",
        "description": "An `ETag` value, with or without its quotes.",
        "schema": {"type": "string"},
    },
    {
        "name": "If-None-Match",
        "in": "header",
        "description": "With `Prefer: wait=N`: hold while this is still the version, then 304.",
        "schema": {"type": "string"},
    },
    {
        "name": "Prefer",
        "in": "header",
        "description": "`wait=<seconds>`, with `If-None-Match`.",
        "schema": {"type": "string"},
    },
)


def _length_bounds(pattern: str) -> dict[str, int]:
    """minLength/maxLength of what the id pattern can match, when it is bounded."""
    low, high = regex_parser.parse(pattern).getwidth()
    return {"minLength": int(low)} | ({"maxLength": int(high)} if high < regex_parser.MAXREPEAT else {})


def openapi_schema(api_prefix: str, version: str, id_pattern: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `id_pattern` is SIDECAR_CONVERSATION_ID_PATTERN."""
    (active, task, error), components = msgspec.json.schema_components(
        (ActiveSession, TaskStatus, ErrorBody), ref_template="#/components/schemas/{name}"
    )

    def response(description: str, schema: dict[str, Any], *headers: str) -> dict[str, Any]:
        named = ("X-Request-ID", "Cache-Control", *headers)
        return {
            "description": description,
            "headers": {name: {"$ref": f"#/components/headers/{name}"} for name in named},
            "content": {"application/json": {"schema": schema}},
        }

    def operation(operation_id: str, summary: str, ok: dict[str, Any], not_found: str) -> dict[str, Any]:
        responses = {
            "200": response("OK", ok, "ETag", "Preference-Applied"),
            "404": response(not_found, error, "ETag", "Preference-Applied"),
            "304": {
                "description": "Nothing changed (`If-None-Match` with `Prefer: wait`): no body",
                "headers": {
                    name: {"$ref": f"#/components/headers/{name}"}
                    for name in ("X-Request-ID", "Cache-Control", "ETag", "Preference-Applied")
                },
            },
        }
        for status, description in _ERRORS.items():
            extra = (_EXTRA_HEADERS[status],) if status in _EXTRA_HEADERS else ()
            responses[status] = response(description, error, *extra)
        return {
            "get": {
                "operationId": operation_id,
                "summary": summary,
                "parameters": [
                    {
                        "name": "conversation_id",
                        "in": "path",
                        "required": True,
                        "description": "The conversation's id; never holds a colon.",
                        "schema": {"type": "string", "pattern": id_pattern, **_length_bounds(id_pattern)},
                    },
                    *_WATCH_PARAMETERS,
                ],
                "security": [{"bearer": []}],
                "responses": dict(sorted(responses.items())),
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {"title": "session-sidecar", "version": version},
        # Paths below are relative to the API prefix, on the gateway's origin.
        "servers": [{"url": api_prefix, "description": "The API prefix (SIDECAR_API_PREFIX)"}],
        "paths": {
            "/conversations/{conversation_id}/active-session": operation(
                "getActiveSession",
                "The run that is streaming (or last streamed) for this conversation",
                active,
                "No active session found: the caller can see no run of this conversation",
            ),
            "/conversations/{conversation_id}/task-status": operation(
                "getTaskStatus",
                "Whether a background task still works on this conversation",
                task,
                "No background task found: the caller can see no run of this conversation",
            ),
        },
        "components": {
            "schemas": components,
            "headers": _HEADERS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
