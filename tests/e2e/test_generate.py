"""The native API against real Ray Serve running configs/cpu-demo.yaml: images the real model makes,
batching, and what the real replicas report. Route shapes and errors: tests/unit/test_routes_*.py."""

from __future__ import annotations

import httpx
import numpy as np
from harness import quiet
from helpers import burst, pixels, png


def test_png_has_the_requested_size_and_reports_its_seed_and_batch(client):
    quiet(client)  # nothing else runs: the image is made alone
    response = client.post("/generate", json={"prompt": "a lighthouse", "width": 128, "height": 64, "seed": 1234})
    image = png(response)
    assert image.size == (128, 64) and image.mode == "RGB"
    assert response.headers["x-seed"] == "1234"
    assert response.headers["x-batch-size"] == "1"  # nothing else was running
    assert "Seed: 1234" in image.info["parameters"] and "Size: 128x64" in image.info["parameters"]


def test_left_out_parameters_take_the_models_defaults(client):
    quiet(client)  # nothing else runs: the image is made alone
    response = client.post("/generate", json={"prompt": "x", "response_format": "json"})
    meta = response.json()["metadata"]
    # synthetic:tiny's own defaults, filled in by the Generator and reported back.
    assert (meta["width"], meta["height"], meta["num_inference_steps"], meta["guidance_scale"]) == (64, 64, 2, 7.5)
    assert meta["model"] == "synthetic:tiny" and meta["batch_size"] == 1


def test_a_left_out_seed_is_drawn_and_reported_and_reproduces_the_image(client):
    first = client.post("/generate", json={"prompt": "a fox"})
    seed = int(first.headers["x-seed"])
    again = client.post("/generate", json={"prompt": "a fox", "seed": seed})
    other = client.post("/generate", json={"prompt": "a fox", "seed": (seed + 1) % 2**32})
    a, b, c = (pixels(png(r)) for r in (first, again, other))
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - c).max() > 10


def test_served_image_matches_the_raw_pipeline(client):
    """Same weights, same seed: the server adds nothing to the pixels (within batching's 1/255)."""
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel
    from serve_app.pipeline.params import ImageParams
    from serve_app.pipeline.tasks import ImageTask

    engine = LoadedModel.load("synthetic:tiny", PipelineOptions(device="cpu"))
    [raw] = engine.generate([ImageTask(ImageParams(prompt="a boat", negative_prompt="fog", seed=77))])
    served = png(client.post("/generate", json={"prompt": "a boat", "negative_prompt": "fog", "seed": 77}))
    assert np.abs(pixels(served) - raw.pixels.astype(int)).max() <= 1


def test_info_describes_the_running_generator_as_configured(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/info").json()
    generator = info["generator"]
    assert info["model"] == generator["model"] == "synthetic:tiny"
    assert generator["device"] == "cpu" and generator["dtype"] == "float32"
    # configs/cpu-demo.yaml's user_config reached the replica.
    assert generator["batching"]["max_batch_size"] == 8 and generator["batching"]["batch_wait_timeout_s"] == 0.0
    assert generator["engine"] == "step"
    assert set(generator["images"]) >= {
        "received",
        "succeeded",
        "failed",
        "cancelled_before_start",
        "waiting",
        "running",
    }


def test_readyz_and_info_report_replicas_process_and_outcomes(client):
    """Replica counts come from Serve's controller, the process from the replica, outcomes from the ingress."""
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["generator"]["running_replicas"] == 1
    before = client.get("/info").json()
    assert before["generator_deployment"]["running_replicas"] == 1
    assert before["generator_deployment"]["replica_states"] == {"RUNNING": 1}
    assert before["generator"]["memory_rss_bytes"] > 2**20 and before["generator"]["pid"] > 1

    assert client.post("/generate", json={"prompt": "x"}).status_code == 200
    assert client.post("/generate", json={"prompt": "x", "width": 7}).status_code == 422
    assert client.get("/nope").status_code == 404
    after = client.get("/info").json()
    grown = {s: n - before["responses_by_status"].get(s, 0) for s, n in after["responses_by_status"].items()}
    # The first /info answer is counted once it has been sent, so it is in the difference.
    assert {s: n for s, n in grown.items() if n} == {"200": 2, "422": 1, "404": 1}
    assert after["uptime_s"] >= before["uptime_s"] and after["generator"]["pid"] == before["generator"]["pid"]


def _burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    return burst(url, [("/generate", body) for body in bodies])


def test_a_concurrent_burst_is_batched(demo_server, client):
    quiet(client)  # nothing else runs: the counters' differences below are this burst's alone
    before = client.get("/info").json()["generator"]
    # 20 steps each: the images overlap in the step loop however far apart the ingress hands them on.
    responses = _burst(demo_server, [{"prompt": f"burst {i}", "seed": i, "num_inference_steps": 20} for i in range(16)])
    sizes = [int(png(r) and r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    assert [int(r.headers["x-seed"]) for r in responses] == list(range(16))
    after = client.get("/info").json()["generator"]
    assert after["images"]["succeeded"] - before["images"]["succeeded"] == 16
    calls = {
        int(k): v - before["model_calls_by_batch_size"].get(k, 0) for k, v in after["model_calls_by_batch_size"].items()
    }
    assert max(size for size, count in calls.items() if count) > 1, calls


def test_mixed_sizes_in_one_burst_each_come_back_at_their_own_size(demo_server):
    sizes = [(64, 64), (128, 64), (64, 128), (128, 128)] * 3
    bodies = [{"prompt": "mixed", "seed": i, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    responses = _burst(demo_server, bodies)
    assert [png(r).size for r in responses] == sizes
    assert all(int(r.headers["x-batch-size"]) <= 3 for r in responses)  # at most 3 of each size exist
