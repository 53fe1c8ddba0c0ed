"""API keys and CORS as create_api composes them, over a fake Generator (no Ray). Keys read from the
file a Serve config names, on the replica, through Serve's proxy: tests/e2e/test_auth.py."""

from __future__ import annotations

import openai
import pytest
from fake_generation import FakeGenerationService
from harness import load_config

from serve_app.config import AppArgs

KEYS = ["key-one", "key-two"]
ALLOWED_ORIGIN = "http://allowed.test"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture
def secured(make_client):
    """The demo settings with API keys on (as an Ingress that read KEYS) and one allowed origin."""
    args = load_config()["applications"][0]["args"]
    args.update(auth={"api_keys_env": "SD_TEST_KEYS"}, cors={"allow_origins": [ALLOWED_ORIGIN]})
    service = FakeGenerationService(AppArgs.model_validate(args))
    return make_client(service, api_keys=KEYS), service.generator


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_no_key_is_401_with_a_bearer_challenge_before_any_work(secured):
    http, generator = secured
    response = http.post("/generate", json={"prompt": "x"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "missing_api_key"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert http.post("/generate", json={"prompt": "x"}, headers={"Authorization": "Basic key-one"}).status_code == 401
    assert generator.jobs == []


def test_a_wrong_key_is_403(secured):
    http, generator = secured
    response = http.post("/generate", json={"prompt": "x"}, headers=bearer("key-three"))
    assert response.status_code == 403 and response.json()["error"]["code"] == "invalid_api_key"
    assert generator.jobs == []


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(secured, key):
    http, generator = secured
    assert http.post("/generate", json={"prompt": "x"}, headers=bearer(key)).status_code == 200
    assert http.get("/info", headers=bearer(key)).json()["auth"] is True
    assert len(generator.jobs) == 1


def test_probes_docs_and_the_page_stay_open_and_everything_else_is_closed(secured):
    http, _ = secured
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/", "/web/app.js"):
        assert http.get(path).status_code == 200, path
    for path in ("/info", "/v1/models", "/sdapi/v1/samplers"):
        assert http.get(path).status_code == 401, path


def test_the_openai_client_sends_its_api_key(secured):
    http, _ = secured
    good = openai.OpenAI(base_url="http://testserver/v1", api_key=KEYS[0], http_client=http, max_retries=0)
    assert len(good.images.generate(prompt="x").data) == 1
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=http, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        bad.images.generate(prompt="x")
    assert info.value.body["type"] == "authentication_error" and info.value.body["code"] == "invalid_api_key"


def test_cors_allows_only_the_configured_origin(secured):
    http, _ = secured
    allowed = http.options("/generate", headers={"Origin": ALLOWED_ORIGIN, **PREFLIGHT})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = http.options("/generate", headers={"Origin": "http://evil.test", **PREFLIGHT})
    assert "access-control-allow-origin" not in other.headers
    actual = http.post("/generate", json={"prompt": "x"}, headers={"Origin": ALLOWED_ORIGIN, **bearer(KEYS[0])})
    assert actual.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip().lower() for h in actual.headers["access-control-expose-headers"].split(",")}
    assert {"x-seed", "x-batch-size", "x-request-id", "retry-after"} <= exposed


def test_cors_is_off_unless_configured(client):
    """The demo config names no origins: no CORS headers at all."""
    response = client.post("/generate", json={"prompt": "x"}, headers={"Origin": ALLOWED_ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = client.options("/generate", headers={"Origin": ALLOWED_ORIGIN, **PREFLIGHT})
    assert "access-control-allow-origin" not in preflight.headers
