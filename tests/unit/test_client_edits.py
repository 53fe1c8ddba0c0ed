"""The Python client's edit options (masks, outpainting, hires fix) as the requests they build, and those requests
accepted by the server's own request models: both sides name every field alike."""

from __future__ import annotations

import base64
import io

from PIL import Image

from serve_app.api.jobs.protocol import JobRequest
from serve_app.api.native.protocol import GenerateRequest, Img2ImgRequest
from serve_app.client import requests


def png(colour=255) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_img2img_sends_the_mask_and_how_to_repaint_it():
    options = {"mask": png(), "mask_blur": 2, "invert_mask": True, "fill": "noise", "paste_back": False}
    options.update(only_masked=True, only_masked_padding=8, outpaint={"left": 8}, strength=0.8)
    body = requests.img2img("a door", png(0), options).options["json"]
    assert base64.b64decode(body["mask"]) == png() and base64.b64decode(body["init_image"]) == png(0)
    parsed = Img2ImgRequest.model_validate(body)
    inpaint = parsed.image_params().inpaint
    assert (inpaint.mask_blur, inpaint.invert_mask, inpaint.fill, inpaint.only_masked) == (2, True, "noise", True)
    assert parsed.image_params().outpaint.left == 8


def test_generate_and_submit_send_hires_fix_and_masks():
    hires = {"scale": 1.5, "upscaler": "Lanczos", "steps": 3, "denoising_strength": 0.5}
    body = requests.generate("a castle", {"hires": hires}).options["json"]
    assert GenerateRequest.model_validate(body).image_params().hires.upscaler == "Lanczos"
    body = requests.submit("a door", {"init_image": png(0), "mask": png(), "fill": "blurred"}).options["json"]
    assert base64.b64decode(body["mask"]) == png()
    assert JobRequest.model_validate(body).image_params().inpaint.fill == "blurred"
