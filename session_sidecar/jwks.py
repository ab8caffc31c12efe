"""The issuer's signing keys (a JWKS document), fetched with httpx and cached.

* Fetched on the event loop with `httpx.AsyncClient` (PyJWT's own
  `PyJWKClient` uses blocking urllib, which would stall every request).
* Fresh for the response's `Cache-Control: max-age` (minus `Age`), clamped
  to `[min_refetch_s, 1 day]`; 5 minutes when the issuer says nothing.
* Any fetch, whether for staleness or for an unknown `kid`, happens at most
  once per `min_refetch_s`, and concurrent callers share one fetch: a flood
  of forged `kid`s costs the issuer one request per interval.
* A failed fetch keeps the last good copy. A `kid` that is still unknown
  while the issuer is unreachable raises `Unavailable` (503), not a 401,
  because the frontend logs the user out on a 401.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any

import httpx
import jwt

from session_sidecar.errors import Unavailable

log = logging.getLogger("session_sidecar.auth")

DEFAULT_MAX_AGE_S = 300.0
MAX_MAX_AGE_S = 86400.0
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)

# The public members kept per key type: private members a broken JWKS might
# publish are dropped, so a key built from it can only ever verify.
_RSA_MEMBERS: tuple[str, ...] = ("kty", "kid", "n", "e")
_EC_MEMBERS: tuple[str, ...] = ("kty", "kid", "crv", "x", "y")


class UnknownKey(Exception):
    """The token names a `kid` the issuer does not publish (after a re-fetch when allowed)."""


def usable_keys(document: Any) -> dict[str, jwt.PyJWK]:
    """`kid` -> key for every RSA (RS256) and EC P-256 (ES256) signing key; ValueError if none."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, jwt.PyJWK] = {}
    for item in document["keys"]:
        if not isinstance(item, dict):
            continue
        kid = item.get("kid")
        if not isinstance(kid, str) or not kid or item.get("use", "sig") != "sig":
            continue
        if item.get("kty") == "RSA":
            algorithm, members = "RS256", _RSA_MEMBERS
        elif item.get("kty") == "EC" and item.get("crv") == "P-256":
            algorithm, members = "ES256", _EC_MEMBERS
        else:
            continue  # oct (HMAC) keys especially: a JWKS must never hand out a shared secret
        if item.get("alg", algorithm) != algorithm:
            continue
        try:
            keys[kid] = jwt.PyJWK({m: item[m] for m in members if m in item}, algorithm)
        except jwt.PyJWTError:
            continue
    if not keys:
        raise ValueError("no usable RS256/ES256 keys")
    return keys


def fresh_for(headers: httpx.Headers, floor_s: float) -> float:
    """Seconds the document may be reused, from `Cache-Control` and `Age`."""
    cache_control = headers.get("cache-control", "")
    if re.search(r"no-cache|no-store", cache_control, re.IGNORECASE):
        return floor_s
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return max(DEFAULT_MAX_AGE_S, floor_s)
    age = headers.get("age", "0")
    max_age = int(match.group(1)) - (int(age) if age.isdigit() else 0)
    return min(max(float(max_age), floor_s), MAX_MAX_AGE_S)


class JwksCache:
    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        min_refetch_s: float,
        timeout_s: float,
    ):
        self._url = url
        self._http = http
        self._min_refetch_s = min_refetch_s
        self._timeout_s = timeout_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fresh_until = 0.0
        self._last_attempt: float | None = None
        self._last_ok = False
        self._inflight: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # An unreachable issuer at start is not fatal: requests get 503 until it answers.
        await self._refresh()

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()

    async def get(self, kid: str) -> jwt.PyJWK:
        if time.monotonic() >= self._fresh_until:
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            await self._refresh()  # the issuer may have rotated; rate-limited inside
            key = self._keys.get(kid)
        if key is not None:
            return key
        if not self._last_ok:
            raise Unavailable(
                "Token signing keys unavailable", retry_after_s=self._retry_after(), reason="jwks"
            )
        raise UnknownKey(kid)

    async def _refresh(self) -> None:
        if self._inflight is None:
            now = time.monotonic()
            if self._last_attempt is not None and now - self._last_attempt < self._min_refetch_s:
                return
            self._last_attempt = now
            self._inflight = asyncio.create_task(self._fetch())
        # shield: a caller that gives up must not cancel the fetch the others wait for.
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.get(
                    self._url, headers={"Accept": "application/json"}, timeout=self._timeout_s
                )
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            keys = usable_keys(response.json())
        except Exception as exc:  # any failure means "issuer unreachable": keep the last good copy
            self._last_ok = False
            log.warning(
                "JWKS fetch failed (%s); %s",
                _describe(exc),
                f"keeping {len(self._keys)} cached keys" if self._keys else "no keys cached",
            )
            return
        finally:
            self._inflight = None
        self._last_ok = True
        self._fresh_until = time.monotonic() + fresh_for(response.headers, self._min_refetch_s)
        if set(keys) != set(self._keys):
            log.info("JWKS loaded: key ids %s", sorted(keys))
        self._keys = keys

    def _retry_after(self) -> int:
        if self._last_attempt is None:
            return 1
        wait = self._min_refetch_s - (time.monotonic() - self._last_attempt)
        return max(1, math.ceil(wait))


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.TransportError):
        return "unreachable"
    if isinstance(exc, ValueError):
        return f"bad response: {exc}"
    return type(exc).__name__
