"""The web page's mask brush in a real headless Chromium against the demo: an image loaded, a stroke drawn, the job
it submits carries the mask (white where painted), and the image that comes back differs from the input only where
painted (paste-back on, no blur); erase and clear undo strokes; outpaint margins reach the request."""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from harness import job_when_final
from helpers import png_bytes
from PIL import Image
from playwright.sync_api import Page, expect


@pytest.fixture
def page(open_page, demo_server) -> Page:
    return open_page(demo_server)


@pytest.fixture
def init_file(tmp_path):
    path = tmp_path / "init.png"
    path.write_bytes(png_bytes((64, 64), seed=21))
    return path


def decoded(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2]))).convert("L"))


def stroke(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A drag across the mask canvas, in fractions of its shown size."""
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    for step in range(1, 9):
        x = start[0] + (end[0] - start[0]) * step / 8
        y = start[1] + (end[1] - start[1]) * step / 8
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
    page.mouse.up()


def test_a_painted_stroke_is_the_mask_and_only_it_is_repainted(page: Page, demo_server, init_file):
    page.fill("#prompt", "a red stripe")
    page.fill("#seed", "8")
    page.fill("#num_inference_steps", "3")
    page.click("#edit summary")
    page.set_input_files("#init-file", str(init_file))
    expect(page.locator("#edit-area")).to_be_visible()
    page.fill("#strength", "1")
    page.fill("#mask_blur", "0")
    page.fill("#brush-size", "12")
    stroke(page, (0.2, 0.5), (0.8, 0.5))

    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data)
    mask = decoded(body["mask"])
    assert mask.shape == (64, 64)
    painted = mask >= 128
    assert ((mask == 0) | (mask == 255)).all()  # binary: the brush's rim is in or out
    assert painted[32, 16:48].all() and not painted[:16].any() and not painted[48:].any()  # a horizontal band
    assert body["init_image"].startswith("data:image/png;base64,") and body["mask_blur"] == 0
    assert "paste_back" not in body  # on: the default

    job_id = sent.value.response().json()["id"]
    with httpx.Client(base_url=demo_server, timeout=60) as http:
        job = job_when_final(http, job_id)
        assert job["status"] == "succeeded", job
        result = np.asarray(Image.open(io.BytesIO(http.get(f"/jobs/{job_id}/images/0").content)).convert("RGB"))
    init = np.asarray(Image.open(init_file).convert("RGB"))
    changed = (np.abs(result.astype(int) - init.astype(int)) > 0).any(axis=2)
    assert not changed[~painted].any()  # outside the stroke: the input, exactly
    assert changed[painted].mean() > 0.5
    expect(page.locator(f'[data-job="{job_id}"] .card img')).to_have_attribute("src", re.compile(r"^blob:"))


def test_erase_and_clear_undo_strokes_and_outpaint_margins_are_sent(page: Page, init_file):
    page.fill("#prompt", "a wider view")
    page.click("#edit summary")
    page.set_input_files("#init-file", str(init_file))
    expect(page.locator("#edit-area")).to_be_visible()
    stroke(page, (0.1, 0.2), (0.9, 0.2))
    page.check("#brush-erase")
    page.fill("#brush-size", "40")
    stroke(page, (0.0, 0.2), (0.45, 0.2))  # rubs out the stroke's left half
    page.check("#brush-draw")
    held = []
    page.route("**/jobs", lambda route: (held.append(route.request), route.abort()))
    page.click("#generate")
    expect(page.locator("#error")).to_be_visible()  # the held request failed: the page says so
    mask = decoded(json.loads(held[0].post_data)["mask"]) >= 128
    assert not mask[:, :24].any() and mask[:, 36:52].any(axis=0).all()  # the left half gone, the right kept

    page.click("#mask-clear")
    page.fill("#outpaint-left", "16")
    page.fill("#outpaint-bottom", "8")
    page.click("#generate")
    expect(page.locator("#generate")).to_be_enabled()
    body = json.loads(held[1].post_data)
    assert "mask" not in body and body["outpaint"] == {"left": 16, "bottom": 8}
