"""CORS as the backend answers it (SPEC section 5), with Starlette's own middleware.

The only change: a refused preflight keeps the service's flat error body instead
of Starlette's plain-text one. Which origin, method or header is allowed is
decided by `CORSMiddleware` itself.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from session_sidecar.models import ENCODER, ErrorBody


class FlatCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        body = ErrorBody(error="Disallowed CORS origin", conversation_id=None)
        # Keep the CORS headers Starlette chose (e.g. `Vary: Origin`), not its text body's.
        headers = {
            k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")
        }
        headers["Cache-Control"] = "no-store"
        return Response(ENCODER.encode(body), response.status_code, headers, "application/json")
