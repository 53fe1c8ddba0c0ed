"""The client's own logic against scripted HTTP answers: retries, errors, headers, request bodies,
following jobs. Every scenario runs on both clients, SDClient and AsyncSDClient.

What the real server answers is checked in tests/e2e/test_client.py.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import inspect
import io
import json
import time
from collections.abc import Callable

import httpx
import pytest
from PIL import Image

from serve_app.client import (
    REFOLLOW_PAUSE_S,
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


def generated() -> httpx.Response:
    return httpx.Response(200, json=GENERATED)


def _job_view(status: str, images: list[dict] | None = None) -> dict:
    return {
        "id": "job-1", "status": status, "created_at": 1.0, "kind": "txt2img", "model": "m",
        "params": {"prompt": "p"}, "seeds": [5, 6], "urls": {}, "images": images or [],
    }  # fmt: skip


def job(status: str, images: list[dict] | None = None) -> httpx.Response:
    return httpx.Response(200, json=_job_view(status, images))


def sse(*events: tuple[str, dict] | str) -> httpx.Response:
    """Server-sent events; a bare kind carries {"id": "job-1"}."""
    pairs = [(e, {"id": "job-1"}) if isinstance(e, str) else e for e in events]
    body = "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in pairs)
    return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})


class Scripted:
    """A server that answers with the given responses in order (the last one again and again), or per
    path with `routes`, and records the requests."""

    def __init__(self, *answers, routes: dict[str, list] | None = None):
        self.answers = list(answers)
        self.routes = routes or {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path in self.routes:
            answer = self.routes[request.url.path].pop(0)
        else:
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


class Blocking:
    """An AsyncSDClient used as if it were an SDClient, so that one test covers both: each coroutine
    runs to its end on one event loop, each async iterator is read to its end (errors included)."""

    def __init__(self, client: AsyncSDClient, loop: asyncio.AbstractEventLoop):
        self._client = client
        self._loop = loop

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def blocking(*args, **kwargs):
            result = attribute(*args, **kwargs)
            if inspect.isawaitable(result):
                return self._loop.run_until_complete(result)
            if hasattr(result, "__aiter__"):
                return iter(self._loop.run_until_complete(_read(result)))
            return result

        return blocking


async def _read(items) -> list:
    return [item async for item in items]


@pytest.fixture(params=["sync", "async"])
def connect(request) -> Callable[..., SDClient]:
    """connect(server, **kwargs): a client of the scripted server, SDClient or AsyncSDClient, whose pauses
    are recorded in its `slept` list instead of waited."""
    loop = asyncio.new_event_loop() if request.param == "async" else None
    made = []

    def make(server: Callable | None = None, url: str = "http://sd.test", **kwargs) -> SDClient:
        slept: list[float] = []
        transport = httpx.MockTransport(server) if server is not None else None
        options = {"transport": transport, "sleep": slept.append, **kwargs}
        client = SDClient(url, **options) if loop is None else Blocking(AsyncSDClient(url, **options), loop)
        client.slept = slept
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    if loop is not None:
        loop.close()


# -- both clients have the same methods ------------------------------------------------------------


def _public_methods(cls) -> dict[str, Callable]:
    return {
        name: member for name, member in vars(cls).items() if inspect.isfunction(member) and not name.startswith("_")
    }


def test_both_clients_have_the_same_methods_with_the_same_signatures():
    sync, asynchronous = _public_methods(SDClient), _public_methods(AsyncSDClient)
    assert set(sync) == set(asynchronous)
    assert {"generate", "img2img", "generate_prompts", "submit", "jobs", "download", "events", "stream"} <= set(sync)
    for name, method in sync.items():
        parameters = inspect.signature(method).parameters
        assert parameters == inspect.signature(asynchronous[name]).parameters, name
        if name in ("events", "stream"):  # iterators: plain functions that return an (async) iterator
            assert not inspect.iscoroutinefunction(asynchronous[name])
        else:
            assert inspect.iscoroutinefunction(asynchronous[name]), name


# -- retries and errors ------------------------------------------------------------------------


def test_503_is_retried_honouring_retry_after(connect):
    server = Scripted(busy("2"), busy("1"), generated())
    sd = connect(server)
    result = sd.generate("p")
    assert len(server.requests) == 3 and result.seeds == [5]
    # The server's wait plus at most 10% jitter, so told clients do not return in lockstep.
    assert 2 <= sd.slept[0] <= 2.2 and 1 <= sd.slept[1] <= 1.1


def test_retries_are_bounded_and_the_last_503_is_raised(connect):
    server = Scripted(busy("0"))
    sd = connect(server, retry=RetryPolicy(max_retries=2))
    with pytest.raises(SDServeError) as caught:
        sd.generate("p")
    assert len(server.requests) == 3 and len(sd.slept) == 2
    error = caught.value
    assert (error.status, error.code, error.request_id, error.retry_after_s) == (503, "overloaded", "rid-busy", 0)
    assert "too many requests queued" in str(error)


def test_server_retry_after_is_capped(connect):
    server = Scripted(busy("3600"), generated())
    sd = connect(server, retry=RetryPolicy(max_wait_s=5))
    sd.generate("p")
    assert 5 <= sd.slept[0] <= 5.5


def limited(code: str, retry_after: str) -> httpx.Response:
    body = {"error": {"code": code, "message": "slow down"}, "request_id": "rid-429"}
    return httpx.Response(429, json=body, headers={"Retry-After": retry_after, "RateLimit-Remaining": "0"})


def test_a_rate_limit_429_is_retried_as_retry_after_says_a_quota_429_is_raised(connect):
    server = Scripted(limited("rate_limited", "2"), generated())
    sd = connect(server)
    assert sd.generate("p").seeds == [5] and 2 <= sd.slept[0] <= 2.2
    tomorrow = Scripted(limited("quota_exceeded", "40000"))
    sd = connect(tomorrow)
    with pytest.raises(SDServeError) as caught:
        sd.generate("p")
    assert caught.value.status == 429 and caught.value.code == "quota_exceeded" and sd.slept == []


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
def test_other_errors_are_raised_at_once_with_the_servers_fields(connect, status):
    body = {
        "error": {"code": "invalid_request", "message": "width: must be between 64 and 256", "field": "width"},
        "request_id": "rid-7",
    }
    server = Scripted(httpx.Response(status, json=body))
    sd = connect(server)
    with pytest.raises(SDServeError) as caught:
        sd.generate("p", width=512)
    assert len(server.requests) == 1 and not sd.slept
    error = caught.value
    assert (error.status, error.code, error.field, error.request_id) == (status, "invalid_request", "width", "rid-7")
    assert error.message == "width: must be between 64 and 256"
    assert str(error) == f"{status} invalid_request: width: must be between 64 and 256 (request rid-7)"


def test_an_error_that_is_not_our_json_keeps_its_text_and_request_id(connect):
    server = Scripted(httpx.Response(502, text="Bad gateway from the proxy", headers={"X-Request-Id": "rid-9"}))
    with pytest.raises(SDServeError) as caught:
        connect(server).info()
    assert (caught.value.status, caught.value.code, caught.value.request_id) == (502, "http_502", "rid-9")
    assert caught.value.message == "Bad gateway from the proxy"


def test_a_time_out_is_its_own_error(connect):
    sd = connect(Scripted(httpx.ReadTimeout("timed out")))
    with pytest.raises(SDServeTimeout, match="no answer from http://sd.test in time"):
        sd.generate("p")


def test_streams_raise_the_clients_own_errors_when_the_server_cannot_be_reached(connect):
    sd = connect(Scripted(httpx.ConnectError("connection refused")))
    with pytest.raises(SDServeConnectionError, match="http://sd.test"):
        list(sd.stream("p"))
    with pytest.raises(SDServeConnectionError, match="http://sd.test"):
        list(sd.events("job-1"))
    with pytest.raises(SDServeTimeout):
        list(connect(Scripted(httpx.ReadTimeout("timed out"))).events("job-1"))


def test_an_unknown_option_is_a_type_error_before_anything_is_sent(connect):
    server = Scripted(generated())
    sd = connect(server)
    with pytest.raises(TypeError, match="unexpected keyword arguments: widht"):
        sd.generate("p", widht=64)
    with pytest.raises(TypeError, match="webhook"):
        sd.generate("p", webhook="http://hook")  # a job's option, not /generate's
    assert server.requests == []


# -- generating --------------------------------------------------------------------------------


def test_generate_sends_only_what_was_set_and_decodes_the_answer(connect):
    server = Scripted(generated())
    result = connect(server).generate("p", seed=5, width=64, num_images=1, output_format="webp")
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


def test_img2img_takes_a_path_bytes_or_a_pil_image(connect, tmp_path):
    path = tmp_path / "init.png"
    path.write_bytes(_png())
    server = Scripted(generated())
    sd = connect(server)
    for init in (path, str(path), _png(), Image.open(io.BytesIO(_png()))):
        sd.img2img("p", init, strength=0.5)
    sent = [json.loads(r.content) for r in server.requests]
    decoded = [Image.open(io.BytesIO(base64.b64decode(s["init_image"]))) for s in sent]
    assert all(d.size == (8, 8) and d.getpixel((0, 0)) == (200, 10, 10) for d in decoded)
    assert all(s["strength"] == 0.5 for s in sent) and server.paths() == ["POST /img2img"] * 4


def test_generate_prompts_sends_prompts_or_requests_to_generate_prompts(connect):
    server = Scripted(httpx.Response(200, json={"results": [GENERATED, GENERATED], "request_id": "b"}))
    sd = connect(server)
    assert len(sd.generate_prompts(["a", "b"], seed=1, width=None)) == 2
    sd.generate_prompts(["a", {"prompt": "b", "num_images": 2}], num_inference_steps=3, loras={"ink": 0.5})
    first, second = (json.loads(r.content) for r in server.requests)
    assert first == {"prompts": ["a", "b"], "seed": 1, "response_format": "json"}
    assert second["requests"] == [{"prompt": "a"}, {"prompt": "b", "num_images": 2}]
    assert second["num_inference_steps"] == 3 and second["loras"] == [{"name": "ink", "scale": 0.5}]
    assert server.paths() == ["POST /generate/prompts"] * 2


def test_batch_is_the_deprecated_name_of_generate_prompts(connect):
    server = Scripted(httpx.Response(200, json={"results": [GENERATED], "request_id": "b"}))
    with pytest.warns(DeprecationWarning, match="batch is now generate_prompts"):
        results = connect(server).batch(["a"], seed=1)
    assert results[0].seeds == [5] and server.paths() == ["POST /generate/prompts"]


def test_the_model_and_lora_adapters_go_in_the_body_and_unset_ones_stay_out(connect):
    server = Scripted(generated())
    sd = connect(server)
    sd.generate("p", model="sd-turbo", loras={"ink": 0.8, "neon": 1.0})
    sd.generate("p")
    named, plain = (json.loads(request.content) for request in server.requests)
    assert named["model"] == "sd-turbo" and named["loras"] == [
        {"name": "ink", "scale": 0.8},
        {"name": "neon", "scale": 1.0},
    ]
    assert "model" not in plain and "loras" not in plain


def test_stream_gives_progress_then_the_generation_and_retries_a_503_first(connect):
    progress = ("progress", {"step": 1, "total_steps": 2})
    server = Scripted(busy("1"), sse(progress, ("succeeded", GENERATED)))
    sd = connect(server)
    events = list(sd.stream("p", seed=5, num_inference_steps=2))
    assert [kind for kind, _ in events] == ["progress", "succeeded"] and events[1][1].seeds == [5]
    assert len(sd.slept) == 1 and 1 <= sd.slept[0] <= 1.1
    sent = server.requests[-1]
    assert sent.headers["accept"] == "text/event-stream" and json.loads(sent.content)["num_inference_steps"] == 2


def test_stream_raises_a_failure_and_a_stream_that_ends_before_the_images(connect):
    failed = ("failed", {"error": {"code": "invalid_request", "message": "too wide", "field": "width"}})
    with pytest.raises(SDServeError) as caught:
        list(connect(Scripted(sse(("progress", {"step": 1}), failed))).stream("p"))
    assert (caught.value.code, caught.value.field, caught.value.message) == ("invalid_request", "width", "too wide")
    with pytest.raises(SDServeError, match="ended before the images came"):
        list(connect(Scripted(sse(("progress", {"step": 1})))).stream("p"))


# -- jobs --------------------------------------------------------------------------------------


def test_submit_sends_the_job_body(connect, tmp_path):
    server = Scripted(httpx.Response(202, json=_job_view("queued")))
    sd = connect(server)
    submitted = sd.submit("p", seed=5, num_images=2, init_image=_png(), strength=0.4, webhook="http://hook/x")
    body = json.loads(server.requests[0].content)
    assert submitted.status == "queued" and server.paths() == ["POST /jobs"]
    assert body["init_image"] == base64.b64encode(_png()).decode() and body["webhook"] == {"url": "http://hook/x"}
    assert (body["seed"], body["num_images"], body["strength"]) == (5, 2, 0.4)
    assert "output_format" not in body and "response_format" not in body  # jobs store PNGs


def test_jobs_pages_and_cancel(connect):
    page = {"jobs": [_job_view("running"), _job_view("queued")], "next_cursor": "c2"}
    server = Scripted(httpx.Response(200, json=page), httpx.Response(200, json=_job_view("canceled")))
    sd = connect(server)
    jobs, cursor = sd.jobs(status="running", limit=2)
    assert [j.status for j in jobs] == ["running", "queued"] and cursor == "c2"
    assert dict(server.requests[0].url.params) == {"status": "running", "limit": "2"}
    assert sd.cancel("job-1").status == "canceled" and server.paths()[-1] == "DELETE /jobs/job-1"


def test_download_gives_the_image_with_its_seed_and_batch_size(connect):
    images = [
        {"index": i, "seed": 5 + i, "url": f"/jobs/job-1/images/{i}", "metadata": {"batch_size": 2}} for i in (0, 1)
    ]
    server = Scripted(
        routes={
            "/jobs/job-1/images/1": [
                httpx.Response(200, content=b"jpeg bytes", headers={"Content-Type": "image/jpeg"})
            ],
            "/jobs/job-1": [job("succeeded", images)],
        }
    )
    image = connect(server).download("job-1", 1, "jpeg", quality=70)
    assert (image.data, image.seed, image.media_type, image.batch_size) == (b"jpeg bytes", 6, "image/jpeg", 2)
    assert dict(server.requests[0].url.params) == {"format": "jpeg", "quality": "70"}


def test_download_of_an_unfinished_job_raises_the_servers_error(connect):
    refused = httpx.Response(409, json={"error": {"code": "job_not_finished", "message": "job job-1 is running"}})
    with pytest.raises(SDServeError) as caught:
        connect(Scripted(refused)).download("job-1")
    assert (caught.value.status, caught.value.code) == (409, "job_not_finished")


def test_events_are_the_jobs_server_sent_events_in_order(connect):
    server = Scripted(sse(("queued", {"position": 2}), "running", ("progress", {"step": 1}), "succeeded"))
    events = list(connect(server).events("job-1"))
    assert events == [("queued", {"position": 2}), ("running", {"id": "job-1"}), ("progress", {"step": 1})] + [
        ("succeeded", {"id": "job-1"})
    ]
    assert server.requests[0].extensions["timeout"]["read"] is None  # a job may wait long between events


def test_waiting_on_a_job_follows_it_again_when_its_stream_ends_first(connect):
    # The first stream ends after "running" (as a proxy's idle time-out would end it); the job is read,
    # still running, and followed again, after the pause, until its final event.
    server = Scripted(
        routes={
            "/jobs/job-1/events": [sse("running"), sse(("progress", {"step": 1}), "succeeded")],
            "/jobs/job-1": [job("running"), job("succeeded")],
        }
    )
    sd = connect(server)
    progress, events = [], []
    done = sd.wait("job-1", on_progress=progress.append, on_event=lambda kind, data: events.append(kind))
    assert done.status == "succeeded" and progress == [{"step": 1}]
    assert events == ["running", "progress", "succeeded"]
    assert sd.slept == [REFOLLOW_PAUSE_S]  # paused once, before following again
    assert server.paths() == ["GET /jobs/job-1/events", "GET /jobs/job-1"] * 2


def test_waiting_ends_when_the_job_ended_while_its_stream_was_down(connect):
    server = Scripted(routes={"/jobs/job-1/events": [sse("queued")], "/jobs/job-1": [job("canceled")]})
    sd = connect(server)
    assert sd.wait("job-1").status == "canceled" and sd.slept == []


def test_waiting_on_an_unknown_job_raises_the_servers_error(connect):
    missing = httpx.Response(404, json={"error": {"code": "job_not_found", "message": "no job job-9"}})
    with pytest.raises(SDServeError) as caught:
        connect(Scripted(missing)).wait("job-9")
    assert (caught.value.status, caught.value.code) == (404, "job_not_found")


# -- connection and the server's health ----------------------------------------------------------


def test_api_key_is_sent_as_a_bearer_token_from_the_argument_or_the_environment(connect, monkeypatch):
    server = Scripted(httpx.Response(200, json={"status": "ok"}))
    connect(server, api_key="k1").live()
    monkeypatch.setenv("SD_SERVE_API_KEY", "k2")
    connect(server).live()
    monkeypatch.delenv("SD_SERVE_API_KEY")
    connect(server).live()
    assert [r.headers.get("authorization") for r in server.requests] == ["Bearer k1", "Bearer k2", None]


def test_url_comes_from_the_argument_the_environment_or_the_default(connect, monkeypatch):
    monkeypatch.delenv("SD_SERVE_URL", raising=False)
    assert connect(url=None).base_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("SD_SERVE_URL", "http://10.0.0.5:9000/")
    assert connect(url=None).base_url == "http://10.0.0.5:9000"
    assert connect(url="http://h:1").base_url == "http://h:1"


def test_readiness_is_true_false_or_unknown_without_readyz(connect):
    answers = {"/readyz": [200, 503, 404]}

    def handler(request):
        if request.url.path == "/readyz":
            return httpx.Response(answers["/readyz"].pop(0))
        return httpx.Response(200, json={"status": "ok"} if request.url.path == "/healthz" else {"model": "m"})

    sd = connect(handler)
    assert [sd.ready(), sd.ready(), sd.ready()] == [True, False, None]
    answers["/readyz"] = [503]
    report = sd.health()
    assert (report.live, report.ready, report.info) == (True, False, {"model": "m"})
    assert sd.slept == []  # probes report a busy server rather than wait it out


def test_health_reports_no_info_when_info_cannot_be_read(connect):
    def handler(request):
        if request.url.path == "/info":
            raise httpx.ConnectError("gone")
        return httpx.Response(200, json={"status": "ok"})

    assert connect(handler).health().info is None
