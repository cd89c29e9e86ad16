"""The JSON API against its own `/openapi.json`, fuzzed by Schemathesis: no server error, every
response as documented, and every refusal in the one documented shape
`{"detail": str, "errors": [{"field", "code", "message"}]}`.

The app runs in process, on the real dev server (valid random submissions start real
workflows). Hypothesis drives Schemathesis in a worker thread while the app answers on the
test's own event loop, where the session's worker and Temporal client live; so shrinking and
the usual Hypothesis reports work as in any property test.
"""

from __future__ import annotations

import asyncio
import json
import unicodedata
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devstack.factories import submission_data
from devstack.settings import SETTINGS
from starter.web import create_app
from tests.conftest import Live
from tests.web.test_web import asgi_client, claim_of
from workflows.models.program import ProgramRules

EXAMPLES = 120  # over both operations and both modes; a few seconds on the dev server
BASE_URL = "http://testserver"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    # Schema-valid data may still be refused (a website without a domain, a public-sector
    # prospect: rules a JSON schema cannot say), so there is no positive_data_acceptance;
    # but what the schema forbids must never be accepted.
    negative_data_rejection,
]


def assert_documented_refusal(response: httpx.Response) -> None:
    body = response.json()
    # A refused duplicate adds the signed receipt of its refusal (docs/receipts.md).
    expected = {"detail", "errors", "receipt"} if response.status_code == 409 else set()
    assert set(body) in ({"detail", "errors"}, expected), body
    if "receipt" in body:
        assert body["receipt"]["kind"] == "refused_duplicate"
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["errors"], list)
    for error in body["errors"]:
        assert set(error) == {"field", "code", "message"}, error
        assert all(isinstance(error[k], str) and error[k] for k in ("field", "code", "message"))


def httpx_arguments(case: Case) -> dict[str, Any]:
    """What Schemathesis would send with `requests`, spelled for httpx."""
    sent = case.as_transport_kwargs(base_url=BASE_URL)
    arguments: dict[str, Any] = {
        k: sent[k] for k in ("method", "url", "headers", "params") if k in sent
    }
    if sent.get("cookies"):
        arguments["cookies"] = sent["cookies"]
    if "json" in sent:
        arguments["json"] = sent["json"]
    elif sent.get("data") is not None:
        data = sent["data"]
        arguments["content" if isinstance(data, bytes | str) else "data"] = data
    return arguments


SITE = "fuzz-duplicate.example"
# What a JSON schema cannot say: these make a schema-valid submission acceptable.
ACCEPTABLE = {
    "referrer": {"email": "fuzz@referrer.example", "language": "en"},
    "prospect": {"country": "FR", "sector": "private"},
    "contact": {"email": "fuzz@prospect.example"},
    "opportunity": {"product": "cloudsuite-financials", "currency": "EUR"},
}


def _printable(value: Any) -> Any:
    """Without the control characters the intake refuses (Schemathesis loves NUL)."""
    if not isinstance(value, str):
        return value
    kept = "".join(c for c in value if unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp"))
    return kept if kept.strip() else "x"


def repaired(case: Case, site: str, printable: bool) -> Case:
    """A random schema-valid submission, made acceptable where only rules decide; every other
    text stays as generated (any Unicode, any length the schema allows; control characters
    kept or removed), so accepted referrals, whatever their names and notes, really start
    workflows."""
    if not isinstance(case.body, dict):
        return case
    body: dict[str, Any] = {**case.body, "consent": True}
    for section, values in ACCEPTABLE.items():
        given = body.get(section)
        fields: dict[str, Any] = dict(given) if isinstance(given, dict) else {}
        if printable:
            fields = {key: _printable(value) for key, value in fields.items()}
        body[section] = {**fields, **values}
    body["prospect"]["website"] = site
    body["opportunity"].pop("estimated_annual_value", None)
    case.body = body
    return case


# Schemathesis 4 itself draws from `random` in a few strategies; Hypothesis warns about it.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"
)
async def test_the_api_keeps_to_its_openapi_document(live: Live, rules: ProgramRules) -> None:
    app = create_app(
        SETTINGS, rules=rules, engine=live.engine, client=live.client, rate_limit="off"
    )
    loop = asyncio.get_running_loop()
    statuses: list[int] = []
    async with asgi_client(app) as web:
        document = (await web.get("/openapi.json")).json()
        schema = schemathesis.openapi.from_dict(document)
        submit, health = schema["/api/referrals"]["POST"], schema["/healthz"]["GET"]
        acceptable = st.builds(
            repaired,
            submit.as_strategy(generation_mode=GenerationMode.POSITIVE),
            st.uuids().map(lambda u: f"fuzz-{u.hex[:12]}.example") | st.just(SITE),
            st.booleans(),
        )
        strategy = st.one_of(
            submit.as_strategy(generation_mode=GenerationMode.POSITIVE),
            submit.as_strategy(generation_mode=GenerationMode.NEGATIVE),
            acceptable,
            acceptable,
            health.as_strategy(),
        )

        def call(case: Case) -> httpx.Response:
            sent = asyncio.run_coroutine_threadsafe(web.request(**httpx_arguments(case)), loop)
            return sent.result(timeout=60)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(strategy)
        def check(case: Case) -> None:
            response = call(case)
            statuses.append(response.status_code)
            assert response.status_code < 500, response.text
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                assert_documented_refusal(response)

        await asyncio.to_thread(check)
    print(f"{len(statuses)} requests, statuses {sorted(Counter(statuses).items())}")
    assert len(statuses) >= EXAMPLES // 2
    assert {200, 201, 409, 422} <= set(statuses), sorted(set(statuses))


def _with_company(raw_json_string: str) -> bytes:
    """A valid submission whose prospect's company is `raw_json_string`, as written in JSON."""
    text = json.dumps(submission_data(**{"prospect.company": "COMPANY"}))
    return text.replace('"COMPANY"', raw_json_string).encode()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[" * 50_000 + b"]" * 10_000, "application/json"),  # nested deeper than Python's stack
        (_with_company(r'"Acme \ud800"'), "application/json"),  # no UTF-8 text can hold it
        (b"\xff\xfe not utf-8", "application/json"),
        (b"", "application/json"),
    ],
    ids=["deep", "surrogate", "not-utf8", "empty"],
)
async def test_malformed_bodies_get_the_documented_refusal(
    live: Live, rules: ProgramRules, body: bytes, content_type: str
) -> None:
    app = create_app(
        SETTINGS, rules=rules, engine=live.engine, client=live.client, rate_limit="off"
    )
    async with asgi_client(app) as web:
        response = await web.post(
            "/api/referrals", content=body, headers={"content-type": content_type}
        )
    assert response.status_code == 422, response.text
    assert_documented_refusal(response)
    if body.startswith(b'{"referrer"'):
        assert [e["field"] for e in response.json()["errors"]] == ["prospect.company"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded", None],
)
async def test_only_a_json_body_starts_a_referral(
    live: Live, rules: ProgramRules, content_type: str | None
) -> None:
    """A page on another site can post text/plain here without a CORS preflight; the body
    below is a valid submission, and still nothing starts."""
    site = f"https://cross-site-{uuid.uuid4().hex[:8]}.example"
    body = json.dumps(submission_data(**{"prospect.website": site})).encode()
    app = create_app(
        SETTINGS, rules=rules, engine=live.engine, client=live.client, rate_limit="off"
    )
    headers = {"origin": "https://elsewhere.example"}
    if content_type is not None:
        headers["content-type"] = content_type
    async with asgi_client(app) as web:
        response = await web.post("/api/referrals", content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert_documented_refusal(response)
    assert response.json()["errors"][0]["code"] == "media_type"
    assert claim_of(live, site) is None
