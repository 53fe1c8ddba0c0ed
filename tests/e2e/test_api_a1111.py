"""AUTOMATIC1111 API compatibility: the fields and response shape existing tools rely on."""

from __future__ import annotations

import base64
import json

import pytest
from helpers import decode, max_diff, png_bytes


def test_txt2img_response_shape_and_seeds(client):
    body = {
        "prompt": "a castle",
        "negative_prompt": "fog",
        "steps": 3,
        "cfg_scale": 6,
        "width": 128,
        "height": 64,
        "seed": 500,
        "batch_size": 2,
        "n_iter": 2,
        "sampler_name": "Euler a",
        "restore_faces": False,
    }
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["images"]) == 4 and all(decode(i).size == (128, 64) for i in data["images"])
    assert data["parameters"]["prompt"] == "a castle" and data["parameters"]["steps"] == 3
    info = json.loads(data["info"])
    assert info["seed"] == 500 and info["all_seeds"] == [500, 501, 502, 503]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["cfg_scale"] == 6
    assert info["infotexts"][0].startswith("a castle\nNegative prompt: fog\n")


def test_seed_minus_one_is_random_and_reported(client):
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1}).json()["info"])
    assert 0 <= info["seed"] < 2**32


def test_karras_scheduler_and_our_own_sampler_names(client):
    for sampler, scheduler in (("DPM++ 2M", "Karras"), ("dpmpp_2m", None)):
        response = client.post(
            "/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": sampler, "scheduler": scheduler, "steps": 3}
        )
        assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M"


def test_unknown_sampler_lists_the_valid_ones(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Warp Drive"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "sampler_name" and "Euler a" in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 500}, "steps"),
        ({"cfg_scale": 50}, "cfg_scale"),
        ({"width": 100}, "width"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),
    ],
)
def test_errors_use_a1111_field_names(client, body, field):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **body})
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


def test_img2img_with_denoising_strength(client):
    init = base64.b64encode(png_bytes((64, 64), seed=5)).decode()
    base = {"prompt": "x", "seed": 3, "steps": 10, "init_images": [init]}
    weak, strong = (
        decode(client.post("/sdapi/v1/img2img", json={**base, "denoising_strength": s}).json()["images"][0])
        for s in (0.3, 0.9)
    )
    assert max_diff(weak, strong) > 10
    masked = client.post("/sdapi/v1/img2img", json={**base, "mask": init})
    assert masked.status_code == 422 and masked.json()["error"]["field"] == "mask"


def test_probes_tools_call(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in samplers
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "synthetic:tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "synthetic:tiny"
