"""What Serve's HTTP proxy adds to or must pass through from the app: request ids, early 413s,
deadlines. The app's own answers are checked without Ray in tests/unit/test_routes_*.py."""

from __future__ import annotations

import re


def test_the_callers_request_id_comes_back_in_the_header_and_the_body(client):
    ok = client.post("/generate", json={"prompt": "x", "response_format": "json"}, headers={"X-Request-Id": "t-1"})
    assert ok.headers["x-request-id"] == "t-1" == ok.json()["metadata"]["request_id"]
    error = client.post("/generate", json={"prompt": "x", "width": 7}, headers={"X-Request-Id": "t-2"})
    assert error.status_code == 422
    assert error.headers["x-request-id"] == "t-2" == error.json()["request_id"]
    assert error.headers.get_list("x-request-id") == ["t-2"]  # stamped once, not by the proxy and the app


def test_without_one_the_proxys_request_id_is_the_one_the_app_reports(client):
    first, second = (client.post("/generate", json={"prompt": "x", "response_format": "json"}) for _ in range(2))
    for response in (first, second):
        assert response.headers.get_list("x-request-id") == [response.json()["metadata"]["request_id"]]
        assert re.fullmatch(r"[\w-]{8,}", response.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_an_oversized_body_is_refused_through_the_proxy(client):
    big = b"x" * (20 * 2**20 + 1)  # the demo's max_body_bytes is 20 MiB
    declared = client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "larger than" in declared.json()["error"]["message"]

    def chunks():
        for _ in range(21):
            yield b"x" * 2**20

    chunked = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "payload_too_large"
    assert chunked.headers["x-request-id"] == chunked.json()["request_id"]
