"""The client's own logic against scripted HTTP answers: retries, errors, headers, request bodies.

What the real server answers is checked in tests/e2e/test_client.py.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import time

import httpx
import pytest
from PIL import Image

from serve_app.client import (
    AsyncSDClient,
    RetryPolicy,
    SDClient,
    SDServeConnectionError,
    SDServeError,
    SDServeTimeout,
    retry_after_seconds,
)


def _png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


GENERATED = {
    "images": [{"b64": base64.b64encode(_png()).decode(), "seed": 5, "media_type": "image/png", "batch_size": 3}],
    "metadata": {
        "prompt": "p",
        "negative_prompt": "",
        "width": 8,
        "height": 8,
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "scheduler": "default",
        "seeds": [5],
        "model": "synthetic:tiny",
        "batch_size": 3,
        "generation_time_s": 0.01,
        "request_id": "rid-1",
        "warnings": ["prompt truncated"],
        "a_field_from_a_newer_server": True,
    },
}


def busy(retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"code": "overloaded", "message": "too many requests queued"}, "request_id": "rid-busy"}
    return httpx.Response(503, json=body, headers=headers)


class Scripted:
    """A transport that answers with the given responses in order and records the requests."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sync_client(self, **kwargs) -> tuple[SDClient, list[float]]:
        slept: list[float] = []
        client = SDClient("http://sd.test", transport=httpx.MockTransport(self), sleep=slept.append, **kwargs)
        return client, slept


def test_503_is_retried_honouring_retry_after():
    server = Scripted(busy("2"), busy("1"), httpx.Response(200, json=GENERATED))
    sd, slept = server.sync_client()
    result = sd.generate("p")
    assert len(server.requests) == 3 and result.seeds == [5]
    # The server's wait plus at most 10% jitter, so told clients do not return in lockstep.
    assert 2 <= slept[0] <= 2.2 and 1 <= slept[1] <= 1.1


def test_retries_are_bounded_and_the_last_503_is_raised():
    server = Scripted(busy("0"))
    sd, slept = server.sync_client(retry=RetryPolicy(max_retries=2))
    with pytest.raises(SDServeError) as caught:
        sd.generate("p")
    assert len(server.requests) == 3 and len(slept) == 2
    error = caught.value
    assert (error.status, error.code, error.request_id, error.retry_after_s) == (503, "overloaded", "rid-busy", 0)
    assert "too many requests queued" in str(error)


def test_server_retry_after_is_capped():
    server = Scripted(busy("3600"), httpx.Response(200, json=GENERATED))
    sd, slept = server.sync_client(retry=RetryPolicy(max_wait_s=5))
    sd.generate("p")
    assert 5 <= slept[0] <= 5.5


def test_without_retry_after_the_wait_doubles_with_full_jitter():
    policy = RetryPolicy(backoff_s=0.5, max_wait_s=3)
    assert [policy.delay_s(n, None, rand=lambda: 1.0) for n in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert policy.delay_s(2, None, rand=lambda: 0.25) == 0.5
    assert policy.delay_s(0, 2.0, rand=lambda: 0.0) == 2.0  # the server said when


def test_retry_after_as_seconds_or_http_date():
    assert retry_after_seconds("7") == 7 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 50 <= retry_after_seconds(in_a_minute) <= 61


@pytest.mark.parametrize("status", [400, 422, 500, 504, 507])
def test_other_errors_are_raised_at_once_with_the_servers_fields(status):
    body = {
        "error": {"code": "invalid_request", "message": "width: must be between 64 and 256", "field": "width"},
        "request_id": "rid-7",
    }
    server = Scripted(httpx.Response(status, json=body))
    sd, slept = server.sync_client()
    with pytest.raises(SDServeError) as caught:
        sd.generate("p", width=512)
    assert len(server.requests) == 1 and not slept
    error = caught.value
    assert (error.status, error.code, error.field, error.request_id) == (status, "invalid_request", "width", "rid-7")
    assert error.message == "width: must be between 64 and 256"
    assert str(error) == f"{status} invalid_request: width: must be between 64 and 256 (request rid-7)"


def test_an_error_that_is_not_our_json_keeps_its_text_and_request_id():
    server = Scripted(httpx.Response(502, text="Bad gateway from the proxy", headers={"X-Request-Id": "rid-9"}))
    sd, _ = server.sync_client()
    with pytest.raises(SDServeError) as caught:
        sd.info()
    assert (caught.value.status, caught.value.code, caught.value.request_id) == (502, "http_502", "rid-9")
    assert caught.value.message == "Bad gateway from the proxy"


def test_a_time_out_is_its_own_error():
    server = Scripted(httpx.ReadTimeout("timed out"))
    sd, _ = server.sync_client()
    with pytest.raises(SDServeTimeout, match="no answer from http://sd.test in time"):
        sd.generate("p")


def test_streams_raise_the_clients_own_errors_when_the_server_cannot_be_reached():
    server = Scripted(httpx.ConnectError("connection refused"))
    sd, _ = server.sync_client()
    with pytest.raises(SDServeConnectionError, match="http://sd.test"):
        list(sd.stream("p"))
    with pytest.raises(SDServeConnectionError, match="http://sd.test"):
        list(sd.events("job-1"))
    with pytest.raises(SDServeTimeout):
        list(Scripted(httpx.ReadTimeout("timed out")).sync_client()[0].events("job-1"))


def _job_view(status: str) -> dict:
    return {
        "id": "job-1", "status": status, "created_at": 1.0, "kind": "txt2img", "model": "m",
        "params": {"prompt": "p"}, "seeds": [5], "urls": {},
    }  # fmt: skip


def _sse(*kinds: str) -> httpx.Response:
    body = "".join(f'event: {kind}\ndata: {{"id": "job-1"}}\n\n' for kind in kinds)
    return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})


def test_waiting_on_a_job_follows_it_again_when_its_stream_ends_first():
    # The first stream ends after "running" (as a proxy's idle time-out would end it); the job is read,
    # still running, and followed again until its final event.
    answers = {
        "/jobs/job-1/events": [_sse("running"), _sse("progress", "succeeded")],
        "/jobs/job-1": [
            httpx.Response(200, json=_job_view("running")),
            httpx.Response(200, json=_job_view("succeeded")),
        ],
    }

    def server(request: httpx.Request) -> httpx.Response:
        return answers[request.url.path].pop(0)

    progress, slept = [], []
    sd = SDClient("http://sd.test", transport=httpx.MockTransport(server), sleep=slept.append)
    job = sd.wait("job-1", on_progress=progress.append)
    assert job.status == "succeeded" and len(progress) == 1 and len(slept) == 1  # paused before following again
    assert answers == {"/jobs/job-1/events": [], "/jobs/job-1": []}

    answers["/jobs/job-1/events"] = [_sse("queued"), _sse("canceled")]
    answers["/jobs/job-1"] = [
        httpx.Response(200, json=_job_view("queued")),
        httpx.Response(200, json=_job_view("canceled")),
    ]

    async def wait_async():
        async def no_pause(seconds):
            pass

        async with AsyncSDClient("http://sd.test", transport=httpx.MockTransport(server), sleep=no_pause) as sd:
            return await sd.wait("job-1")

    assert asyncio.run(wait_async()).status == "canceled"


def test_generate_sends_only_what_was_set_and_decodes_the_answer():
    server = Scripted(httpx.Response(200, json=GENERATED))
    sd, _ = server.sync_client()
    result = sd.generate("p", seed=5, width=64, num_images=1, output_format="webp")
    sent = json.loads(server.requests[0].content)
    assert sent == {
        "prompt": "p",
        "seed": 5,
        "width": 64,
        "num_images": 1,
        "output_format": "webp",
        "response_format": "json",
    }
    assert result.image.size == (8, 8) and result.images[0].data == _png()
    assert result.request_id == "rid-1" and result.warnings == ["prompt truncated"]
    assert result.images[0].batch_size == 3 and result.metadata.model == "synthetic:tiny"


def test_img2img_takes_a_path_bytes_or_a_pil_image(tmp_path):
    path = tmp_path / "init.png"
    path.write_bytes(_png())
    server = Scripted(httpx.Response(200, json=GENERATED))
    sd, _ = server.sync_client()
    for init in (path, str(path), _png(), Image.open(io.BytesIO(_png()))):
        sd.img2img("p", init, strength=0.5)
    sent = [json.loads(r.content) for r in server.requests]
    decoded = [Image.open(io.BytesIO(base64.b64decode(s["init_image"]))) for s in sent]
    assert all(d.size == (8, 8) and d.getpixel((0, 0)) == (200, 10, 10) for d in decoded)
    assert all(s["strength"] == 0.5 for s in sent)


def test_batch_sends_prompts_or_requests():
    server = Scripted(httpx.Response(200, json={"results": [GENERATED, GENERATED], "request_id": "b"}))
    sd, _ = server.sync_client()
    assert len(sd.batch(["a", "b"], seed=1, width=None)) == 2
    sd.batch(["a", {"prompt": "b", "num_images": 2}], num_inference_steps=3)
    first, second = (json.loads(r.content) for r in server.requests)
    assert first == {"prompts": ["a", "b"], "seed": 1, "response_format": "json"}
    assert second["requests"] == [{"prompt": "a"}, {"prompt": "b", "num_images": 2}]
    assert second["num_inference_steps"] == 3


def test_api_key_is_sent_as_a_bearer_token_from_the_argument_or_the_environment(monkeypatch):
    server = Scripted(httpx.Response(200, json={"status": "ok"}))
    SDClient("http://sd.test", api_key="k1", transport=httpx.MockTransport(server)).live()
    monkeypatch.setenv("SD_SERVE_API_KEY", "k2")
    SDClient("http://sd.test", transport=httpx.MockTransport(server)).live()
    monkeypatch.delenv("SD_SERVE_API_KEY")
    SDClient("http://sd.test", transport=httpx.MockTransport(server)).live()
    assert [r.headers.get("authorization") for r in server.requests] == ["Bearer k1", "Bearer k2", None]


def test_url_comes_from_the_argument_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv("SD_SERVE_URL", raising=False)
    assert SDClient().base_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("SD_SERVE_URL", "http://10.0.0.5:9000/")
    assert SDClient().base_url == "http://10.0.0.5:9000"
    assert SDClient("http://h:1").base_url == "http://h:1"


def test_readiness_is_true_false_or_unknown_without_readyz():
    answers = {"/readyz": [200, 503, 404]}

    def handler(request):
        if request.url.path == "/readyz":
            return httpx.Response(answers["/readyz"].pop(0))
        return httpx.Response(200, json={"status": "ok"} if request.url.path == "/healthz" else {"model": "m"})

    sd = SDClient("http://sd.test", transport=httpx.MockTransport(handler))
    assert [sd.ready(), sd.ready(), sd.ready()] == [True, False, None]
    answers["/readyz"] = [503]
    report = sd.health()
    assert (report.live, report.ready, report.info) == (True, False, {"model": "m"})


def test_async_client_retries_and_raises_the_same_way():
    server = Scripted(busy("1"), httpx.Response(200, json=GENERATED))
    slept: list[float] = []

    async def sleep(seconds):
        slept.append(seconds)

    async def scenario():
        transport = httpx.MockTransport(server)
        async with AsyncSDClient("http://sd.test", api_key="k", transport=transport, sleep=sleep) as sd:
            result = await sd.generate("p")
            server.answers = [httpx.Response(422, json={"error": {"code": "invalid_request", "message": "m"}})]
            with pytest.raises(SDServeError) as caught:
                await sd.generate("p")
            return result, caught.value

    result, error = asyncio.run(scenario())
    assert result.seeds == [5] and 1 <= slept[0] <= 1.1 and error.status == 422
    assert all(r.headers["authorization"] == "Bearer k" for r in server.requests)


def test_the_model_and_lora_adapters_go_in_the_body_and_unset_ones_stay_out():
    server = Scripted(httpx.Response(200, json=GENERATED))
    sd, _ = server.sync_client()
    sd.generate("p", model="sd-turbo", loras={"ink": 0.8, "neon": 1.0})
    sd.generate("p")
    named, plain = (json.loads(request.content) for request in server.requests)
    assert named["model"] == "sd-turbo" and named["loras"] == [
        {"name": "ink", "scale": 0.8},
        {"name": "neon", "scale": 1.0},
    ]
    assert "model" not in plain and "loras" not in plain
