"""Masks, outpainting, hires fix and the rest of OpenAI's Images API at the HTTP edge of every family, over a fake
Generator: what reaches the engine (the mask as an array the image's size, white = repaint; the shared record's
inpaint, outpaint and hires), and the 4xx that name the field. The pictures themselves: tests/unit/
test_inpaint_stepper.py, test_flow_inpaint.py, test_edit_engines.py and tests/e2e/test_edits.py."""

from __future__ import annotations

import io
import json

import numpy as np
import openai
import pytest
from helpers import b64, decode, error_of, png_bytes
from PIL import Image

from serve_app.pipeline.params import HiresParams, InpaintParams, Outpaint
from serve_app.service.encoding import decode_input, encode_input

INIT = png_bytes((64, 64), seed=3)


def mask_png(size=(64, 64), box=(16, 16, 48, 48), mode="L", **save) -> bytes:
    """White box on black (mode L/RGB), or for mode RGBA an opaque image whose box is fully transparent."""
    if mode == "RGBA":
        picture = Image.new("RGBA", size, (0, 0, 0, 255))
        picture.paste((0, 0, 0, 0), box)
    else:
        picture = Image.new(mode, size, 0)
        picture.paste(255 if mode == "L" else (255, 255, 255), box)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", **save)
    return buffer.getvalue()


# -- native -------------------------------------------------------------------------------------


def test_img2img_with_a_mask_hands_the_engine_the_mask_and_how_to_repaint(client, generator):
    body = {"prompt": "a red door", "init_image": b64(INIT), "mask": b64(mask_png()), "seed": 1}
    body.update(mask_blur=8, fill="noise", paste_back=False, strength=0.9)
    response = client.post("/img2img", json=body)
    assert response.status_code == 200, response.text
    [task] = generator.jobs
    assert task.kind == "inpaint" and task.mask.shape == (64, 64) and task.mask.dtype == np.uint8
    assert task.mask[32, 32] == 255 and task.mask[0, 0] == 0
    assert task.params.inpaint == InpaintParams(mask_blur=8, fill="noise", paste_back=False)
    assert task.params.strength == 0.9


def test_img2img_takes_the_mask_as_a_file_too_and_inverts_it(client, generator):
    files = {"init_image": ("cat.png", INIT, "image/png"), "mask": ("mask.png", mask_png(), "image/png")}
    response = client.post("/img2img", files=files, data={"prompt": "a cat", "invert_mask": "true"})
    assert response.status_code == 200, response.text
    [task] = generator.jobs
    assert task.mask[32, 32] == 0 and task.mask[0, 0] == 255  # inverted: everything but the box
    assert task.params.inpaint.invert_mask and task.params.inpaint.mask_blur == 4  # the default blur


def test_a_mask_drawn_on_a_transparent_layer_is_read_by_its_alpha(client, generator):
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 16, 16))  # an opaque stroke on a transparent canvas
    buffer = io.BytesIO()
    layer.save(buffer, format="PNG")
    client.post("/img2img", json={"prompt": "x", "init_image": b64(INIT), "mask": b64(buffer.getvalue())})
    [task] = generator.jobs
    assert task.mask[8, 8] == 255 and task.mask[40, 40] == 0


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (mask_png(size=(32, 32), box=(0, 0, 16, 16)), "is 32x32 pixels and the image 64x64"),
        (mask_png(box=(0, 0, 0, 0)), "selects no pixel"),
        (mask_png(box=(3, 3, 4, 4)), "covers too little"),
        (b"not an image", "is not an image"),
    ],
    ids=["wrong-size", "all-black", "a-speck", "not-an-image"],
)
def test_masks_that_cannot_repaint_are_422_naming_the_mask(client, generator, mask, message):
    body = {"prompt": "x", "init_image": b64(INIT), "mask": b64(mask), "mask_blur": 0}
    error = error_of(client.post("/img2img", json=body))
    assert error["field"] == "mask" and message in error["message"], error
    assert not generator.jobs


def test_a_16_bit_mask_is_refused_by_its_mode(client):
    picture = Image.fromarray(np.full((64, 64), 60000, dtype=np.uint16))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    error = error_of(
        client.post("/img2img", json={"prompt": "x", "init_image": b64(INIT), "mask": b64(buffer.getvalue())})
    )
    assert error["field"] == "mask" and "mode" in error["message"]


def test_mask_options_without_a_mask_are_422(client):
    error = error_of(client.post("/img2img", json={"prompt": "x", "init_image": b64(INIT), "mask_blur": 3}))
    assert error["field"] == "mask_blur" and "mask" in error["message"]
    error = error_of(client.post("/generate", json={"prompt": "x", "outpaint": {"left": 8}}))
    assert error["field"] == "outpaint"


def test_outpainting_pads_the_image_and_masks_the_new_border(client, generator):
    body = {"prompt": "more beach", "init_image": b64(INIT), "outpaint": {"left": 16, "top": 8}, "fill": "blurred"}
    response = client.post("/img2img", json=body)
    assert response.status_code == 200, response.text
    [task] = generator.jobs
    original = np.asarray(Image.open(io.BytesIO(INIT)).convert("RGB"))
    assert task.init_image.shape == (72, 80, 3) and (task.init_image[8:, 16:] == original).all()
    assert (task.mask[:8] == 255).all() and (task.mask[:, :16] == 255).all() and (task.mask[8:, 16:] == 0).all()
    assert task.params.outpaint == Outpaint(left=16, top=8) and task.params.inpaint.fill == "blurred"
    assert decode(response.content).size == (80, 72)


def test_outpainting_past_the_limits_is_422_naming_it(client):
    body = {"prompt": "x", "init_image": b64(INIT), "outpaint": {"left": 256}}
    error = error_of(client.post("/img2img", json=body))
    assert error["field"] == "outpaint" and "320x64" in error["message"]


def test_generate_with_hires_fix(client, generator):
    hires = {"scale": 2, "upscaler": "Lanczos", "steps": 3, "denoising_strength": 0.5}
    response = client.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "hires": hires})
    assert response.status_code == 200, response.text
    assert generator.jobs[0].params.hires == HiresParams(**hires)
    error = error_of(client.post("/generate", json={"prompt": "x", "width": 128, "height": 128, "hires": {"scale": 4}}))
    assert error["field"] == "hires" and "512x512" in error["message"]  # the demo's limit is 256
    error = error_of(client.post("/generate", json={"prompt": "x", "hires": {"scale": 2}}))  # no first-pass size
    assert error["field"] == "hires" and "width and height" in error["message"]


def test_a_stored_input_keeps_its_mask_in_the_alpha_channel():
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[4:8] = 255
    got_image, got_mask = decode_input(encode_input(image, mask))
    assert (got_image == image).all() and (got_mask == mask).all()
    got_image, got_mask = decode_input(encode_input(image))
    assert (got_image == image).all() and got_mask is None


# -- AUTOMATIC1111 ------------------------------------------------------------------------------

# What webuiapi 0.9.17 sends with every txt2img call (its defaults): accepted, none of it changes the picture.
WEBUIAPI_TXT2IMG = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
    "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7.0, "width": 64, "height": 64,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
    "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
    "override_settings_restore_afterwards": True, "sampler_name": "Euler a", "scheduler": "automatic",
    "sampler_index": "Euler a", "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {},
}  # fmt: skip


def test_webuiapis_default_fields_are_accepted_and_hires_fix_maps_to_the_record(client, generator):
    assert client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_TXT2IMG, "prompt": "x"}).status_code == 200
    assert generator.jobs[0].params.hires is None
    body = {**WEBUIAPI_TXT2IMG, "prompt": "x", "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 3}
    body.update(hr_upscaler="Latent (nearest)", hr_prompt="sharper", hr_sampler_name="DPM++ 2M", hr_scheduler="Karras")
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert generator.jobs[1].params.hires == HiresParams(
        scale=1.5, upscaler="Latent (nearest)", steps=3, denoising_strength=0.7, prompt="sharper",
        scheduler="dpmpp_2m_karras",
    )  # fmt: skip
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"]["Hires upscaler"] == "Latent (nearest)"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": True}, "tiling"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"eta": 0.5}, "eta"),
        ({"subseed_strength": 0.3}, "subseed_strength"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
        (  # a unit that names no ControlNet (the units themselves: tests/unit/test_controlnet_routes.py)
            {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "image": "..."}]}}},
            "alwayson_scripts.ControlNet.args.0.model",
        ),
        ({"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face"}]}}}, "alwayson_scripts.ADetailer"),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"enable_hr": True, "hr_checkpoint_name": "another"}, "hr_checkpoint_name"),
        ({"enable_hr": True, "hr_resize_x": 100}, "hr_resize_x"),
        ({"scheduler": "Exponential"}, "scheduler"),
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler"),
    ],
)
def test_a1111_fields_that_would_change_the_picture_are_refused_by_name(client, generator, fields, named):
    error = error_of(client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_TXT2IMG, "prompt": "x", **fields}))
    assert error["field"] == named, error
    assert not generator.jobs


def test_disabled_scripts_as_webuiapi_sends_them_are_accepted(client):
    scripts = {"ControlNet": {"args": []}, "ADetailer": {"args": [False]}}
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": scripts}).status_code == 200


def test_a1111_img2img_with_a_mask(client, generator):
    body = {"prompt": "x", "init_images": [b64(INIT)], "mask": b64(mask_png()), "mask_blur": 2}
    body.update(inpainting_fill=2, inpaint_full_res=True, inpaint_full_res_padding=16, inpainting_mask_invert=1)
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    [task] = generator.jobs
    assert task.params.inpaint == InpaintParams(
        mask_blur=2, invert_mask=True, fill="noise", only_masked=True, only_masked_padding=16
    )
    assert task.mask[32, 32] == 0 and task.mask[0, 0] == 255
    assert json.loads(response.json()["info"])["is_using_inpainting_conditioning"]
    error = error_of(client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 3}))
    assert error["field"] == "inpainting_fill"
    error = error_of(client.post("/sdapi/v1/img2img", json={**body, "mask": b64(mask_png(size=(32, 32)))}))
    assert error["field"] == "mask" and "32x32" in error["message"]


def test_a1111_upscalers_and_extra_single_image(client):
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert names == ["Lanczos", "Nearest", "None"]
    assert "Latent (nearest)" in [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    body = {"image": b64(INIT), "upscaling_resize": 2, "upscaler_1": "Nearest"}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text
    upscaled = np.asarray(decode(response.json()["image"]).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(INIT)).convert("RGB"))
    assert upscaled.shape == (128, 128, 3) and (upscaled[::2, ::2] == original).all()
    sized = {"image": b64(INIT), "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 64}
    assert decode(client.post("/sdapi/v1/extra-single-image", json=sized).json()["image"]).size == (96, 64)
    error = error_of(client.post("/sdapi/v1/extra-single-image", json={**body, "gfpgan_visibility": 1}))
    assert error["field"] == "gfpgan_visibility"
    error = error_of(client.post("/sdapi/v1/extra-single-image", json={**body, "upscaler_1": "R-ESRGAN 4x+"}))
    assert error["field"] == "upscaler_1"


# -- OpenAI ----------------------------------------------------------------------------------------


@pytest.fixture
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_edits_take_a_mask_whose_transparent_pixels_are_the_area_to_edit(oai, generator):
    result = oai.images.edit(image=("cat.png", INIT), mask=("mask.png", mask_png(mode="RGBA")), prompt="a hat")
    assert decode(result.data[0].b64_json).size == (64, 64)
    [task] = generator.jobs
    assert task.mask[32, 32] == 255 and task.mask[0, 0] == 0
    assert task.params.inpaint == InpaintParams(mask_blur=0, paste_back=True)


def test_edit_masks_without_alpha_or_of_another_size_are_4xx_saying_so(oai, generator):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oai.images.edit(image=("cat.png", INIT), mask=("mask.png", mask_png()), prompt="a hat")
    assert refused.value.body["param"] == "mask" and "alpha" in refused.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oai.images.edit(image=("cat.png", INIT), mask=("m.png", mask_png(size=(32, 32), mode="RGBA")), prompt="a")
    assert (
        refused.value.body["param"] == "mask" and "is 32x32 pixels and the image 64x64" in refused.value.body["message"]
    )
    assert not generator.jobs


@pytest.mark.parametrize("partial_images", [0, 2])
def test_streaming_generations_as_openai_sends_them(oai, partial_images):
    steps = {"num_inference_steps": 6}  # partial images are spread over the steps: 2 at steps 2 and 4
    stream = oai.images.generate(prompt="a fox", stream=True, partial_images=partial_images, extra_body=steps)
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * partial_images + ["image_generation.completed"]
    for index, event in enumerate(events[:-1]):
        assert event.partial_image_index == index and decode(event.b64_json).size == (64, 64)
    assert decode(events[-1].b64_json).size == (64, 64) and events[-1].size == "64x64"


def test_streaming_edits_send_image_edit_events(oai):
    stream = oai.images.edit(
        image=("cat.png", INIT),
        mask=("mask.png", mask_png(mode="RGBA")),
        prompt="a hat",
        stream=True,
        partial_images=1,
        extra_body={"num_inference_steps": 4},
    )
    assert [event.type for event in stream] == ["image_edit.partial_image", "image_edit.completed"]


def test_a_stream_cannot_answer_with_links(client):
    body = {"prompt": "x", "stream": True, "response_format": "url"}
    assert client.post("/v1/images/generations", json=body).json()["error"]["param"] == "response_format"


def test_variations_vary_the_image_with_its_own_prompt(oai, client, generator):
    made = client.post("/generate", json={"prompt": "a lighthouse at dawn", "seed": 5}).content  # carries its prompt
    result = oai.images.create_variation(image=("lighthouse.png", made), n=2, size="64x64")
    assert len(result.data) == 2 and result.data[1].seed == result.data[0].seed + 1
    variations = generator.jobs[1:]
    assert [t.params.prompt for t in variations] == ["a lighthouse at dawn"] * 2
    assert all(t.kind == "img2img" and t.params.strength == 0.6 for t in variations)
    oai.images.create_variation(image=("noise.png", INIT), extra_body={"strength": 0.3})
    assert generator.jobs[-1].params.prompt == " " and generator.jobs[-1].params.strength == 0.3
