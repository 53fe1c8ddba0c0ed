"""Errors are part of the API: the same status, shape, field and request id on every route, no stack
traces, and the Generator's failures mapped to statuses a client can act on. The app runs in-process
over a fake Generator (tests/fake_generation.py); Serve's proxy is checked in tests/e2e."""

from __future__ import annotations

import re

import pytest
from fake_generation import FakeGenerationService, demo_settings
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from serve_app.pipeline.errors import InsufficientMemoryError, InvalidTaskError

# Every POST route that takes a generation request, and the body each needs to be valid.
ROUTES = [
    "/generate",
    "/img2img",
    "/generate/prompts",
    "/generate/batch",  # the old name of /generate/prompts
    "/v1/images/generations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
]
OPENAI_ROUTES = {"/v1/images/generations"}


def assert_our_error(response, status: int, code: str) -> dict:
    """Our envelope: {"error": {"code", "message", ...}, "request_id"} with the header's request id."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return body["error"]


def assert_openai_error(response, status: int, code: str, error_type: str) -> dict:
    """OpenAI's envelope: {"error": {"message", "type", "param", "code"}} and nothing else."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["type"] == error_type and body["error"]["message"]
    assert response.headers["x-request-id"]
    return body["error"]


@pytest.mark.parametrize("path", ROUTES)
def test_malformed_json_is_400_in_the_routes_family_shape(client, generator, path):
    response = client.post(path, content=b'{"prompt": ', headers={"content-type": "application/json"})
    if path in OPENAI_ROUTES:
        assert_openai_error(response, 400, "malformed_request", "invalid_request_error")
    else:
        assert_our_error(response, 400, "malformed_request")
    assert generator.jobs == []


@pytest.mark.parametrize("body", [b"[1, 2]", b'"a string"', b"null"])
def test_json_that_is_not_an_object_is_400(client, body):
    for path in ("/generate", "/img2img"):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert_our_error(response, 400, "malformed_request")


@pytest.fixture
def small_body_client(make_client):
    service = FakeGenerationService(demo_settings(max_body_bytes=4096))
    return make_client(service), service.generator


@pytest.mark.parametrize("path", ROUTES)
def test_a_body_over_the_limit_is_413_by_its_declared_length(small_body_client, path):
    client, generator = small_body_client
    response = client.post(path, content=b"x" * 4097, headers={"content-type": "application/json"})
    if path in OPENAI_ROUTES:
        assert_openai_error(response, 413, "payload_too_large", "invalid_request_error")
    else:
        error = assert_our_error(response, 413, "payload_too_large")
        assert "larger than 4096 bytes" in error["message"]
    assert generator.jobs == []


def test_a_chunked_body_over_the_limit_is_413_and_one_at_the_limit_is_read(small_body_client):
    client, _ = small_body_client
    chunks = iter([b"x" * 3000, b"x" * 3000])  # no Content-Length: counted as it arrives
    assert_our_error(client.post("/generate", content=chunks), 413, "payload_too_large")
    padded = b'{"prompt": "x"' + b" " * (4096 - 15) + b"}"
    assert len(padded) == 4096
    assert client.post("/generate", content=padded, headers={"content-type": "application/json"}).status_code == 200


def test_unknown_routes_are_404_in_each_familys_shape(client):
    assert_our_error(client.get("/nope"), 404, "not_found")
    assert_our_error(client.post("/sdapi/v1/nope", json={}), 404, "not_found")
    assert_openai_error(client.get("/v1/nope"), 404, "not_found", "invalid_request_error")


def test_a_wrong_method_is_405_in_each_familys_shape(client):
    assert_our_error(client.put("/generate", json={}), 405, "method_not_allowed")  # GET /generate?prompt= exists
    assert_our_error(client.put("/sdapi/v1/txt2img", json={}), 405, "method_not_allowed")
    assert_openai_error(client.get("/v1/images/generations"), 405, "method_not_allowed", "invalid_request_error")


def test_a_request_id_is_made_when_absent_and_the_callers_is_kept(client, generator):
    made = client.post("/generate", json={"prompt": "x", "response_format": "json"})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert made.json()["metadata"]["request_id"] == made.headers["x-request-id"] == generator.jobs[0].request_id
    # A caller's id is kept (the header is Serve's proxy's to echo: tests/e2e/test_generate.py).
    kept = client.post("/generate", json={"prompt": "x", "width": 7}, headers={"X-Request-Id": "trace-abc"})
    assert kept.json()["request_id"] == "trace-abc"
    assert client.post("/generate", json={"prompt": "x"}, headers={"X-Request-Id": "trace-def"}).status_code == 200
    assert generator.jobs[-1].request_id == "trace-def"
    two = [client.get("/healthz").headers["x-request-id"] for _ in range(2)]
    assert two[0] != two[1]


def test_an_unexpected_failure_is_a_json_500_without_internals(client, generator):
    generator.fail_with = RuntimeError("secret internals at /srv/model.py line 12")
    response = client.post("/generate", json={"prompt": "x"}, headers={"X-Request-Id": "rid-500"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error"},
        "request_id": "rid-500",
    }
    assert "secret" not in response.text
    openai = client.post("/v1/images/generations", json={"prompt": "x"})
    assert_openai_error(openai, 500, "internal_error", "server_error")


@pytest.mark.parametrize(
    ("failure", "status", "code", "field"),
    [
        (InvalidTaskError("strength: leaves no denoising step", "strength"), 422, "invalid_request", "strength"),
        (InsufficientMemoryError("one 4096x4096 image does not fit"), 507, "insufficient_memory", None),
    ],
)
def test_generation_errors_keep_their_status_code_and_field(client, generator, failure, status, code, field):
    generator.fail_with = failure
    error = assert_our_error(client.post("/generate", json={"prompt": "x"}), status, code)
    assert error.get("field") == field and error["message"] == failure.message


def test_generator_backpressure_is_503_with_retry_after(client, generator, service):
    generator.fail_with = BackPressureError(num_queued_requests=8, max_queued_requests=8)
    response = client.post("/generate", json={"prompt": "x"})
    error = assert_our_error(response, 503, "overloaded")
    assert "backpressure" in error["message"]
    assert response.headers["retry-after"] == str(service.published_limits.retry_after_s)
    generator.fail_with = BackPressureError(num_queued_requests=8, max_queued_requests=8, retry_after_s=4.4)
    assert client.post("/generate", json={"prompt": "x"}).headers["retry-after"] == "4"


def test_a_dead_generator_replica_is_503_generator_unavailable(client, generator):
    generator.fail_with = RayActorError()
    response = client.post("/generate", json={"prompt": "x"})
    error = assert_our_error(response, 503, "generator_unavailable")
    assert "retry" in error["message"] and response.headers["retry-after"].isdigit()
    on_v1 = client.post("/v1/images/generations", json={"prompt": "x"})
    assert_openai_error(on_v1, 503, "generator_unavailable", "server_error")


def test_a_request_past_its_deadline_is_504_and_its_unfinished_jobs_are_cancelled(client, generator):
    generator.hang = True
    response = client.post("/generate", json={"prompt": "x", "num_images": 3}, headers={"X-Request-Timeout": "0.2"})
    error = assert_our_error(response, 504, "timeout")
    assert "0.2s" in error["message"]
    assert len(generator.jobs) == 3 and generator.cancelled == generator.jobs


def test_when_one_image_fails_the_requests_other_images_are_cancelled(client, generator):
    """A request is answered as a whole: once one of its images failed, the rest is dropped, not computed."""
    generator.fail_with = lambda job: InvalidTaskError("prompt: cannot", "prompt") if job.seed == 5 else None
    generator.hang = lambda job: job.seed != 5
    response = client.post("/generate", json={"prompt": "x", "seed": 5, "num_images": 3})
    assert assert_our_error(response, 422, "invalid_request")["field"] == "prompt"
    assert [job.seed for job in generator.cancelled] == [6, 7]


def test_openapi_documents_every_route_with_examples(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    public = [*ROUTES, "/v1/images/edits", "/v1/models", "/healthz", "/readyz", "/info", "/sdapi/v1/samplers"]
    assert set(public) <= set(paths), set(public) - set(paths)
    for path in ["/generate", "/generate/batch", "/v1/images/generations", "/sdapi/v1/txt2img"]:
        schema_ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
        assert schema.get("examples"), path
    img2img = paths["/img2img"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(img2img)
    assert "init_image" in img2img["multipart/form-data"]["schema"]["properties"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_openapi_documents_image_edits_as_multipart(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data"}
    schema = spec["components"]["schemas"][content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"image", "prompt", "strength"} <= set(schema["properties"])
