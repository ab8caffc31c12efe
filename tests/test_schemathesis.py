"""schemathesis against the running service's own `/openapi.json`: in development mode
with a valid HS256 token, a few hundred generated requests, no 5xx, and every status,
content type, header and body as the schema says."""

from __future__ import annotations

import asyncio
import string
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.generation.case import Case
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import TEST_SECRET, auth
from tests.live_server import serve_in_thread

# Hypothesis tries short strings first: give every one-character id a run, so that
# successful answers are generated and checked against their schemas too.
SEEDED = [*string.ascii_letters, *string.digits, "-", "_", "00", "0-0", "conv-1"]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


async def _seed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    sim = BackendSimulator(client)
    for i, conv in enumerate(SEEDED):
        await sim.full_run(conv, "dev", f"m{i}", status=None if i % 2 else "completed", chunks=1)
    await client.aclose()


@pytest.fixture(scope="module")
def sidecar_schema(redis_url: str) -> Iterator[BaseSchema]:
    asyncio.run(_seed(redis_url))
    # Development mode, where a token that is sent is still verified; no policy named:
    # single-user, as the backend's development mode is.
    settings = Settings(
        redis_url=redis_url, jwt_secret=TEST_SECRET, development_mode=True, default_username="dev"
    )
    settings.validate()
    with serve_in_thread(settings) as (base_url, _):
        yield schemathesis.openapi.from_url(f"{base_url}/openapi.json")


def test_every_answer_matches_the_schema(sidecar_schema: BaseSchema) -> None:
    # schemathesis's own pytest integration (`from_fixture`) does not run on pytest 9, so
    # its cases are drawn from the schema's strategies with plain Hypothesis.
    headers = auth("dev")
    statuses: Counter[int] = Counter()
    valid = sidecar_schema.as_strategy(GenerationMode.POSITIVE)
    invalid = sidecar_schema.as_strategy(GenerationMode.NEGATIVE)

    @given(case=st.one_of(valid, invalid))
    @hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Case[Any]) -> None:
        # Only the token: older schemathesis versions' negative cases add headers that are not
        # HTTP at all, which uvicorn refuses (text/plain 400) before the service sees them.
        case.headers.clear()
        case.headers.update(headers)
        # A bounded wait: an operation that streams (SSE) must fail here, not hang the suite.
        response = case.call_and_validate(checks=CHECKS, timeout=10)
        statuses[response.status_code] += 1

    check()
    print(f"schemathesis: {sum(statuses.values())} cases, statuses {dict(statuses)}")
    # A run that never met a successful answer or a refusal would have checked too little.
    assert {200, 400, 404} <= set(statuses), statuses
