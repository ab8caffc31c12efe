"""Token verification: the negative matrix (each a 401, never a 200), the accepted
shapes, the three key modes, development mode and the verified-token cache.

The JWKS is served by a real loopback HTTP server (`tests/jwt_helpers.py`);
the end-to-end cases go through the app with a real Redis holding a run that a
forged token would reveal if it were accepted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from session_sidecar.auth import Authenticator, Identity, load_public_key, token_hash
from session_sidecar.errors import ConfigError, Unauthorized
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import open_api
from tests.jwt_helpers import (
    ISSUER,
    PROJECT,
    JwksServer,
    ec_key,
    firebase_claims,
    mint,
    mint_hs256,
    rsa_key,
    tamper_header,
    tamper_payload,
    unsigned,
)

RSA = rsa_key("rsa-1", 0)
EC = ec_key("ec-1", 0)
IMPOSTOR_RSA = rsa_key("rsa-1", 1)  # same kid, different key
IMPOSTOR_EC = ec_key("ec-1", 1)
SECRET = "an-hs256-secret-of-at-least-32-bytes!!"
CONVERSATION = "conv-1"

MakeSettings = Callable[..., Settings]


def bearer(token: str) -> str:
    return f"Bearer {token}"


def claims(**overrides: Any) -> dict[str, Any]:
    return firebase_claims("user123", **overrides)


def _without_signature(token: str) -> str:
    return token.rsplit(".", 1)[0] + "."


# (case, Authorization header or None, expected reason). Firebase (JWKS) mode.
NEGATIVE: list[tuple[str, Callable[[], str | None], str]] = [
    ("no_token", lambda: None, "missing"),
    ("empty_header", lambda: "  ", "missing"),
    ("basic_scheme", lambda: "Basic dXNlcjpwYXNz", "malformed_header"),
    ("bearer_without_token", lambda: "Bearer", "malformed_header"),
    ("bearer_two_tokens", lambda: bearer(mint(RSA, claims())) + " extra", "malformed_header"),
    ("garbage_token", lambda: "Bearer garbage", "malformed"),
    ("garbage_three_segments", lambda: "Bearer aaaa.bbbb.cccc", "malformed"),
    ("jwe_shaped_five_segments", lambda: "Bearer a.b.c.d.e", "malformed"),
    (
        "tampered_payload",
        lambda: bearer(tamper_payload(mint(RSA, claims()), user_id="admin")),
        "bad_signature",
    ),
    ("bad_signature_rsa", lambda: bearer(mint(IMPOSTOR_RSA, claims())), "bad_signature"),
    ("bad_signature_ec", lambda: bearer(mint(IMPOSTOR_EC, claims())), "bad_signature"),
    ("signature_stripped", lambda: bearer(_without_signature(mint(RSA, claims()))), "bad_signature"),
    ("alg_none", lambda: bearer(unsigned(claims(), kid="rsa-1")), "bad_algorithm"),
    (
        "hs256_signed_with_rsa_public_key",
        lambda: bearer(mint_hs256(RSA.public_pem(), claims(), kid="rsa-1")),
        "bad_algorithm",
    ),
    ("alg_not_a_string", lambda: bearer(tamper_header(mint(RSA, claims()), alg=["RS256"])), "bad_algorithm"),
    ("rs512_with_published_key", lambda: bearer(mint(RSA, claims(), alg="RS512")), "bad_algorithm"),
    ("es256_header_on_rsa_kid", lambda: bearer(mint(EC, claims(), kid="rsa-1")), "bad_algorithm"),
    ("expired", lambda: bearer(mint(RSA, claims(exp=int(time.time()) - 60))), "expired"),
    ("nbf_in_future", lambda: bearer(mint(RSA, claims(nbf=int(time.time()) + 120))), "not_yet_valid"),
    ("iat_in_future", lambda: bearer(mint(RSA, claims(iat=int(time.time()) + 120))), "not_yet_valid"),
    (
        "wrong_issuer",
        lambda: bearer(mint(RSA, claims(iss="https://securetoken.google.com/other-project"))),
        "wrong_issuer",
    ),
    ("missing_issuer", lambda: bearer(mint(RSA, claims(iss=None))), "missing_claim"),
    ("wrong_audience", lambda: bearer(mint(RSA, claims(aud="other-project"))), "wrong_audience"),
    ("missing_audience", lambda: bearer(mint(RSA, claims(aud=None))), "missing_claim"),
    ("unknown_kid", lambda: bearer(mint(RSA, claims(), kid="forged-kid")), "unknown_kid"),
    ("missing_kid", lambda: bearer(mint(RSA, claims(), kid=None)), "missing_kid"),
    ("missing_exp", lambda: bearer(mint(RSA, claims(exp=None))), "missing_claim"),
    ("exp_not_a_number", lambda: bearer(mint(RSA, claims(exp="tomorrow"))), "malformed"),
    ("no_user_claim", lambda: bearer(mint(RSA, claims(user_id=None, sub=None))), "no_user"),
    ("empty_user_claims", lambda: bearer(mint(RSA, claims(user_id="", sub=""))), "no_user"),
    ("oversized_token", lambda: bearer(mint(RSA, claims(padding="x" * 9000))), "oversized"),
]


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer([RSA, EC]) as server:
        yield server


@pytest.fixture
def firebase(make_settings: MakeSettings, jwks: JwksServer) -> Settings:
    return make_settings(
        jwt_secret=None,
        jwks_url=jwks.url,
        jwt_issuer=ISSUER,
        jwt_audience=PROJECT,
        jwt_leeway_s=5,
    )


@pytest.fixture
async def authenticator(firebase: Settings) -> AsyncIterator[Authenticator]:
    auth = Authenticator(firebase)
    await auth.start()
    yield auth
    await auth.close()


async def rejection(auth: Authenticator, header: str | None) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        await auth.authenticate(header)
    return caught.value


@pytest.mark.parametrize(("case", "header", "reason"), NEGATIVE, ids=[c[0] for c in NEGATIVE])
async def test_negative_matrix_reason(
    authenticator: Authenticator,
    case: str,
    header: Callable[[], str | None],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    value = header()
    caplog.set_level(logging.INFO, logger="session_sidecar.auth")
    refused = await rejection(authenticator, value)
    assert refused.reason == reason
    assert refused.status_code == 401
    expected = 'Bearer realm="session-sidecar"' if reason == "missing" else 'Bearer error="invalid_token"'
    assert refused.headers["WWW-Authenticate"] == expected
    # Nothing logged here (so never the token): the request's one access line carries the reason.
    assert not caplog.records


@pytest.mark.parametrize(("case", "header", "reason"), NEGATIVE, ids=[c[0] for c in NEGATIVE])
async def test_negative_matrix_over_http(
    firebase: Settings,
    sim: BackendSimulator,
    case: str,
    header: Callable[[], str | None],
    reason: str,
) -> None:
    # Runs a forged token would reveal if it were accepted.
    await sim.full_run(CONVERSATION, "user123", status=None)
    await sim.full_run(CONVERSATION, "admin", status=None)
    value = header()
    async for api in open_api(firebase):
        headers = {"Authorization": value} if value is not None else {}
        for endpoint in ("active-session", "task-status"):
            path = f"{firebase.api_prefix}/conversations/{CONVERSATION}/{endpoint}"
            response = await api.client.get(path, headers=headers)
            assert response.status_code == 401, (case, response.text)
            assert response.json() == {"error": response.json()["error"], "conversationId": CONVERSATION}
            assert list(response.json()) == ["error", "conversationId"]
            assert response.headers["www-authenticate"].startswith("Bearer ")
            assert ('error="invalid_token"' in response.headers["www-authenticate"]) == (reason != "missing")


async def test_valid_firebase_token_over_http(firebase: Settings, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONVERSATION, "user123", status=None)
    await sim.full_run(CONVERSATION, "someone-else", status=None)
    async for api in open_api(firebase):
        path = f"{firebase.api_prefix}/conversations/{CONVERSATION}/active-session"
        for key in (RSA, EC):
            response = await api.client.get(path, headers={"Authorization": bearer(mint(key, claims()))})
            assert response.status_code == 200, response.text
            assert response.json()["sessionId"] == run_id


async def test_firebase_rs256_and_es256_accepted(authenticator: Authenticator) -> None:
    for key in (RSA, EC):
        header = bearer(mint(key, claims()))
        identity = await authenticator.authenticate(header)
        assert identity == Identity(user_id="user123", token_hash=identity.token_hash, authorization=header)
        assert identity.token_hash and len(identity.token_hash) == 64


async def test_user_id_falls_back_to_sub(authenticator: Authenticator) -> None:
    identity = await authenticator.authenticate(bearer(mint(RSA, claims(user_id=None, sub="from-sub"))))
    assert identity.user_id == "from-sub"
    identity = await authenticator.authenticate(bearer(mint(RSA, claims(user_id="uid", sub="other"))))
    assert identity.user_id == "uid"


# A claim that is no string names no user (docs/auth.md: the first non-empty *string*).
NOT_STRINGS: list[object] = [123, 0, True, ["user123"], {"id": "user123"}, 1.5]


@pytest.mark.parametrize("value", NOT_STRINGS, ids=repr)
async def test_a_user_claim_that_is_no_string_names_no_user(
    authenticator: Authenticator, value: object
) -> None:
    refused = await rejection(authenticator, bearer(mint(RSA, claims(user_id=value, sub=None))))
    assert refused.reason == "no_user"
    # The next claim that is a string still names the user.
    identity = await authenticator.authenticate(bearer(mint(RSA, claims(user_id=value, sub="from-sub"))))
    assert identity.user_id == "from-sub"


async def test_a_user_claim_that_is_no_string_reveals_no_run_over_http(
    firebase: Settings, sim: BackendSimulator
) -> None:
    # Runs that a claim taken as text ("123", "['user123']", ...) would reveal.
    for value in NOT_STRINGS:
        await sim.full_run(CONVERSATION, str(value), f"m{len(str(value))}", status=None)
    await sim.full_run(CONVERSATION, "user123", status=None)
    async for api in open_api(firebase):
        for value in NOT_STRINGS:
            header = bearer(mint(RSA, claims(user_id=value, sub=None)))
            for endpoint in ("active-session", "task-status"):
                path = f"{firebase.api_prefix}/conversations/{CONVERSATION}/{endpoint}"
                response = await api.client.get(path, headers={"Authorization": header})
                assert response.status_code == 401, (value, endpoint, response.text)
                assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# RFC 9110 11.1: the scheme is case-insensitive; browsers and libraries send `bearer` too.
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_is_case_insensitive(
    firebase: Settings, sim: BackendSimulator, scheme: str
) -> None:
    run_id = await sim.full_run(CONVERSATION, "user123", status=None)
    async for api in open_api(firebase):
        header = f"{scheme} {mint(RSA, claims())}"
        for endpoint in ("active-session", "task-status"):
            path = f"{firebase.api_prefix}/conversations/{CONVERSATION}/{endpoint}"
            response = await api.client.get(path, headers={"Authorization": header})
            assert response.status_code == 200, (scheme, endpoint, response.text)
            assert response.json()["sessionId"] == run_id


async def test_configurable_user_claims(make_settings: MakeSettings, jwks: JwksServer) -> None:
    settings = make_settings(
        jwt_secret=None, jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_audience=PROJECT, jwt_user_claims="email"
    )
    auth = Authenticator(settings)
    await auth.start()
    try:
        identity = await auth.authenticate(bearer(mint(RSA, claims())))
        assert identity.user_id == "user123@example.com"
        assert (await rejection(auth, bearer(mint(RSA, claims(email=None))))).reason == "no_user"
    finally:
        await auth.close()


async def test_leeway_honoured_both_ways(authenticator: Authenticator) -> None:
    now = int(time.time())
    # Within the 5 s leeway: accepted.
    await authenticator.authenticate(bearer(mint(RSA, claims(exp=now - 2))))
    await authenticator.authenticate(bearer(mint(RSA, claims(nbf=now + 2, iat=now + 2))))
    # Beyond it: refused.
    assert (await rejection(authenticator, bearer(mint(RSA, claims(exp=now - 8))))).reason == "expired"
    assert (await rejection(authenticator, bearer(mint(RSA, claims(nbf=now + 8))))).reason == "not_yet_valid"


# --- static PEM key and HS256 secret modes ------------------------------------------------


@pytest.fixture
def rsa_pem(tmp_path: Path) -> str:
    path = tmp_path / "key.pem"
    path.write_bytes(RSA.public_pem())
    return str(path)


async def started(settings: Settings) -> Authenticator:
    auth = Authenticator(settings)
    await auth.start()
    return auth


async def test_static_pem_mode(make_settings: MakeSettings, rsa_pem: str) -> None:
    auth = await started(make_settings(jwt_secret=None, jwt_public_key=rsa_pem))
    plain = firebase_claims("pem-user", iss=None, aud=None)
    assert (await auth.authenticate(bearer(mint(RSA, plain, kid=None)))).user_id == "pem-user"
    assert (await auth.authenticate(bearer(mint(RSA, plain, kid="any")))).user_id == "pem-user"
    cases = {
        # The classic confusion: the verifier's own public key used as an HMAC secret.
        "hs256_with_the_pem_as_secret": (mint_hs256(RSA.public_pem(), plain), "bad_algorithm"),
        "es256_against_rsa_key": (mint(EC, plain, kid=None), "bad_algorithm"),
        "other_rsa_key": (mint(IMPOSTOR_RSA, plain, kid=None), "bad_signature"),
        "alg_none": (unsigned(plain), "bad_algorithm"),
    }
    for case, (token, reason) in cases.items():
        assert (await rejection(auth, bearer(token))).reason == reason, case
    await auth.close()


async def test_static_ec_pem_and_certificate(make_settings: MakeSettings, tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(EC.public_pem())
    auth = await started(make_settings(jwt_secret=None, jwt_public_key=str(path)))
    plain = firebase_claims("ec-user")
    assert (await auth.authenticate(bearer(mint(EC, plain, kid=None)))).user_id == "ec-user"
    assert (await rejection(auth, bearer(mint(RSA, plain, kid=None)))).reason == "bad_algorithm"
    await auth.close()


def test_unusable_static_key_is_refused_at_start(tmp_path: Path, make_settings: MakeSettings) -> None:
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="RSA or EC P-256"):
        Authenticator(make_settings(jwt_public_key=str(p384)))
    with pytest.raises(ConfigError, match="SIDECAR_JWT_PUBLIC_KEY"):
        Authenticator(make_settings(jwt_public_key=str(tmp_path / "missing.pem")))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="SIDECAR_JWT_PUBLIC_KEY"):
        load_public_key(str(garbage))


async def test_hs256_mode(make_settings: MakeSettings) -> None:
    auth = await started(make_settings(jwt_secret=SECRET))
    plain = {"user_id": "hs-user", "exp": int(time.time()) + 60}
    good = jwt.encode(plain, SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer(good))).user_id == "hs-user"
    cases = {
        "wrong_secret": (jwt.encode(plain, SECRET + "x", algorithm="HS256"), "bad_signature"),
        "rsa_public_key_as_secret": (mint_hs256(RSA.public_pem(), plain), "bad_signature"),
        "rs256_without_any_rsa_key": (mint(RSA, plain), "bad_algorithm"),
        "hs512": (jwt.encode(plain, SECRET * 2, algorithm="HS512"), "bad_algorithm"),
        "missing_exp": (jwt.encode({"user_id": "u"}, SECRET, algorithm="HS256"), "missing_claim"),
    }
    for case, (token, reason) in cases.items():
        assert (await rejection(auth, bearer(token))).reason == reason, case
    await auth.close()


async def test_all_three_modes_together(
    make_settings: MakeSettings, jwks: JwksServer, tmp_path: Path
) -> None:
    other = rsa_key("static", 2)
    pem = tmp_path / "static.pem"
    pem.write_bytes(other.public_pem())
    settings = make_settings(
        jwt_secret=SECRET,
        jwt_public_key=str(pem),
        jwks_url=jwks.url,
        jwt_issuer=ISSUER,
        jwt_audience=PROJECT,
    )
    auth = await started(settings)
    good = claims()
    assert (await auth.authenticate(bearer(mint(RSA, good)))).user_id == "user123"  # JWKS
    assert (await auth.authenticate(bearer(mint(other, good, kid=None)))).user_id == "user123"  # PEM
    assert (await auth.authenticate(bearer(mint(other, good, kid="not-in-jwks")))).user_id == "user123"
    assert (await auth.authenticate(bearer(jwt.encode(good, SECRET, algorithm="HS256")))).user_id == "user123"
    # The HMAC secret never stands in for the public keys, nor they for it.
    assert (await rejection(auth, bearer(mint_hs256(RSA.public_pem(), good)))).reason == "bad_signature"
    assert (await rejection(auth, bearer(mint(IMPOSTOR_RSA, good, kid=None)))).reason == "bad_signature"
    # iss/aud apply to every mode once configured.
    hs_wrong_aud = jwt.encode(claims(aud="x"), SECRET, algorithm="HS256")
    assert (await rejection(auth, bearer(hs_wrong_aud))).reason == "wrong_audience"
    await auth.close()


def test_jwks_without_issuer_and_audience_refuses_to_start(make_settings: MakeSettings) -> None:
    with pytest.raises(ConfigError, match="SIDECAR_JWT_ISSUER and SIDECAR_JWT_AUDIENCE"):
        make_settings(jwks_url="http://127.0.0.1:1/jwks", jwt_audience=PROJECT)
    with pytest.raises(ConfigError, match="SIDECAR_JWT_ISSUER and SIDECAR_JWT_AUDIENCE"):
        make_settings(jwks_url="http://127.0.0.1:1/jwks", jwt_issuer=ISSUER)


# --- development mode ---------------------------------------------------------------------


async def test_development_mode(make_settings: MakeSettings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="session_sidecar.auth")
    auth = await started(make_settings(development_mode=True, default_username="dev-user"))
    assert "DEVELOPMENT MODE" in caplog.text
    # No token: nothing to forward to the backend, nothing to key its answers by.
    assert await auth.authenticate(None) == Identity(user_id="dev-user", token_hash=None, authorization=None)
    # A token that is sent is verified normally, never replaced by the default user.
    assert (await rejection(auth, "Bearer garbage")).reason == "malformed"
    good = jwt.encode({"user_id": "real", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert (await rejection(auth, bearer(good))).reason == "bad_signature"
    await auth.close()


async def test_no_development_mode_means_no_default_user(authenticator: Authenticator) -> None:
    refused = await rejection(authenticator, None)
    assert refused.reason == "missing"
    assert refused.headers == {"WWW-Authenticate": 'Bearer realm="session-sidecar"'}


# --- the verified-token cache -------------------------------------------------------------


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts signature checks (`jwt.decode` calls)."""
    calls: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


async def test_polling_client_costs_one_signature_check(
    authenticator: Authenticator, decode_calls: list[str]
) -> None:
    header = bearer(mint(RSA, claims()))
    identities = [await authenticator.authenticate(header) for _ in range(50)]
    assert len(decode_calls) == 1
    assert {i.user_id for i in identities} == {"user123"}
    # Concurrent pollers too (the first check completes before the others look it up again).
    await asyncio.gather(*(authenticator.authenticate(header) for _ in range(20)))
    assert len(decode_calls) == 1


async def test_cache_off_checks_every_time(firebase: Settings, decode_calls: list[str]) -> None:
    auth = await started(msgspec.structs.replace(firebase, token_cache_size=0))
    header = bearer(mint(RSA, claims()))
    for _ in range(5):
        await auth.authenticate(header)
    assert len(decode_calls) == 5
    await auth.close()


async def test_cache_is_keyed_by_hash_and_bounded(firebase: Settings, decode_calls: list[str]) -> None:
    auth = await started(msgspec.structs.replace(firebase, token_cache_size=3))
    tokens = [mint(RSA, firebase_claims(f"user{i}")) for i in range(5)]
    for token in tokens:
        await auth.authenticate(bearer(token))
    assert len(decode_calls) == 5
    # What the authenticator holds: the hashes of the last three tokens, never a token.
    held = strings_held_by(auth)
    assert not any(token in text for token in tokens for text in held)
    assert [token_hash(token) in held for token in tokens] == [False, False, True, True, True]
    await auth.authenticate(bearer(tokens[4]))  # still cached
    assert len(decode_calls) == 5
    await auth.authenticate(bearer(tokens[0]))  # evicted: checked again
    assert len(decode_calls) == 6
    await auth.close()


def strings_held_by(root: object) -> set[str]:
    """Every string reachable from `root` through containers and the service's own objects."""
    seen: set[int] = set()
    found: set[str] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            found.add(obj)
        elif isinstance(obj, dict | list | tuple | set | frozenset) or type(obj).__module__.startswith(
            "session_sidecar"
        ):
            todo.extend(gc.get_referents(obj))
    return found


async def test_cached_entry_never_outlives_exp(make_settings: MakeSettings, jwks: JwksServer) -> None:
    settings = make_settings(
        jwt_secret=None, jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_audience=PROJECT, jwt_leeway_s=0
    )
    auth = await started(settings)
    exp = int(time.time()) + 1
    header = bearer(mint(RSA, claims(exp=exp)))
    await auth.authenticate(header)
    await asyncio.sleep(exp - time.time() + 0.05)
    assert (await rejection(auth, header)).reason == "expired"
    await auth.close()


async def test_a_rejected_token_is_not_cached(authenticator: Authenticator, decode_calls: list[str]) -> None:
    header = bearer(mint(RSA, claims(aud="other-project")))
    for _ in range(3):
        assert (await rejection(authenticator, header)).reason == "wrong_audience"
    assert len(decode_calls) == 3


def test_auth_settings_from_the_environment() -> None:
    env = {
        "SIDECAR_JWT_SECRET": SECRET,
        "SIDECAR_BACKEND_URL": "http://backend:8000",
        "SIDECAR_TOKEN_CACHE_SIZE": "0",
        "SIDECAR_JWKS_MIN_REFETCH_S": "0.5",
        "SIDECAR_JWKS_TIMEOUT_MS": "1500",
        "SIDECAR_ACCESS_CACHE_SIZE": "7",
        "SIDECAR_BACKEND_TIMEOUT_MS": "250",
    }
    settings = Settings.from_env(env)
    assert (settings.token_cache_size, settings.jwks_min_refetch_s, settings.jwks_timeout_ms) == (
        0,
        0.5,
        1500,
    )
    assert (settings.access_cache_size, settings.backend_timeout_ms) == (7, 250)
    for var, value in (("SIDECAR_TOKEN_CACHE_SIZE", "-1"), ("SIDECAR_BACKEND_TIMEOUT_MS", "0")):
        with pytest.raises(ConfigError, match=var):
            Settings.from_env({**env, var: value})
