"""Response bodies as msgspec Structs (field order is the wire order) and the OpenAPI schema.

The schema is generated from these types, so the docs cannot drift from the wire.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ActiveSession(msgspec.Struct, rename="camel"):
    session_id: str
    status: Literal["active", "completed", "idle"]
    cursor: str
    conversation_id: str
    started_at: int
    last_activity: int


class TaskStatus(msgspec.Struct, rename="camel"):
    is_active: bool
    session_id: str
    estimated_completion: int
    conversation_id: str


class ErrorBody(msgspec.Struct, rename="camel"):
    error: str
    conversation_id: str | None


ENCODER = msgspec.json.Encoder()

# (status, description) per endpoint: what routes.py can answer.
_ERRORS: dict[str, str] = {
    "400": "Malformed conversation id",
    "401": "No token, or a token that fails verification (WWW-Authenticate set)",
    "403": "Authenticated, but not allowed to see this conversation",
    "503": "Session store, token issuer or backend unavailable (Retry-After set)",
}


def openapi_schema(api_prefix: str, version: str) -> dict[str, Any]:
    (active, task, error), components = msgspec.json.schema_components(
        (ActiveSession, TaskStatus, ErrorBody), ref_template="#/components/schemas/{name}"
    )

    def json_of(schema: dict[str, Any]) -> dict[str, Any]:
        return {"application/json": {"schema": schema}}

    def operation(summary: str, ok: dict[str, Any], not_found: str) -> dict[str, Any]:
        responses: dict[str, Any] = {"200": {"description": "OK", "content": json_of(ok)}}
        responses["404"] = {"description": not_found, "content": json_of(error)}
        for status, description in _ERRORS.items():
            responses[status] = {"description": description, "content": json_of(error)}
        return {
            "get": {
                "summary": summary,
                "parameters": [
                    {
                        "name": "conversation_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "security": [{"bearer": []}],
                "responses": dict(sorted(responses.items())),
            }
        }

    base = f"{api_prefix}/conversations/{{conversation_id}}"
    return {
        "openapi": "3.1.0",
        "info": {"title": "session-sidecar", "version": version},
        "paths": {
            f"{base}/active-session": operation(
                "The run that is streaming (or last streamed) for this conversation",
                active,
                "No active session found",
            ),
            f"{base}/task-status": operation(
                "Whether a background task still works on this conversation",
                task,
                "No background task found",
            ),
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
