"""The native API's routes (/generate, /generate/prompts, /img2img) over a fake Generator: what reaches
the Generator, and how its images come back (formats, headers, metadata, zip, errors). Images made
by the real model, and real batching, are checked in tests/e2e."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np
import pytest
from fake_generation import fake_pixels
from helpers import decode, pixels, png, png_bytes
from PIL import Image


def test_generate_returns_the_generators_pixels_as_png_with_seed_batch_and_timing_headers(client, generator):
    response = client.post("/generate", json={"prompt": "a lighthouse", "width": 128, "height": 64, "seed": 1234})
    image = png(response)
    [job] = generator.jobs
    assert image.size == (128, 64) and image.mode == "RGB"
    assert np.array_equal(pixels(image), fake_pixels(job.with_defaults(generator.defaults)))  # PNG is lossless
    assert response.headers["x-seed"] == "1234" and response.headers["x-batch-size"] == "1"
    assert response.headers["x-generation-time-s"] == "0.0125"


def test_every_parameter_reaches_the_generator_and_left_out_ones_stay_unset(client, generator):
    body = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "seed": 5,
        "num_inference_steps": 3,
        "guidance_scale": 6.0,
        "scheduler": "euler_a",
        "width": 96,
    }
    client.post("/generate", json=body, headers={"X-Request-Id": "rid-1"})
    [job] = generator.jobs
    # The model is resolved (the default, unnamed) at the ingress: it routes the job.
    assert job.params.model_dump(exclude_none=True) == {
        **body,
        "model": "synthetic:tiny",
        "loras": (),
        "controlnet": (),
    }
    assert job.params.height is None and job.init_image is None  # the Generator fills in its model's defaults
    assert job.request_id == "rid-1" and job.submitted_at is not None


def test_png_embeds_the_parameters_the_image_was_made_with(client):
    image = png(
        client.post(
            "/generate", json={"prompt": "a tower", "negative_prompt": "fog", "seed": 3, "scheduler": "euler_a"}
        )
    )
    assert image.info["parameters"].splitlines() == [
        "a tower",
        "Negative prompt: fog",
        # Steps and size are the model's defaults, as the Generator reported them.
        "Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 64x64, Model: synthetic:tiny",
    ]


def test_json_mode_returns_base64_images_and_metadata(client):
    body = {"prompt": "a red fox", "seed": 5, "width": 96, "num_inference_steps": 3, "response_format": "json"}
    response = client.post("/generate", json=body, headers={"X-Request-Id": "my-request-1"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    [image] = response.json()["images"]
    assert (image["seed"], image["media_type"], image["batch_size"]) == (5, "image/png", 1)
    assert decode(image["b64"]).size == (96, 64)
    meta = response.json()["metadata"]
    assert {k: meta[k] for k in ("prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed")} == {
        "prompt": "a red fox",
        "width": 96,
        "height": 64,
        "num_inference_steps": 3,
        "guidance_scale": 7.5,
        "seed": 5,
    }
    assert meta["model"] == "synthetic:tiny" and meta["seeds"] == [5] and meta["request_id"] == "my-request-1"
    assert meta["generation_time_s"] == 0.0125


def test_a_left_out_seed_is_drawn_and_reported(client, generator):
    seeds = [int(client.post("/generate", json={"prompt": "a fox"}).headers["x-seed"]) for _ in range(2)]
    assert seeds == [job.seed for job in generator.jobs]
    assert seeds[0] != seeds[1]


def test_num_images_gives_consecutive_seeds_submitted_together(client, generator):
    response = client.post("/generate", json={"prompt": "four foxes", "seed": 10, "num_images": 4})
    assert response.headers["content-type"] == "application/json"  # several images: JSON unless asked otherwise
    data = response.json()
    assert [i["seed"] for i in data["images"]] == [10, 11, 12, 13] == data["metadata"]["seeds"]
    assert [job.seed for job in generator.jobs] == [10, 11, 12, 13]
    # Handed on together, so the Generator can batch them: one batch of 4.
    assert generator.batch_sizes == [4] and data["metadata"]["batch_size"] == 4
    pictures = [pixels(decode(i["b64"])) for i in data["images"]]
    assert all(not np.array_equal(pictures[0], other) for other in pictures[1:])


def test_seeds_wrap_around_at_the_top(client):
    data = client.post("/generate", json={"prompt": "x", "seed": 2**32 - 1, "num_images": 2}).json()
    assert data["metadata"]["seeds"] == [2**32 - 1, 0]


def test_num_images_is_limited_and_one_image_format_needs_one_image(client, generator):
    response = client.post("/generate", json={"prompt": "x", "num_images": 5})
    assert response.status_code == 422 and response.json()["error"]["field"] == "num_images"
    assert "between 1 and 4" in response.json()["error"]["message"]
    response = client.post("/generate", json={"prompt": "x", "num_images": 2, "response_format": "image"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "response_format"
    assert generator.jobs == []  # refused before any work was handed on


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"prompt": "x", "width": 65}, "width", "multiple of 8"),
        ({"prompt": "x", "width": 512}, "width", "a multiple of 8 from 64 to 256"),
        ({"prompt": "x", "height": 32}, "height", "a multiple of 8 from 64 to 256"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "between 1 and 50 (got 0)"),
        ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps", "between 1 and 50"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "between 0 and 30 (got -1)"),
        ({"prompt": "x", "seed": -5}, "seed", "between 0 and 4294967295"),
        ({"prompt": "x", "scheduler": "warp"}, "scheduler", "euler_a"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"negative_prompt": "x"}, "prompt", "required"),
        ({"prompt": "x", "sead": 1}, "sead", "unknown field"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
        ({"prompt": "x", "strength": 0.5}, "strength", "image-to-image only"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "png"),
    ],
)
def test_invalid_requests_get_422_naming_the_field(client, generator, body, field, says):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and says in error["message"], error
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert generator.jobs == []


def test_several_problems_are_listed_in_details(client):
    error = client.post("/generate", json={"prompt": "", "width": 65}).json()["error"]
    assert {d["field"] for d in error["details"]} == {"prompt", "width"}


@pytest.mark.parametrize(
    ("fmt", "media_type", "pil_format"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")]
)
def test_output_formats(client, fmt, media_type, pil_format):
    response = client.post("/generate", json={"prompt": "x", "seed": 1, "output_format": fmt, "quality": 70})
    assert response.status_code == 200 and response.headers["content-type"] == media_type
    assert decode(response.content).format == pil_format
    low = client.post("/generate", json={"prompt": "x", "seed": 1, "output_format": fmt, "quality": 5})
    assert len(low.content) < len(response.content)  # quality is passed on to the encoder
    data = client.post("/generate", json={"prompt": "x", "output_format": fmt, "response_format": "json"}).json()
    assert data["images"][0]["media_type"] == media_type


def test_accept_header_chooses_json_or_zip(client):
    as_json = client.post("/generate", json={"prompt": "x"}, headers={"Accept": "application/json"})
    assert as_json.headers["content-type"] == "application/json" and len(as_json.json()["images"]) == 1
    as_png = client.post("/generate", json={"prompt": "x"}, headers={"Accept": "image/png, application/json"})
    assert as_png.headers["content-type"] == "image/png"
    as_zip = client.post(
        "/generate", json={"prompt": "x", "num_images": 2, "seed": 4}, headers={"Accept": "application/zip"}
    )
    assert as_zip.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(as_zip.content))
    assert sorted(archive.namelist()) == ["00-4.png", "01-5.png", "metadata.json"]
    assert json.loads(archive.read("metadata.json"))["seeds"] == [4, 5]
    assert decode(archive.read("01-5.png")).info["parameters"].count("Seed: 5") == 1
    # response_format wins over Accept.
    asked = client.post("/generate", json={"prompt": "x", "response_format": "zip"}, headers={"Accept": "image/png"})
    assert asked.headers["content-type"] == "application/zip"


def test_batch_of_prompts_as_json_is_handed_on_at_once(client, generator):
    body = {"prompts": ["a cat", "a dog", "a bird"], "seed": 100, "width": 128, "num_images": 2}
    response = client.post("/generate/prompts", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["metadata"]["prompt"] for r in results] == ["a cat", "a dog", "a bird"]
    assert [[i["seed"] for i in r["images"]] for r in results] == [[100, 101], [102, 103], [104, 105]]
    assert all(decode(i["b64"]).size == (128, 64) for r in results for i in r["images"])
    assert generator.batch_sizes == [6]  # one submission, not a loop of single calls
    assert {r["metadata"]["request_id"] for r in results} == {response.json()["request_id"]}


def test_batch_of_full_requests_as_zip(client, generator):
    body = {
        "requests": [{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "num_images": 2, "seed": 7, "width": 96}],
        "num_inference_steps": 3,
    }
    response = client.post("/generate/prompts", json=body, headers={"Accept": "application/zip"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["000-00-1.png", "001-00-7.png", "001-01-8.png", "metadata.json"]
    assert decode(archive.read("001-01-8.png")).size == (96, 64)
    meta = json.loads(archive.read("metadata.json"))
    assert [m["num_inference_steps"] for m in meta] == [3, 3] and [m["seeds"] for m in meta] == [[1], [7, 8]]
    assert [job.params.num_inference_steps for job in generator.jobs] == [3, 3, 3]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": ["a"] * 17}, "prompts"),
        ({"prompts": ["a"], "requests": [{"prompt": "b"}]}, "body"),
        ({"requests": [{"prompt": "ok"}, {"seed": 1}]}, "requests.1.prompt"),
        ({"requests": [{"prompt": "ok"}, {"prompt": "x", "width": 1000}]}, "requests.1.width"),
        ({"requests": [{"prompt": "ok"}, {"prompt": "x", "num_images": 9}]}, "requests.1.num_images"),
        ({"prompts": ["fine", "  "]}, "prompts"),
    ],
)
def test_batch_errors_name_the_entry(client, generator, body, field):
    response = client.post("/generate/prompts", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert generator.jobs == []


def test_img2img_json_and_multipart_hand_on_the_same_init_image(client, generator):
    init = png_bytes((128, 64), seed=1)
    fields = {"prompt": "night", "seed": 9, "strength": 0.6, "num_inference_steps": 5}
    as_json = client.post("/img2img", json={**fields, "init_image": base64.b64encode(init).decode()})
    as_form = client.post(
        "/img2img", data={k: str(v) for k, v in fields.items()}, files={"init_image": ("init.png", init, "image/png")}
    )
    a, b = png(as_json), png(as_form)
    assert a.size == b.size == (128, 64)  # the init image's size
    sent = pixels(Image.open(io.BytesIO(init)))
    assert all(np.array_equal(job.init_image, sent) for job in generator.jobs)
    assert generator.jobs[0].params == generator.jobs[1].params and generator.jobs[0].params.strength == 0.6
    assert np.array_equal(pixels(a), pixels(b))
    assert "Denoising strength: 0.6" in a.info["parameters"]


def test_img2img_accepts_a_data_url_and_resizes_to_the_size_asked(client, generator):
    init = "data:image/png;base64," + base64.b64encode(png_bytes((64, 64), seed=2)).decode()
    response = client.post(
        "/img2img", json={"prompt": "x", "init_image": init, "width": 128, "height": 96, "response_format": "json"}
    )
    assert decode(response.json()["images"][0]["b64"]).size == (128, 96)
    assert generator.jobs[0].init_image.shape == (96, 128, 3)


def test_img2img_fits_a_large_init_image_inside_the_limits(client, generator):
    init = base64.b64encode(png_bytes((1000, 500), seed=2)).decode()
    response = client.post("/img2img", json={"prompt": "x", "init_image": init, "response_format": "json"})
    assert response.status_code == 200, response.text
    assert generator.jobs[0].init_image.shape == (128, 256, 3)  # 256 wide at most (the demo's limit), aspect kept


@pytest.mark.parametrize(
    ("init_image", "says"),
    [
        ("not base64!", "base64"),
        (base64.b64encode(b"GIF89a not really").decode(), "not an image"),
        (base64.b64encode(png_bytes((64, 64))[:60]).decode(), "truncated or corrupt"),
    ],
)
def test_img2img_rejects_bad_images(client, generator, init_image, says):
    response = client.post("/img2img", json={"prompt": "x", "init_image": init_image})
    assert response.status_code == 422 and response.json()["error"]["field"] == "init_image"
    assert says in response.json()["error"]["message"]
    assert generator.jobs == []


def test_img2img_rejects_a_decompression_bomb_before_decoding(client, generator):
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # 25 megapixels in ~25 kB
    response = client.post(
        "/img2img", files={"init_image": ("bomb.png", buffer.getvalue(), "image/png")}, data={"prompt": "x"}
    )
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("payload_too_large", "init_image") and "pixels" in error["message"]
    assert generator.jobs == []


def test_img2img_multipart_fields_are_validated_like_json(client):
    init = ("init.png", png_bytes((64, 64)), "image/png")
    missing = client.post("/img2img", data={"prompt": "x"}, files={"other": ("a.txt", b"hi", "text/plain")})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "init_image"
    not_a_number = client.post("/img2img", data={"prompt": "x", "strength": "abc"}, files={"init_image": init})
    assert not_a_number.status_code == 422 and not_a_number.json()["error"]["field"] == "strength"
    unknown = client.post("/img2img", data={"prompt": "x", "sead": "1"}, files={"init_image": init})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "sead"


@pytest.mark.parametrize(
    ("content", "content_type", "says"),
    [
        (b"--xx\r\n", "multipart/form-data", "boundary"),
        (b"garbage", "multipart/form-data; boundary=xx", "multipart"),
    ],
)
def test_unparseable_multipart_is_400(client, content, content_type, says):
    response = client.post("/img2img", content=content, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"].lower()
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_multipart_with_more_than_one_file_is_400(client, generator):
    init = png_bytes((64, 64))
    response = client.post(
        "/img2img",
        data={"prompt": "x"},
        files=[("init_image", ("a.png", init, "image/png")), ("init_image", ("b.png", init, "image/png"))],
    )
    assert response.status_code == 400 and "files" in response.json()["error"]["message"].lower()
    assert generator.jobs == []
