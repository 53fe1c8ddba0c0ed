"""API keys and CORS against real Serve. Keys come from a file the config names."""

from __future__ import annotations

import httpx
import openai
import pytest
from harness import load_config

KEYS = ("key-one", "key-two")
ALLOWED_ORIGIN = "http://allowed.test"


@pytest.fixture(scope="module")
def secured_server(serve_cluster, tmp_path_factory) -> str:
    keys_file = tmp_path_factory.mktemp("auth") / "api-keys"
    keys_file.write_text("# test keys\n" + "\n".join(KEYS) + "\n")
    config = load_config()
    config["applications"][0]["args"].update(
        auth={"api_keys_file": str(keys_file)}, cors={"allow_origins": [ALLOWED_ORIGIN]}
    )
    serve_cluster.deploy(config)
    yield serve_cluster.url
    serve_cluster.deploy(load_config())


@pytest.fixture
def http(secured_server):
    with httpx.Client(base_url=secured_server, timeout=60) as client:
        yield client


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_no_key_is_401_with_a_bearer_challenge(http):
    response = http.post("/generate", json={"prompt": "x"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "missing_api_key" and response.headers["x-request-id"]


def test_a_wrong_key_is_403(http):
    response = http.post("/generate", json={"prompt": "x"}, headers=bearer("key-three"))
    assert response.status_code == 403 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(http, key):
    assert http.post("/generate", json={"prompt": "x"}, headers=bearer(key)).status_code == 200
    assert http.get("/info", headers=bearer(key)).json()["auth"] is True


def test_probes_and_docs_stay_open(http):
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert http.get(path).status_code == 200, path
    assert http.get("/info").status_code == 401


def test_openai_client_uses_its_api_key(secured_server):
    good = openai.OpenAI(base_url=f"{secured_server}/v1", api_key=KEYS[0], max_retries=0)
    assert len(good.images.generate(prompt="x").data) == 1
    bad = openai.OpenAI(base_url=f"{secured_server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        bad.images.generate(prompt="x")
    assert info.value.body["type"] == "authentication_error"


def test_cors_allows_only_the_configured_origin(http):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = http.options("/generate", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = http.options("/generate", headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in other.headers
    actual = http.post("/generate", json={"prompt": "x"}, headers={"Origin": ALLOWED_ORIGIN, **bearer(KEYS[0])})
    assert actual.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-seed" in actual.headers["access-control-expose-headers"].lower()


def test_cors_is_off_unless_configured(serve_cluster, demo_server):
    """The demo config names no origins: no CORS headers at all."""
    with httpx.Client(base_url=demo_server, timeout=60) as plain:
        response = plain.post("/generate", json={"prompt": "x"}, headers={"Origin": ALLOWED_ORIGIN})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
