"""The native API against real Ray Serve running configs/cpu-demo.yaml."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from helpers import burst, decode, png


def test_png_has_the_requested_size_and_reports_seed_batch_and_request_id(client):
    response = client.post("/generate", json={"prompt": "a lighthouse", "width": 128, "height": 64, "seed": 1234})
    image = png(response)
    assert image.size == (128, 64) and image.mode == "RGB"
    assert response.headers["x-seed"] == "1234"
    assert int(response.headers["x-batch-size"]) >= 1
    assert len(response.headers["x-request-id"]) >= 8
    assert "Seed: 1234" in image.info["parameters"]


def test_default_size_is_the_models(client):
    assert png(client.post("/generate", json={"prompt": "x"})).size == (64, 64)


def test_a_left_out_seed_is_drawn_and_reported_and_reproduces_the_image(client):
    first = client.post("/generate", json={"prompt": "a fox"})
    seed = int(first.headers["x-seed"])
    again = client.post("/generate", json={"prompt": "a fox", "seed": seed})
    other = client.post("/generate", json={"prompt": "a fox", "seed": (seed + 1) % 2**32})
    a, b, c = (np.asarray(png(r)).astype(int) for r in (first, again, other))
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - c).max() > 10


def test_served_image_matches_the_raw_pipeline(client):
    """Same weights, same seed: the server adds nothing to the pixels (within batching's 1/255)."""
    from serve_app.pipeline.engine import ImageEngine
    from serve_app.pipeline.jobs import GenerationJob
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.params import ImageParams

    engine = ImageEngine.load("synthetic:tiny", PipelineOptions(device="cpu"))
    [raw] = engine.generate([GenerationJob(ImageParams(prompt="a boat", negative_prompt="fog", seed=77))])
    served = png(client.post("/generate", json={"prompt": "a boat", "negative_prompt": "fog", "seed": 77}))
    assert np.abs(np.asarray(served).astype(int) - raw.pixels.astype(int)).max() <= 1


def test_json_mode_returns_base64_images_and_metadata(client):
    body = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "seed": 5,
        "num_inference_steps": 3,
        "guidance_scale": 6.0,
        "width": 96,
        "height": 64,
        "response_format": "json",
    }
    response = client.post("/generate", json=body, headers={"X-Request-Id": "my-request-1"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    data = response.json()
    [image] = data["images"]
    assert image["seed"] == 5
    assert decode(image["b64"]).size == (96, 64)
    meta = data["metadata"]
    assert {
        k: meta[k] for k in ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale")
    } == {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "width": 96,
        "height": 64,
        "num_inference_steps": 3,
        "guidance_scale": 6.0,
    }
    assert meta["model"] == "synthetic:tiny" and meta["batch_size"] >= 1 and meta["generation_time_s"] > 0
    assert meta["request_id"] == "my-request-1" == response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"prompt": "x", "width": 65}, "width", "multiple of 8"),
        ({"prompt": "x", "width": 512}, "width", "between 64 and 256"),
        ({"prompt": "x", "height": 32}, "height", "between 64 and 256"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
        ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps", "between 1 and 50"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
        ({"prompt": "x", "seed": -5}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "scheduler": "warp"}, "scheduler", "euler_a"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"negative_prompt": "x"}, "prompt", "required"),
        ({"prompt": "x", "sead": 1}, "sead", "unknown field"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
    ],
)
def test_invalid_requests_get_422_naming_the_field(client, body, field, says):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and says in error["message"], error
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text


def test_malformed_json_is_400(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_request"


def test_unknown_route_is_a_json_404(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_healthz_and_info(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/info").json()
    generator = info["generator"]
    assert info["model"] == generator["model"] == "synthetic:tiny"
    assert generator["device"] == "cpu" and generator["dtype"] == "float32"
    assert generator["batching"]["max_batch_size"] == 8 and generator["batching"]["batch_wait_timeout_s"] == 0.0
    assert generator["engine"] == "step" and isinstance(generator["model_calls_by_batch_size"], dict)


def _burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    return burst(url, [("/generate", body) for body in bodies])


def test_a_concurrent_burst_is_batched(demo_server, client):
    before = client.get("/info").json()["generator"]
    responses = _burst(demo_server, [{"prompt": f"burst {i}", "seed": i} for i in range(16)])
    sizes = [int(png(r) and r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    assert [int(r.headers["x-seed"]) for r in responses] == list(range(16))
    after = client.get("/info").json()["generator"]
    assert after["jobs"]["succeeded"] - before["jobs"]["succeeded"] == 16
    calls = {int(k): v - before["model_calls_by_batch_size"].get(k, 0) for k, v in after["model_calls_by_batch_size"].items()}
    assert max(size for size, count in calls.items() if count) > 1, calls


def test_mixed_sizes_in_one_burst_each_come_back_at_their_own_size(demo_server):
    sizes = [(64, 64), (128, 64), (64, 128), (128, 128)] * 3
    bodies = [{"prompt": "mixed", "seed": i, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    responses = _burst(demo_server, bodies)
    assert [png(r).size for r in responses] == sizes
    assert all(int(r.headers["x-batch-size"]) <= 3 for r in responses)  # at most 3 of each size exist


def test_batch_size_changes_at_run_time_through_user_config(serve_cluster, demo_server):
    from harness import deployment, load_config

    config = load_config()
    deployment(config, "ImageGenerator")["user_config"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    serve_cluster.deploy(config)
    try:
        with httpx.Client(base_url=demo_server, timeout=60) as http:
            assert http.get("/info").json()["generator"]["batching"]["max_batch_size"] == 1
        responses = _burst(demo_server, [{"prompt": "one at a time", "seed": i} for i in range(8)])
        assert {r.headers["x-batch-size"] for r in responses} == {"1"}
    finally:
        serve_cluster.deploy(load_config())
