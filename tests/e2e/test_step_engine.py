"""The step engine on the demo server: requests with different steps, samplers and guidance share
UNet calls, and short requests join while long ones run (continuous batching, seen from /info)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from harness import DEMO_LONGEST, counted_since, open_request, quiet, wait_until
from helpers import png

# 50 Heun steps (99 UNet calls) at 128x128: the short requests below (2-3 steps, the same size, so that they
# can share the long ones' UNet calls) go through the ingress, join and finish in a small part of that.
SIZE = {"width": 128, "height": 128}
LONG = {"prompt": "long", "num_inference_steps": 50, "scheduler": "heun", **SIZE}


def test_short_requests_join_long_ones_mid_flight_and_finish_first(demo_server, client):
    quiet(client)
    before = client.get("/info").json()["generator"]
    assert before["engine"] == "step"
    with ThreadPoolExecutor(8) as pool, httpx.Client(base_url=demo_server, timeout=120) as http:
        longs = [pool.submit(http.post, "/generate", json={**LONG, "seed": i}) for i in range(3)]
        wait_until(lambda: client.get("/info").json()["generator"]["images"]["running"] >= 3, 30, "the long ones run")
        shorts = [
            pool.submit(http.post, "/generate", json={**SIZE, **body})
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
    before = quiet(client)
    caller = open_request(demo_server, "/generate", {"prompt": "abandoned", **DEMO_LONGEST})
    try:
        wait_until(
            lambda: (
                counted_since(before, (images := client.get("/info").json()["generator"]["images"]))["admitted"]
                and images["running"] >= 1
            ),
            30,
            "the image is being denoised",
        )
    finally:
        # The connection is closed: Serve's proxy cancels the request, the ingress its Generator call, and
        # the engine drops the image's rows at its next step.
        caller.close()
    done = counted_since(before, quiet(client))
    assert (done["admitted"], done["cancelled_in_flight"], done["succeeded"]) == (1, 1, 0), done
