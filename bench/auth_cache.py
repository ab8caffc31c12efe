"""What the verified-token cache buys for RS256 (Firebase-shaped) tokens.

    python -m bench.auth_cache [--calls 5000] [--rounds 5] [--no-endpoint]

A JWKS with one RSA-2048 key is served on loopback; tokens are shaped like
Firebase ID tokens (RS256, `kid`, Firebase `iss`/`aud`). Two levels, each with
the cache on (`SIDECAR_TOKEN_CACHE_SIZE=10000`) and off (`=0`), interleaved
round by round so drift hits both alike:

* `authenticate`: `Authenticator.authenticate()` alone, sequential calls;
* `endpoint`: `GET .../active-session` through the real app (in-process ASGI,
  real Redis from `session_sidecar.embedded`, each user polling their own
  conversation holding one running run), sequential requests. Skipped when
  no Redis server binary is found.

Scenarios: `polling` (one client repeating its token) and `1000 users`
(1000 distinct tokens in rotation). Every token is used once before the timed
calls, so "cache on" is the steady state of clients that keep polling with
the same token. Medians over rounds, then the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import rsa

from session_sidecar.app import create_app
from session_sidecar.auth import Authenticator
from session_sidecar.embedded import EmbeddedRedis, find_server_binary
from session_sidecar.settings import Settings

PROJECT = "bench-project"
ISSUER = f"https://securetoken.google.com/{PROJECT}"
KID = "bench-key-1"
CONVERSATION = "bench-conversation"


@contextlib.contextmanager
def jwks_server(key: rsa.RSAPrivateKey) -> Iterator[str]:
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": KID, "alg": "RS256"}
    body = json.dumps({"keys": [jwk]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=3600")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks"
    finally:
        server.shutdown()
        server.server_close()


def firebase_token(key: rsa.RSAPrivateKey, uid: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": PROJECT,
        "auth_time": now,
        "user_id": uid,
        "sub": uid,
        "iat": now,
        "exp": now + 3600,
        "firebase": {"sign_in_provider": "password"},
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


async def rate(call: Callable[[str], Awaitable[object]], headers: list[str], calls: int) -> float:
    for header in headers:  # warm-up: with the cache on, each token's one verification happens here
        await call(header)
    started = time.perf_counter()
    for i in range(calls):
        await call(headers[i % len(headers)])
    return calls / (time.perf_counter() - started)


async def measure_authenticate(settings: Settings, headers: list[str], calls: int) -> float:
    auth = Authenticator(settings)
    await auth.start()
    try:
        return await rate(auth.authenticate, headers, calls)
    finally:
        await auth.close()


async def measure_endpoint(settings: Settings, headers: list[str], calls: int) -> float:
    app = create_app(settings)
    # Each user polls their own conversation (the one `seed` gave them).
    paths = {
        h: f"{settings.api_prefix}/conversations/{CONVERSATION}-{i}/active-session"
        for i, h in enumerate(headers)
    }
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:

            async def get(header: str) -> None:
                response = await client.get(paths[header], headers={"Authorization": header})
                if response.status_code != 200:
                    raise SystemExit(f"unexpected {response.status_code}: {response.text}")

            return await rate(get, headers, calls)


async def seed(redis_url: str, users: list[str]) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    now_ms = int(time.time() * 1000)
    for i, uid in enumerate(users):
        conversation, run_id = f"{CONVERSATION}-{i}", f"conversation:{uid}:new"
        key = f"chat:stream:{conversation}:{run_id}"
        fields = {"type": "start", "conversation_id": conversation, "run_id": run_id, "status": "processing"}
        await client.xadd(key, fields, id=f"{now_ms}-0")  # type: ignore[arg-type]
        await client.expire(key, 900)
        await client.set(f"task:status:{conversation}:{run_id}", "running", ex=600)
    await client.aclose()


def report(level: str, scenario: str, on: list[float], off: list[float]) -> None:
    m_on, m_off = statistics.median(on), statistics.median(off)
    print(
        f"{level:<13} {scenario:<10} {m_off:>12,.0f} {m_on:>12,.0f} {m_on / m_off:>7.1f}x"
        f"   (rounds off {[round(x) for x in off]}, on {[round(x) for x in on]})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-endpoint", action="store_true")
    args = parser.parse_args()

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    scenarios = {"polling": ["user-0"], "1000 users": [f"user-{i}" for i in range(1000)]}
    print(f"RS256 (RSA-2048, JWKS), {args.calls} sequential calls per round, {args.rounds} rounds, medians")
    print(f"{'level':<13} {'scenario':<10} {'cache off/s':>12} {'cache on/s':>12} {'ratio':>8}")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(jwks_server(key))
        base = Settings(
            jwks_url=url,
            jwt_issuer=ISSUER,
            jwt_audience=PROJECT,
            redis_timeout_ms=2000,
            access_policy="run-owner",  # measures token checks, not a backend round trip
        )
        levels: list[tuple[str, Callable[[Settings, list[str], int], Awaitable[float]]]] = [
            ("authenticate", measure_authenticate)
        ]
        if not args.no_endpoint and find_server_binary():
            redis = stack.enter_context(EmbeddedRedis())
            base = msgspec.structs.replace(base, redis_url=redis.url)
            levels.append(("endpoint", measure_endpoint))
        for level, measure in levels:
            for scenario, users in scenarios.items():
                if level == "endpoint":
                    await seed(base.redis_url, users)
                headers = [f"Bearer {firebase_token(key, uid)}" for uid in users]
                on: list[float] = []
                off: list[float] = []
                for r in range(args.rounds):
                    order = [(10000, on), (0, off)] if r % 2 == 0 else [(0, off), (10000, on)]
                    for size, results in order:
                        settings = msgspec.structs.replace(base, token_cache_size=size)
                        results.append(await measure(settings, headers, args.calls))
                report(level, scenario, on, off)


if __name__ == "__main__":
    asyncio.run(main())
