"""Errors everywhere the same: status, shape, field, request id, no stack traces."""

from __future__ import annotations

import pytest

ROUTES = [
    "/generate",
    "/img2img",
    "/generate/batch",
    "/v1/images/generations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
]


@pytest.mark.parametrize("path", ROUTES)
def test_malformed_json_is_400_everywhere(client, path):
    response = client.post(path, content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["x-request-id"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize("path", ROUTES)
def test_a_body_over_the_limit_is_413_before_it_is_read(client, path):
    big = b"x" * (20 * 2**20 + 1)
    response = client.post(path, content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "larger than" in response.text and response.headers["x-request-id"]


def test_a_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(21):
            yield b"x" * 2**20

    response = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_wrong_method_and_unknown_route(client):
    assert client.get("/generate").status_code == 405
    response = client.get("/v1/nope")
    assert response.status_code == 404 and "message" in response.json()["error"]  # OpenAI shape under /v1


def test_client_request_id_is_kept(client):
    response = client.post("/generate", json={"prompt": "x", "width": 7}, headers={"X-Request-Id": "trace-abc"})
    assert response.headers["x-request-id"] == "trace-abc" == response.json()["request_id"]


def test_openapi_documents_every_route_with_examples(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in [*ROUTES, "/v1/images/edits", "/v1/models", "/healthz", "/info", "/sdapi/v1/samplers"]:
        assert path in paths, path
    for path in ["/generate", "/generate/batch", "/v1/images/generations", "/sdapi/v1/txt2img"]:
        schema_ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
        assert schema.get("examples"), path
    img2img = paths["/img2img"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(img2img)
    assert client.get("/docs").status_code == 200
