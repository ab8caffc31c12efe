"""Keys, Firebase-shaped tokens and two real loopback HTTP servers for the auth tests.

* `JwksServer`: serves a JWKS document that a test can rotate, slow down,
  break, stop and restart on the same port; counts its hits.
* `FakeBackend`: answers the backend's conversation-info endpoint with a
  status chosen per conversation; records every call and its Authorization.

Both are `http.server` servers on 127.0.0.1 in a daemon thread: real sockets,
no mocking of the client side.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PROJECT = "demo-project"
ISSUER = f"https://securetoken.google.com/{PROJECT}"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str  # "RS256" or "ES256"
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    def public_jwk(self) -> dict[str, Any]:
        if isinstance(self.private, rsa.RSAPrivateKey):
            jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        else:
            jwk = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@functools.cache
def _rsa_private(n: int) -> rsa.RSAPrivateKey:
    # Cached by index: RSA generation is the slowest thing in these tests.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_key(kid: str, n: int = 0) -> SigningKey:
    return SigningKey(kid, "RS256", _rsa_private(n))


@functools.cache
def _ec_private(n: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ec_key(kid: str, n: int = 0) -> SigningKey:
    return SigningKey(kid, "ES256", _ec_private(n))


def firebase_claims(uid: str = "user123", *, lifetime_s: int = 3600, **overrides: Any) -> dict[str, Any]:
    """The claims of a Firebase ID token for `PROJECT`; `None` in overrides removes a claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": PROJECT,
        "auth_time": now - 60,
        "user_id": uid,
        "sub": uid,
        "iat": now,
        "exp": now + lifetime_s,
        "email": f"{uid}@example.com",
        "email_verified": True,
        "firebase": {"identities": {"email": [f"{uid}@example.com"]}, "sign_in_provider": "password"},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


_KEEP = object()


def mint(key: SigningKey, claims: dict[str, Any], *, kid: Any = _KEEP, alg: str | None = None) -> str:
    """A token signed by `key`, with a `kid` header (the key's own unless given; None for none)."""
    headers: dict[str, Any] = {}
    kid = key.kid if kid is _KEEP else kid
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(claims, key.private, algorithm=alg or key.alg, headers=headers)


def mint_hs256(secret: str | bytes, claims: dict[str, Any], *, kid: str | None = None) -> str:
    # PyJWT refuses a PEM as an HMAC secret, so the forged token is built by hand.
    return _assemble({"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}, claims, secret)


def unsigned(claims: dict[str, Any], *, kid: str | None = None) -> str:
    """An `alg: none` token (empty signature)."""
    header = {"alg": "none", "typ": "JWT", **({"kid": kid} if kid else {})}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _assemble(header: dict[str, Any], claims: dict[str, Any], secret: str | bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tamper_header(token: str, **changes: Any) -> str:
    """The same payload and signature under a modified header."""
    header, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    fields.update(changes)
    return f"{_b64(json.dumps(fields).encode())}.{payload}.{signature}"


def tamper_payload(token: str, **changes: Any) -> str:
    """The same header and signature around a modified payload."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


class _LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 that can stop and restart on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.delay_s = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def respond(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                status, headers, body = outer.respond(self.path, dict(self.headers.items()))
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class JwksServer(_LoopbackServer):
    def __init__(self, keys: list[SigningKey], *, cache_control: str | None = "public, max-age=300"):
        super().__init__()
        self.documents: list[dict[str, Any]] = [k.public_jwk() for k in keys]
        self.cache_control = cache_control
        self.status = 200
        self.body: bytes | None = None  # when set, served instead of the JWKS (a broken issuer)
        self.hits = 0

    @property
    def url(self) -> str:
        return f"{self.base_url}/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"

    def rotate(self, keys: list[SigningKey]) -> None:
        self.documents = [k.public_jwk() for k in keys]

    def respond(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.hits += 1
        out = {"Content-Type": "application/json"}
        if self.cache_control:
            out["Cache-Control"] = self.cache_control
        body = self.body if self.body is not None else json.dumps({"keys": self.documents}).encode()
        return self.status, out, body


@dataclass
class BackendCall:
    conversation_id: str
    authorization: str | None


class FakeBackend(_LoopbackServer):
    """`GET /api/v1/conversations/{id}/info/` -> `statuses[id]` (404 when absent)."""

    def __init__(self, statuses: dict[str, int] | None = None):
        super().__init__()
        self.statuses = statuses or {}
        self.calls: list[BackendCall] = []
        self.redirect_to: str | None = None

    def respond(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        match = re.fullmatch(r"/api/v1/conversations/([^/]+)/info/", path)
        conversation = match.group(1) if match else path
        self.calls.append(BackendCall(conversation, headers.get("Authorization")))
        status = self.statuses.get(conversation, 404) if match else 404
        out = {"Content-Type": "application/json"}
        if 300 <= status < 400 and self.redirect_to:
            out["Location"] = self.redirect_to
        return status, out, json.dumps({"id": conversation, "title": "t"}).encode()

    def calls_for(self, conversation_id: str) -> int:
        return sum(1 for call in self.calls if call.conversation_id == conversation_id)
