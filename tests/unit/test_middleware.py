"""The ASGI layers in isolation, around a tiny app (no Ray)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app.api.errors import install_error_handlers
from serve_app.api.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    ConcurrencyLimitMiddleware,
    DeadlineMiddleware,
    OutcomeCounterMiddleware,
    RequestIdMiddleware,
)


async def echo(request: Request):
    body = await request.body()
    if request.query_params.get("hold"):
        await asyncio.Event().wait()  # never answers by itself: only a deadline ends it
    await asyncio.sleep(float(request.query_params.get("sleep", 0)))
    if request.query_params.get("boom"):
        raise RuntimeError("secret internals")
    return JSONResponse({"bytes": len(body)})


def app_with(*layers) -> TestClient:
    """A FastAPI app with our error handlers and the given layers, innermost first, as create_api builds it."""
    app = FastAPI()
    install_error_handlers(app)
    for path, methods in (("/work", ["POST"]), ("/healthz", ["GET"]), ("/v1/work", ["POST"])):
        app.add_route(path, echo, methods=methods)
    for layer, kwargs in layers:
        app.add_middleware(layer, **kwargs)
    app.add_middleware(RequestIdMiddleware)
    return TestClient(app, raise_server_exceptions=False)


def test_request_id_is_made_or_kept_and_unhandled_errors_are_json_500():
    client = app_with()
    made = client.post("/work")
    assert len(made.headers["x-request-id"]) == 32
    boom = client.post("/work?boom=1", headers={"X-Request-Id": "abc"})
    assert boom.status_code == 500
    assert boom.json() == {"error": {"code": "internal_error", "message": "internal server error"}, "request_id": "abc"}
    assert "secret" not in boom.text


def test_body_limit_by_declared_length_and_by_counting():
    client = app_with((BodySizeLimitMiddleware, {"max_body_bytes": 100}))
    assert client.post("/work", content=b"x" * 100).json() == {"bytes": 100}
    assert client.post("/work", content=b"x" * 101).status_code == 413
    chunked = client.post("/work", content=iter([b"x" * 60, b"x" * 60]))
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "payload_too_large"


def test_api_keys():
    client = app_with((ApiKeyMiddleware, {"keys": ["k1", "k2"]}))
    missing = client.post("/work")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.post("/work", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/work", headers={"Authorization": "Basic k1"}).status_code == 401
    assert client.post("/work", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open
    openai_style = client.post("/v1/work")
    assert openai_style.json()["error"]["type"] == "authentication_error"


def test_deadline_default_and_client_asked():
    client = app_with((DeadlineMiddleware, {"default_s": 0.5}))
    assert client.post("/work").status_code == 200  # answered at once
    late = client.post("/work?hold=1")
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
    assert late.json()["error"]["message"] == "request did not finish within 0.5s"
    shorter = client.post("/work?hold=1", headers={"X-Request-Timeout": "0.1"})
    assert shorter.status_code == 504 and "within 0.1s" in shorter.json()["error"]["message"]
    longer_is_capped = client.post("/work?hold=1", headers={"X-Request-Timeout": "100"})
    assert longer_is_capped.status_code == 504 and "within 0.5s" in longer_is_capped.json()["error"]["message"]
    for bad in ("soon", "-1", "0", "inf"):
        response = client.post("/work", headers={"X-Request-Timeout": bad})
        assert response.status_code == 422 and response.json()["error"]["field"] == "X-Request-Timeout"


def test_concurrency_limit_sheds_with_retry_after():
    """Two requests are held inside the app; the three that arrive meanwhile are shed at once."""

    async def scenario():
        import httpx

        gate = asyncio.Event()

        async def held(request: Request):
            await gate.wait()
            return JSONResponse({"held": True})

        limited = ConcurrencyLimitMiddleware(
            Starlette(routes=[Route("/work", held, methods=["POST"])]), limit=2, retry_after_s=3
        )
        transport = httpx.ASGITransport(app=RequestIdMiddleware(limited))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            posts = [asyncio.ensure_future(http.post("/work")) for _ in range(5)]
            done: set = set()
            while len(done) < 3:  # the shed answers come back while the gate is shut
                newly, _ = await asyncio.wait(set(posts) - done, return_when=asyncio.FIRST_COMPLETED)
                done |= newly
            held_while_shut = limited.active
            gate.set()
            responses = await asyncio.gather(*posts)
        return responses, [posts.index(p) for p in done], held_while_shut, limited.active

    responses, first_answered, held_while_shut, active_after = asyncio.run(scenario())
    assert held_while_shut == 2 and active_after == 0
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503]
    assert all(responses[i].status_code == 503 for i in first_answered)
    shed = next(r for r in responses if r.status_code == 503)
    assert shed.headers["retry-after"] == "3" and shed.json()["error"]["code"] == "overloaded"


def test_outcomes_are_counted_by_status():
    counter: Counter = Counter()
    client = app_with(
        (BodySizeLimitMiddleware, {"max_body_bytes": 10}), (OutcomeCounterMiddleware, {"counter": counter})
    )
    client.post("/work")
    client.post("/work", content=b"x" * 11)
    client.get("/nothing")
    assert counter == Counter({"200": 1, "413": 1, "404": 1})


def test_deadline_and_admission_apply_to_generation_requests_only():
    """Probes and preflights are never shed (limit 0 sheds every POST) nor cut short by the deadline."""
    client = app_with(
        (DeadlineMiddleware, {"default_s": 0.01}), (ConcurrencyLimitMiddleware, {"limit": 0, "retry_after_s": 1})
    )
    assert client.post("/work").status_code == 503  # the layers are active
    slow_probe = client.get("/healthz?sleep=0.05")  # five times the deadline
    assert slow_probe.status_code == 200 and slow_probe.json() == {"bytes": 0}
    # OPTIONS reaches the app, which has no OPTIONS route: its 405, not the layers' 503 or 504.
    options = client.options("/healthz")
    assert options.status_code == 405 and options.json()["error"]["code"] == "method_not_allowed"


def test_a_request_that_would_wait_past_its_deadline_is_refused_at_once():
    """Little's law at the ingress: answers come back at 1 per second, so a new request waits about
    (in flight + 1) seconds; one whose deadline is shorter gets 503 now, with the excess as Retry-After."""

    async def scenario():
        gate = asyncio.Event()

        async def held(request):
            await gate.wait()
            return JSONResponse({"held": True})

        routes = [Route(path, held, methods=["POST"]) for path in ("/generate", "/jobs")]
        limited = ConcurrencyLimitMiddleware(
            Starlette(routes=routes), limit=100, retry_after_s=3, default_deadline_s=60
        )
        now = time.monotonic()
        limited.answered.extend(now - 9 + i for i in range(10))  # 10 answers in the last 10 s: 1 per second
        transport = httpx.ASGITransport(app=RequestIdMiddleware(limited))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            in_flight = [asyncio.ensure_future(http.post("/generate")) for _ in range(3)]
            await until(lambda: limited.active == 3, "three requests are held")
            refused = await http.post("/generate", headers={"X-Request-Timeout": "2"})  # would wait ~4 s
            job = asyncio.ensure_future(http.post("/jobs", headers={"X-Request-Timeout": "2"}))  # jobs queue
            patient = asyncio.ensure_future(http.post("/generate", headers={"X-Request-Timeout": "30"}))
            while limited.active < 4:  # jobs are neither counted nor limited here: the JobManager bounds them
                await asyncio.sleep(0.01)
            gate.set()
            answered = await asyncio.gather(*in_flight, job, patient)
        return refused, answered, limited.refused_by_wait

    refused, answered, refused_by_wait = asyncio.run(scenario())
    assert refused.status_code == 503 and refused_by_wait == 1
    assert refused.json()["error"]["code"] == "overloaded"
    message = refused.json()["error"]["message"]
    assert "3 requests ahead, about 4s to answer, too close to this request's 2s deadline" in message
    assert refused.headers["retry-after"] == "3"  # 4 s expected - 1.5 s (three quarters of the deadline)
    assert [r.status_code for r in answered] == [200] * 5


async def until(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        await asyncio.sleep(0.005)


def test_without_enough_answers_to_measure_nothing_is_refused_by_wait():
    limited = ConcurrencyLimitMiddleware(None, limit=10, retry_after_s=1, default_deadline_s=1)
    now = time.monotonic()
    limited.answered.extend([now - 30, now - 1, now])  # one outside the window, two inside: too few
    assert limited.answer_rate(now) is None and len(limited.answered) == 2
    limited.answered.extend([now] * 6)
    assert limited.answer_rate(now) == 0.8
