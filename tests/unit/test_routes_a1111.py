"""AUTOMATIC1111 API compatibility: its field names in and out, over a fake Generator (no Ray).
Images made by the real model through these routes: tests/e2e/test_api_a1111.py."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from helpers import decode, png_bytes

from serve_app.pipeline.schedulers import SCHEDULERS


def test_txt2img_maps_a1111_fields_and_answers_in_its_shape(client, generator):
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
        "restore_faces": False,  # A1111 fields this server does not have are ignored
        "enable_hr": False,
    }
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["images"]) == 4 and all(decode(i).size == (128, 64) for i in data["images"])
    assert data["parameters"]["prompt"] == "a castle" and data["parameters"]["steps"] == 3
    params = generator.jobs[0].params
    assert (params.num_inference_steps, params.guidance_scale, params.scheduler) == (3, 6, "euler_a")
    assert [job.seed for job in generator.jobs] == [500, 501, 502, 503]
    info = json.loads(data["info"])
    assert info["seed"] == 500 and info["all_seeds"] == [500, 501, 502, 503]
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("Euler a", 3, 6)
    assert (info["batch_size"], info["n_iter"], info["width"], info["height"]) == (2, 2, 128, 64)
    assert info["infotexts"][0].startswith("a castle\nNegative prompt: fog\nSteps: 3, Sampler: Euler a")
    assert len(info["infotexts"]) == 4 and "Seed: 503" in info["infotexts"][3]


def test_seed_minus_one_is_random_and_reported(client, generator):
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1}).json()["info"])
    assert info["seed"] == generator.jobs[0].seed and 0 <= info["seed"] < 2**32


@pytest.mark.parametrize(
    ("request_fields", "scheduler", "reported"),
    [
        ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "dpmpp_2m_karras", "DPM++ 2M Karras"),
        ({"sampler_name": "DPM++ 2M"}, "dpmpp_2m", "DPM++ 2M"),
        ({"sampler_name": "dpmpp_2m"}, "dpmpp_2m", "DPM++ 2M"),  # our own names work too
        ({"sampler_index": "Euler"}, "euler", "Euler"),  # the older alias
        ({}, "default", "default"),
    ],
)
def test_sampler_names_and_karras_choose_the_scheduler(client, generator, request_fields, scheduler, reported):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **request_fields})
    assert response.status_code == 200, response.text
    assert generator.jobs[0].params.scheduler == scheduler
    assert json.loads(response.json()["info"])["sampler_name"] == reported


def test_unknown_sampler_lists_the_valid_ones(client, generator):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Warp Drive"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "sampler_name" and "Euler a" in error["message"] and "DPM++ 2M Karras" in error["message"]
    assert generator.jobs == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 500}, "steps"),
        ({"steps": 51}, "steps"),  # over the deployment's limit (our num_inference_steps)
        ({"cfg_scale": 50}, "cfg_scale"),
        ({"width": 100}, "width"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),
    ],
)
def test_errors_use_a1111_field_names(client, body, field):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **body})
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


def test_img2img_uses_the_first_init_image_and_denoising_strength(client, generator):
    first, second = png_bytes((128, 64), seed=5), png_bytes((64, 64), seed=6)
    body = {
        "prompt": "x",
        "seed": 3,
        "steps": 10,
        "denoising_strength": 0.3,
        "init_images": [base64.b64encode(first).decode(), base64.b64encode(second).decode()],
    }
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    [job] = generator.jobs
    assert job.params.strength == 0.3 and job.init_image.shape == (64, 128, 3)
    assert np.array_equal(job.init_image, np.asarray(decode(first).convert("RGB")))
    assert json.loads(response.json()["info"])["denoising_strength"] == 0.3
    assert "init_images" not in response.json()["parameters"]  # not echoed back: it can be megabytes


def test_img2img_names_a_bad_init_image_or_mask(client, generator):
    init = base64.b64encode(png_bytes((64, 64))).decode()
    masked = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [init], "mask": "not base64!"})
    assert masked.status_code == 422 and masked.json()["error"]["field"] == "mask"  # masks: test_routes_edits.py
    bad = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["not base64!"]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "init_images.0"
    empty = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": []})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "init_images"
    assert generator.jobs == []


def test_probes_tools_call(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in samplers
    assert sorted(s["name"] for s in samplers) == sorted(spec.a1111_name for spec in SCHEDULERS.values())
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "synthetic:tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "synthetic:tiny"
