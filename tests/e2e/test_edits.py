"""Edits through real Serve on the demo config plus SD 3.5 and the inpainting UNet (`harness.with_every_family`):
masks in every model family and API family, outpainting, hires fix through the unmodified `webuiapi` client,
OpenAI's url answers, streaming with partial images and variations through the official `openai` client, jobs
and refine by id with a mask. The images are the real models'; that they equal diffusers' own: tests/unit/
test_inpaint_stepper.py, test_flow_inpaint.py, test_edit_engines.py."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from harness import job_when_final, with_every_family
from helpers import decode, png_bytes
from PIL import Image

INIT = png_bytes((64, 64), seed=11)
INIT_PIXELS = np.asarray(Image.open(io.BytesIO(INIT)).convert("RGB")).astype(int)
# Each family's way to mask: a UNet's 4-channel latents, the inpainting UNet's 9, SD 3.5's and FLUX.1's.
MODELS = ["synthetic:tiny", "synthetic:tiny-inpaint", "synthetic:tiny-sd3", "synthetic:tiny-flux-schnell"]


def mask_png(box=(16, 16, 48, 48), mode="L") -> bytes:
    """White box on black; mode RGBA: an opaque image whose box is fully transparent (OpenAI's convention)."""
    if mode == "RGBA":
        picture = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
        picture.paste((0, 0, 0, 0), box)
    else:
        picture = Image.new("L", (64, 64), 0)
        picture.paste(255, box)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BOX = np.zeros((64, 64), dtype=bool)
BOX[16:48, 16:48] = True


def changed(picture: Image.Image) -> np.ndarray:
    """Where a 64x64 result differs from the init image."""
    return (np.abs(np.asarray(picture.convert("RGB")).astype(int) - INIT_PIXELS) > 0).any(axis=2)


@pytest.fixture(scope="module")
def server(deployed_variant) -> str:
    return deployed_variant(with_every_family)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


# -- a mask in every model family: only the masked area changes (paste-back, no blur) ----------------


@pytest.mark.parametrize("model", MODELS)
def test_every_model_family_repaints_only_the_mask(http, model):
    body = {"prompt": "a red door", "init_image": b64(INIT), "mask": b64(mask_png()), "mask_blur": 0, "seed": 3}
    body.update(model=model, num_inference_steps=3, strength=1.0)
    response = http.post("/img2img", json=body)
    assert response.status_code == 200, response.text
    picture = decode(response.content)
    assert picture.size == (64, 64)
    diff = changed(picture)
    assert not diff[~BOX].any()  # outside the mask: the input's pixels, exactly
    assert diff[BOX].mean() > 0.5  # inside: repainted
    assert f"Model: {model}" in picture.info["parameters"]


def test_the_inpainting_model_refuses_a_request_without_a_mask(http):
    response = http.post("/generate", json={"prompt": "x", "model": "synthetic:tiny-inpaint"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "mask"


def test_outpainting_paints_the_new_border_and_keeps_the_image(http):
    body = {"prompt": "a wider view", "init_image": b64(INIT), "outpaint": {"left": 32, "bottom": 16}, "mask_blur": 0}
    response = http.post("/img2img", json={**body, "seed": 2, "fill": "blurred"})
    assert response.status_code == 200, response.text
    picture = np.asarray(decode(response.content).convert("RGB")).astype(int)
    assert picture.shape == (80, 96, 3)
    assert (picture[:64, 32:] == INIT_PIXELS).all()


# -- AUTOMATIC1111 through webuiapi, unmodified -------------------------------------------------------


@pytest.fixture
def webui(server):
    import webuiapi

    host, port = server.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_through_webuiapi_gives_the_asked_size(webui, upscaler):
    result = webui.txt2img(
        prompt="a castle", width=64, height=64, seed=7, enable_hr=True, hr_scale=2, hr_upscaler=upscaler
    )
    assert result.image.size == (128, 128)
    assert result.info["extra_generation_params"]["Hires upscaler"] == upscaler
    resized = webui.txt2img(prompt="a castle", width=64, height=64, seed=7, enable_hr=True, hr_resize_x=96)
    assert resized.image.size == (96, 96)


def test_inpainting_through_webuiapi(webui):
    image = Image.open(io.BytesIO(INIT))
    mask = Image.open(io.BytesIO(mask_png()))
    result = webui.img2img(
        images=[image], mask_image=mask, prompt="a window", seed=4, width=64, height=64, mask_blur=0,
        inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.9,
    )  # fmt: skip
    diff = changed(result.image)
    assert not diff[~BOX].any() and diff[BOX].mean() > 0.5


def test_webuiapi_controlnet_units_and_unknown_upscalers_are_refused(webui):
    import webuiapi

    unit = webuiapi.ControlNetUnit(image=Image.open(io.BytesIO(INIT)), module="canny", model="control_canny")
    with pytest.raises(RuntimeError, match="alwayson_scripts.ControlNet"):
        webui.txt2img(prompt="x", width=64, height=64, controlnet_units=[unit])
    with pytest.raises(RuntimeError, match="hr_upscaler"):
        # (webuiapi keeps its units in the default alwayson_scripts dict between calls: give it a fresh one)
        webui.txt2img(prompt="x", width=64, height=64, enable_hr=True, hr_upscaler="R-ESRGAN 4x+", alwayson_scripts={})
    names = [u["name"] for u in webui.get_upscalers()]
    assert "Lanczos" in names
    upscaled = webui.extra_single_image(Image.open(io.BytesIO(INIT)), upscaling_resize=2, upscaler_1="Lanczos")
    assert upscaled.image.size == (128, 128)


# -- OpenAI through the official client ----------------------------------------------------------------


def test_openai_edit_with_a_mask_answered_as_a_link(oai, http):
    result = oai.images.edit(
        image=("cat.png", INIT), mask=("mask.png", mask_png(mode="RGBA")), prompt="a hat", response_format="url",
        extra_body={"seed": 5, "num_inference_steps": 3, "strength": 1.0},
    )  # fmt: skip
    data = httpx.get(result.data[0].url, timeout=60)
    assert data.status_code == 200
    diff = changed(Image.open(io.BytesIO(data.content)))
    assert not diff[~BOX].any() and diff[BOX].any()


def test_openai_streaming_with_partial_images(oai):
    stream = oai.images.generate(
        prompt="a fox", size="64x64", stream=True, partial_images=2, extra_body={"num_inference_steps": 8}
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed" and decode(events[-1].b64_json).size == (64, 64)
    partials = [event for event in events if event.type == "image_generation.partial_image"]
    assert 1 <= len(partials) <= 2
    assert [p.partial_image_index for p in partials] == list(range(len(partials)))
    edits = list(
        oai.images.edit(
            image=("cat.png", INIT), mask=("mask.png", mask_png(mode="RGBA")), prompt="a hat", stream=True,
            partial_images=1, extra_body={"num_inference_steps": 6},
        )
    )  # fmt: skip
    assert edits[-1].type == "image_edit.completed" and edits[0].type.startswith("image_edit.")


def test_openai_variations(oai):
    made = oai.images.generate(prompt="a lighthouse", size="64x64", extra_body={"seed": 9}).data[0].b64_json
    result = oai.images.create_variation(image=("lighthouse.png", base64.b64decode(made)), n=2, size="64x64")
    pictures = [decode(item.b64_json) for item in result.data]
    assert [p.size for p in pictures] == [(64, 64)] * 2
    assert "a lighthouse" in pictures[0].info["parameters"]  # the image's own prompt, read from its PNG


# -- jobs and refine by id with a mask -------------------------------------------------------------------


def test_a_job_with_a_mask_then_refined_by_id_with_another(http):
    body = {"prompt": "a door", "init_image": b64(INIT), "mask": b64(mask_png()), "mask_blur": 0, "seed": 6}
    submitted = http.post("/jobs", json={**body, "num_inference_steps": 3, "strength": 1.0})
    assert submitted.status_code == 202, submitted.text
    job = job_when_final(http, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["params"]["inpaint"]["mask_blur"] == 0
    first = Image.open(io.BytesIO(http.get(f"/jobs/{job['id']}/images/0").content))
    diff = changed(first)
    assert not diff[~BOX].any() and diff[BOX].any()

    corner = (0, 0, 16, 16)
    refine = {"id": job["id"], "mask": b64(mask_png(box=corner)), "mask_blur": 0, "strength": 1.0}
    refined = http.post("/refine", json={**refine, "num_inference_steps": 3})
    assert refined.status_code == 202, refined.text
    second = job_when_final(http, refined.json()["id"])
    assert second["status"] == "succeeded" and second["refined_from"] == f"{job['id']}/0"
    again = np.asarray(Image.open(io.BytesIO(http.get(f"/jobs/{second['id']}/images/0").content)).convert("RGB"))
    moved = (np.abs(again.astype(int) - np.asarray(first.convert("RGB")).astype(int)) > 0).any(axis=2)
    inside = np.zeros((64, 64), dtype=bool)
    inside[0:16, 0:16] = True
    assert not moved[~inside].any() and moved[inside].any()  # only the refined corner changed
