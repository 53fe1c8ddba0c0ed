"""The web page's ControlNet section in a real headless Chromium against the demo: offered for the model that serves
ControlNets (and hidden for the one that serves none), a control image picked with its ControlNet, preprocessor and
scale reaches POST /jobs as a unit, and the job's image is the one the same native request makes."""

from __future__ import annotations

import base64
import io
import json

import cv2
import httpx
import numpy as np
import pytest
from harness import job_when_final
from PIL import Image
from playwright.sync_api import Page, expect


@pytest.fixture
def page(open_page, demo_server) -> Page:
    return open_page(demo_server)


@pytest.fixture
def control_file(tmp_path):
    image = np.full((64, 64, 3), 210, dtype=np.uint8)
    cv2.rectangle(image, (12, 20), (44, 50), (30, 60, 150), -1)
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    return path


def test_a_control_image_reaches_the_job_and_steers_it(page: Page, demo_server, control_file):
    expect(page.locator("#control")).to_be_visible()  # the default model serves ControlNets
    expect(page.locator("#controlnet-name option")).to_have_text(["edges", "scribble"])
    page.fill("#prompt", "a house")
    page.fill("#seed", "4")
    page.fill("#num_inference_steps", "3")
    page.click("#control summary")
    page.select_option("#controlnet-name", "scribble")
    page.select_option("#control-preprocess", "canny")
    page.fill("#control-scale", "0.7")
    page.set_input_files("#control-file", str(control_file))
    expect(page.locator("#control-area")).to_be_visible()

    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data)
    [unit] = body["controlnet"]
    assert (unit["name"], unit["preprocess"], unit["scale"]) == ("scribble", "canny", 0.7)
    assert unit["image"].startswith("data:image/png;base64,")
    expect(page.locator(".card .details").first).to_contain_text("ControlNet scribble 0.7")

    job_id = sent.value.response().json()["id"]
    with httpx.Client(base_url=demo_server, timeout=120) as http:
        job = job_when_final(http, job_id)
        assert job["status"] == "succeeded", job
        served = http.get(f"/jobs/{job_id}/images/0").content
        native = {"prompt": "a house", "seed": 4, "num_inference_steps": 3, "controlnet": [unit]}
        again = http.post("/generate", json=native)
        assert again.status_code == 200, again.text
    pixels = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int) for data in (served, again.content)]
    assert np.abs(pixels[0] - pixels[1]).max() == 0
    plain = base64.b64decode(unit["image"].partition(",")[2])
    assert Image.open(io.BytesIO(plain)).size == (64, 64)


def test_the_section_hides_for_a_model_without_controlnets(page: Page):
    expect(page.locator("#model-field")).to_be_visible()
    page.select_option("#model", "synthetic:tiny-flux-schnell")
    expect(page.locator("#control")).to_be_hidden()
    page.select_option("#model", "synthetic:tiny")
    expect(page.locator("#control")).to_be_visible()
