"""The step engine on the demo server: requests with different steps, samplers and guidance share
UNet calls, and short requests join while long ones run (continuous batching, seen from /info)."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
from harness import wait_until
from helpers import png

LONG = {"prompt": "long", "num_inference_steps": 40, "scheduler": "euler"}


def test_short_requests_join_long_ones_mid_flight_and_finish_first(demo_server, client):
    before = client.get("/info").json()["generator"]
    assert before["engine"] == "step"
    with ThreadPoolExecutor(8) as pool, httpx.Client(base_url=demo_server, timeout=120) as http:
        longs = [pool.submit(http.post, "/generate", json={**LONG, "seed": i}) for i in range(3)]
        wait_until(lambda: client.get("/info").json()["generator"]["images"]["running"] >= 3, 30, "the long ones run")
        shorts = [
            pool.submit(http.post, "/generate", json=body)
            for body in (
                {"prompt": "short", "seed": 1, "num_inference_steps": 2},
                {"prompt": "short", "seed": 2, "num_inference_steps": 3, "scheduler": "dpmpp_2m"},
                {"prompt": "short", "seed": 3, "num_inference_steps": 2, "guidance_scale": 1.0},
            )
        ]
        short_responses = [f.result() for f in shorts]
        # Every short answer came back while a long request was still running.
        assert not all(f.done() for f in longs)
        long_responses = [f.result() for f in longs]
    for response in short_responses + long_responses:
        png(response)
    after = client.get("/info").json()["generator"]
    assert after["images"]["admitted_mid_flight"] - before["images"]["admitted_mid_flight"] >= 3
    # The shorts shared the longs' UNet calls: calls of 4 or more images (3 long + at least one short).
    shared = {
        int(k): v - before["model_calls_by_batch_size"].get(k, 0) for k, v in after["model_calls_by_batch_size"].items()
    }
    assert any(size >= 4 and count > 0 for size, count in shared.items()), shared
    assert max(int(r.headers["x-batch-size"]) for r in short_responses) >= 4


def test_a_client_that_hangs_up_mid_flight_stops_costing_compute_at_the_next_step(demo_server, client):
    before = client.get("/info").json()["generator"]["images"]
    host, port = demo_server.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "abandoned", "num_inference_steps": 50, "width": 256, "height": 256}).encode()
    with socket.create_connection((host, int(port))) as caller:
        caller.sendall(
            b"POST /generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (host.encode(), len(body), body)
        )
        wait_until(
            lambda: (
                (jobs := client.get("/info").json()["generator"]["images"])["admitted"] > before["admitted"]
                and jobs["running"] >= 1
            ),
            30,
            "the image is being denoised",
        )
    # The connection is closed: Serve's proxy cancels the request, the ingress its Generator call, and the
    # engine drops the image's rows at its next step.
    after = wait_until(
        lambda: (
            (jobs := client.get("/info").json()["generator"]["images"])["cancelled_in_flight"]
            > before["cancelled_in_flight"]
            and jobs["running"] == 0
            and jobs
        ),
        60,
        "the abandoned image left the engine",
    )
    assert (
        after["succeeded"] == before["succeeded"] and after["cancelled_in_flight"] - before["cancelled_in_flight"] == 1
    )
