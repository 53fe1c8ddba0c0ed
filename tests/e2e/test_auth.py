"""API keys and CORS through real Serve, configured the way an operator does it: the Serve config names a keys
file, which the Ingress replica reads when it starts (harness.with_tenants: test_fairness's variant too). How the
middleware answers (401/403, open probes, the openai client, CORS rules): tests/unit/test_routes_auth.py."""

from __future__ import annotations

import httpx
import pytest
from harness import ALLOWED_ORIGIN, PLAIN_KEYS


@pytest.fixture
def http(tenants_server):
    with httpx.Client(base_url=tenants_server, timeout=60) as client:
        yield client


def test_without_a_key_generation_is_refused_and_probes_stay_open(http):
    response = http.post("/generate", json={"prompt": "x"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert (
        http.post("/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer key-three"}).status_code == 403
    )
    assert http.get("/info").status_code == 401
    assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_every_key_in_the_file_works(http, key):
    response = http.post("/generate", json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert http.get("/info", headers={"Authorization": f"Bearer {key}"}).json()["auth"] is True


def test_a_cors_preflight_through_the_proxy(http):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = http.options("/generate", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = http.options("/generate", headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in other.headers
