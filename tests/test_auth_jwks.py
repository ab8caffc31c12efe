"""The JWKS cache against a real loopback issuer: rotation, Cache-Control, the
unknown-kid re-fetch limit, an unreachable or broken issuer (last good copy,
503 rather than 401) and a fetch that never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from session_sidecar.auth import Authenticator
from session_sidecar.errors import Unauthorized, Unavailable
from session_sidecar.jwks import fresh_for, usable_keys
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import open_api
from tests.jwt_helpers import (
    ISSUER,
    PROJECT,
    JwksServer,
    SigningKey,
    ec_key,
    firebase_claims,
    mint,
    mint_hs256,
    rsa_key,
)

RSA = rsa_key("rsa-1", 0)
RSA_NEXT = rsa_key("rsa-2", 2)
EC = ec_key("ec-1", 0)
EC_NEXT = ec_key("ec-2", 2)
CONVERSATION = "conv-jwks"

MakeSettings = Callable[..., Settings]
MakeAuth = Callable[..., Awaitable[Authenticator]]


def bearer(key: SigningKey, uid: str = "user123", **kw: Any) -> str:
    return f"Bearer {mint(key, firebase_claims(uid), **kw)}"


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer([RSA, EC]) as server:
        yield server


@pytest.fixture
def settings_for(make_settings: MakeSettings) -> Callable[..., Settings]:
    def make(server: JwksServer, **fields: object) -> Settings:
        return make_settings(
            jwt_secret=None, jwks_url=server.url, jwt_issuer=ISSUER, jwt_audience=PROJECT, **fields
        )

    return make


@pytest.fixture
async def authenticator_for(settings_for: Callable[..., Settings]) -> AsyncIterator[MakeAuth]:
    opened: list[Authenticator] = []

    async def make(server: JwksServer, **fields: object) -> Authenticator:
        auth = Authenticator(settings_for(server, **fields))
        await auth.start()
        opened.append(auth)
        return auth

    yield make
    for auth in opened:
        await auth.close()


async def refused(auth: Authenticator, header: str) -> Unauthorized | Unavailable:
    with pytest.raises((Unauthorized, Unavailable)) as caught:
        await auth.authenticate(header)
    assert isinstance(caught.value, Unauthorized | Unavailable)
    return caught.value


async def test_key_rotation_is_picked_up_without_restart(
    jwks: JwksServer, authenticator_for: MakeAuth
) -> None:
    auth = await authenticator_for(jwks, jwks_min_refetch_s=0.2)
    assert (await auth.authenticate(bearer(RSA, "a"))).user_id == "a"
    jwks.rotate([RSA_NEXT, EC_NEXT])  # the old keys are withdrawn
    await asyncio.sleep(0.25)
    assert (await auth.authenticate(bearer(RSA_NEXT, "b"))).user_id == "b"
    assert (await auth.authenticate(bearer(EC_NEXT, "c"))).user_id == "c"
    # A withdrawn key no longer verifies new tokens: the issuer answered, so this is a 401.
    gone = await refused(auth, bearer(RSA, "d"))
    assert isinstance(gone, Unauthorized) and gone.reason == "unknown_kid"
    assert jwks.hits == 2


async def test_cache_control_max_age_drives_refresh(jwks: JwksServer, authenticator_for: MakeAuth) -> None:
    jwks.cache_control = "public, max-age=1"
    auth = await authenticator_for(jwks, jwks_min_refetch_s=0)
    for i in range(5):
        await auth.authenticate(bearer(RSA, f"u{i}"))
    assert jwks.hits == 1  # fresh: no fetch per request
    await asyncio.sleep(1.1)
    await auth.authenticate(bearer(RSA, "later"))
    assert jwks.hits == 2


def test_fresh_for_reads_max_age_and_age() -> None:
    def headers(**h: str) -> httpx.Headers:
        return httpx.Headers({k.replace("_", "-"): v for k, v in h.items()})

    assert fresh_for(headers(cache_control="public, max-age=19774, must-revalidate"), 10) == 19774
    assert fresh_for(headers(cache_control="max-age=600", age="100"), 10) == 500
    assert fresh_for(headers(cache_control="max-age=600", age="700"), 10) == 10  # never below the floor
    assert fresh_for(headers(cache_control="no-cache"), 10) == 10
    assert fresh_for(headers(cache_control="max-age=99999999"), 10) == 86400
    assert fresh_for(headers(), 10) == 300


async def test_unknown_kid_refetch_is_rate_limited(jwks: JwksServer, authenticator_for: MakeAuth) -> None:
    auth = await authenticator_for(jwks, jwks_min_refetch_s=0.5)
    for i in range(10):
        assert (await refused(auth, bearer(RSA, kid=f"forged-{i}"))).reason == "unknown_kid"
    assert jwks.hits == 1  # within the interval of the start-up fetch: no fetch at all
    await asyncio.sleep(0.55)
    for i in range(10):
        assert (await refused(auth, bearer(RSA, kid=f"forged-b{i}"))).reason == "unknown_kid"
    assert jwks.hits == 2
    await asyncio.sleep(0.55)
    results = await asyncio.gather(*(refused(auth, bearer(RSA, kid=f"forged-c{i}")) for i in range(20)))
    assert {r.reason for r in results} == {"unknown_kid"}
    assert jwks.hits == 3


async def test_concurrent_unknown_kids_share_one_fetch(jwks: JwksServer, authenticator_for: MakeAuth) -> None:
    auth = await authenticator_for(jwks, jwks_min_refetch_s=0)
    jwks.delay_s = 0.2
    jwks.rotate([RSA, EC, RSA_NEXT])
    headers = [bearer(RSA_NEXT, f"u{i}") for i in range(20)]
    identities = await asyncio.gather(*(auth.authenticate(h) for h in headers))
    assert [i.user_id for i in identities] == [f"u{i}" for i in range(20)]
    assert jwks.hits == 2


async def test_issuer_down_cached_key_still_verifies(jwks: JwksServer, authenticator_for: MakeAuth) -> None:
    jwks.cache_control = "no-cache"  # stale after the 0.2 s floor: every later request wants a refresh
    auth = await authenticator_for(jwks, jwks_min_refetch_s=0.2)
    jwks.stop()
    await asyncio.sleep(0.25)
    assert (await auth.authenticate(bearer(RSA, "a"))).user_id == "a"  # stale copy, issuer down
    assert (await auth.authenticate(bearer(EC, "b"))).user_id == "b"
    # An unknown key while the issuer is down: 503 with Retry-After, never a 401 (that logs users out).
    unknown = await refused(auth, bearer(RSA_NEXT, "c"))
    assert isinstance(unknown, Unavailable)
    assert unknown.reason == "jwks" and unknown.status_code == 503
    assert int(unknown.headers["Retry-After"]) >= 1
    # The issuer comes back with a new key: picked up after the interval.
    jwks.rotate([RSA, RSA_NEXT])
    jwks.start()
    await asyncio.sleep(0.25)
    assert (await auth.authenticate(bearer(RSA_NEXT, "d"))).user_id == "d"


async def test_issuer_down_over_http(
    jwks: JwksServer, settings_for: Callable[..., Settings], sim: BackendSimulator
) -> None:
    await sim.full_run(CONVERSATION, "user123", status=None)
    settings = settings_for(jwks, jwks_min_refetch_s=0.2)
    async for api in open_api(settings):
        jwks.stop()
        await asyncio.sleep(0.25)  # past the re-fetch interval: the next unknown kid tries the issuer
        path = f"{settings.api_prefix}/conversations/{CONVERSATION}/active-session"
        ok = await api.client.get(path, headers={"Authorization": bearer(RSA)})
        assert ok.status_code == 200, ok.text
        down = await api.client.get(path, headers={"Authorization": bearer(RSA_NEXT)})
        assert down.status_code == 503
        assert down.json() == {"error": down.json()["error"], "conversationId": CONVERSATION}
        assert down.headers["retry-after"] == "1"
        assert "www-authenticate" not in down.headers


async def test_no_cached_key_and_issuer_down_is_503(jwks: JwksServer, authenticator_for: MakeAuth) -> None:
    jwks.stop()  # down before the sidecar ever saw a key
    auth = await authenticator_for(jwks, jwks_min_refetch_s=0.3)
    for key in (RSA, EC):
        answer = await refused(auth, bearer(key))
        assert isinstance(answer, Unavailable) and answer.reason == "jwks"
    # Garbage is still a 401: no key is needed to see that.
    assert isinstance(await refused(auth, "Bearer garbage"), Unauthorized)
    jwks.start()
    await asyncio.sleep(0.35)
    assert (await auth.authenticate(bearer(RSA))).user_id == "user123"


async def test_slow_issuer_times_out_without_blocking_the_loop(
    jwks: JwksServer, authenticator_for: MakeAuth
) -> None:
    jwks.delay_s = 1.0
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    running = asyncio.create_task(ticker())
    started = time.monotonic()
    auth = await authenticator_for(jwks, jwks_timeout_ms=300, jwks_min_refetch_s=10)
    elapsed = time.monotonic() - started
    running.cancel()
    assert 0.25 < elapsed < 0.9  # the timeout, not the issuer's 1 s
    assert ticks >= 10  # the loop kept running while the fetch waited
    answer = await refused(auth, bearer(RSA))
    assert isinstance(answer, Unavailable)
    assert 8 <= int(answer.headers["Retry-After"]) <= 10


@pytest.mark.parametrize(
    "breakage",
    ["http_500", "not_json", "no_keys", "only_unusable_keys"],
)
async def test_broken_issuer_keeps_the_last_good_copy(
    jwks: JwksServer, authenticator_for: MakeAuth, breakage: str
) -> None:
    jwks.cache_control = "no-cache"
    auth = await authenticator_for(jwks, jwks_min_refetch_s=0.1)
    if breakage == "http_500":
        jwks.status = 500
    elif breakage == "not_json":
        jwks.body = b"<html>oops</html>"
    elif breakage == "no_keys":
        jwks.body = b'{"keys": []}'
    else:
        jwks.body = b'{"keys": [{"kty": "oct", "kid": "rsa-1", "k": "c2VjcmV0"}]}'
    await asyncio.sleep(0.15)
    assert (await auth.authenticate(bearer(RSA, "a"))).user_id == "a"
    assert jwks.hits == 2  # the broken answer was fetched, and ignored
    assert isinstance(await refused(auth, bearer(RSA_NEXT)), Unavailable)


async def test_jwks_never_supplies_an_hmac_or_foreign_key(
    jwks: JwksServer, authenticator_for: MakeAuth
) -> None:
    secret = b"a-shared-secret-published-by-mistake!!"
    jwks.documents.append(
        {"kty": "oct", "kid": "hmac", "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode()}
    )
    jwks.documents.append({**RSA_NEXT.public_jwk(), "alg": "RS512"})
    auth = await authenticator_for(jwks)
    forged = mint_hs256(secret, firebase_claims(), kid="hmac")
    assert (await refused(auth, f"Bearer {forged}")).reason == "bad_algorithm"
    assert (await refused(auth, bearer(RSA_NEXT))).reason == "unknown_kid"


def test_usable_keys_filters_and_strips() -> None:
    assert isinstance(RSA.private, rsa.RSAPrivateKey)
    rsa_private = jwt.algorithms.RSAAlgorithm.to_jwk(RSA.private, as_dict=True)
    document = {
        "keys": [
            {**rsa_private, "kid": "with-private-parts"},
            EC.public_jwk(),
            {**EC.public_jwk(), "kid": "enc", "use": "enc"},
            {**RSA.public_jwk(), "kid": None},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "oct", "k": "AAAA"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
        ]
    }
    keys = usable_keys(document)
    assert sorted(keys) == ["ec-1", "with-private-parts"]
    assert keys["with-private-parts"].algorithm_name == "RS256"
    assert keys["ec-1"].algorithm_name == "ES256"
    assert not hasattr(keys["with-private-parts"].key, "private_numbers")
    bad_documents: list[object] = [{}, {"keys": "x"}, {"keys": []}, [1, 2]]
    for bad in bad_documents:
        with pytest.raises(ValueError):
            usable_keys(bad)
