"""Native API beyond the basics: several images, formats, batches, image-to-image."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import pytest
from helpers import burst, decode, max_diff, png, png_bytes


def test_num_images_gives_distinct_reproducible_seeds_batched_together(client):
    body = {"prompt": "four foxes", "seed": 10, "num_images": 4}
    first = client.post("/generate", json=body).json()
    assert [i["seed"] for i in first["images"]] == [10, 11, 12, 13] == first["metadata"]["seeds"]
    assert first["metadata"]["batch_size"] >= 2  # the request's own images share calls
    pictures = [decode(i["b64"]) for i in first["images"]]
    assert all(max_diff(pictures[0], other) > 10 for other in pictures[1:])
    again = client.post("/generate", json=body).json()
    assert all(max_diff(decode(a["b64"]), decode(b["b64"])) <= 1 for a, b in zip(first["images"], again["images"]))
    # Image 2 of seed 10 is image 1 of seed 12.
    alone = png(client.post("/generate", json={"prompt": "four foxes", "seed": 12}))
    assert max_diff(alone, pictures[2]) <= 1


def test_num_images_is_limited_and_image_format_needs_one_image(client):
    response = client.post("/generate", json={"prompt": "x", "num_images": 5})
    assert response.status_code == 422 and response.json()["error"]["field"] == "num_images"
    assert "between 1 and 4" in response.json()["error"]["message"]
    response = client.post("/generate", json={"prompt": "x", "num_images": 2, "response_format": "image"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "response_format"


@pytest.mark.parametrize(
    ("fmt", "media_type", "pil_format"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")]
)
def test_output_formats(client, fmt, media_type, pil_format):
    response = client.post("/generate", json={"prompt": "x", "seed": 1, "output_format": fmt, "quality": 70})
    assert response.status_code == 200 and response.headers["content-type"] == media_type
    assert decode(response.content).format == pil_format
    data = client.post("/generate", json={"prompt": "x", "output_format": fmt, "response_format": "json"}).json()
    assert data["images"][0]["media_type"] == media_type


def test_png_embeds_the_generation_parameters(client):
    image = png(
        client.post(
            "/generate", json={"prompt": "a tower", "negative_prompt": "fog", "seed": 3, "scheduler": "euler_a"}
        )
    )
    lines = image.info["parameters"].splitlines()
    assert lines[0] == "a tower" and lines[1] == "Negative prompt: fog"
    assert "Sampler: Euler a" in lines[2] and "Seed: 3" in lines[2] and "Model: synthetic:tiny" in lines[2]


def test_scheduler_is_per_request_and_changes_the_image(client):
    base = {"prompt": "x", "seed": 5, "num_inference_steps": 4}
    default, euler_a, default_again = (
        png(client.post("/generate", json={**base, **extra})) for extra in ({}, {"scheduler": "euler_a"}, {})
    )
    assert max_diff(default, euler_a) > 10
    assert max_diff(default, default_again) <= 1


def test_accept_header_chooses_json_or_zip(client):
    as_json = client.post("/generate", json={"prompt": "x"}, headers={"Accept": "application/json"})
    assert as_json.headers["content-type"] == "application/json" and len(as_json.json()["images"]) == 1
    as_zip = client.post(
        "/generate", json={"prompt": "x", "num_images": 2, "seed": 4}, headers={"Accept": "application/zip"}
    )
    assert as_zip.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(as_zip.content))
    assert sorted(archive.namelist()) == ["00-4.png", "01-5.png", "metadata.json"]
    assert json.loads(archive.read("metadata.json"))["seeds"] == [4, 5]


def test_batch_of_prompts_as_json(client):
    body = {"prompts": ["a cat", "a dog", "a bird"], "seed": 100, "width": 128}
    response = client.post("/generate/batch", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["metadata"]["prompt"] for r in results] == ["a cat", "a dog", "a bird"]
    assert [r["images"][0]["seed"] for r in results] == [100, 101, 102]
    assert all(decode(r["images"][0]["b64"]).size == (128, 64) for r in results)
    assert max(r["metadata"]["batch_size"] for r in results) > 1  # one batcher, not a loop of single calls


def test_batch_of_full_requests_as_zip(client):
    body = {
        "requests": [{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "num_images": 2, "seed": 7, "width": 96}],
        "num_inference_steps": 3,
    }
    response = client.post("/generate/batch", json=body, headers={"Accept": "application/zip"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["000-00-1.png", "001-00-7.png", "001-01-8.png", "metadata.json"]
    assert decode(archive.read("001-01-8.png")).size == (96, 64)
    meta = json.loads(archive.read("metadata.json"))
    assert [m["num_inference_steps"] for m in meta] == [3, 3]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": ["a"] * 17}, "prompts"),
        ({"prompts": ["a"], "requests": [{"prompt": "b"}]}, "body"),
        ({"requests": [{"prompt": "ok"}, {"seed": 1}]}, "requests.1.prompt"),
        ({"requests": [{"prompt": "ok"}, {"prompt": "x", "width": 1000}]}, "requests.1.width"),
    ],
)
def test_batch_errors_name_the_entry(client, body, field):
    response = client.post("/generate/batch", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_img2img_json_and_multipart_give_the_same_image(client):
    init = png_bytes((128, 64), seed=1)
    fields = {"prompt": "night", "seed": 9, "strength": 0.6, "num_inference_steps": 5}
    as_json = client.post("/img2img", json={**fields, "init_image": base64.b64encode(init).decode()})
    as_form = client.post(
        "/img2img", data={k: str(v) for k, v in fields.items()}, files={"init_image": ("init.png", init, "image/png")}
    )
    a, b = png(as_json), png(as_form)
    assert a.size == b.size == (128, 64)  # the init image's size
    assert max_diff(a, b) == 0
    assert "Denoising strength: 0.6" in a.info["parameters"]


def test_img2img_strength_changes_the_result_and_size_can_be_asked(client):
    init = "data:image/png;base64," + base64.b64encode(png_bytes((64, 64), seed=2)).decode()
    weak, strong = (
        png(
            client.post(
                "/img2img",
                json={"prompt": "x", "seed": 1, "init_image": init, "strength": s, "num_inference_steps": 10},
            )
        )
        for s in (0.3, 0.9)
    )
    assert max_diff(weak, strong) > 10
    resized = client.post(
        "/img2img", json={"prompt": "x", "init_image": init, "width": 128, "height": 96, "response_format": "json"}
    )
    assert decode(resized.json()["images"][0]["b64"]).size == (128, 96)
    assert resized.json()["metadata"]["strength"] == 0.75


@pytest.mark.parametrize(
    ("init_image", "says"),
    [
        ("not base64!", "base64"),
        (base64.b64encode(b"GIF89a not really").decode(), "not an image"),
        (base64.b64encode(png_bytes((64, 64))[:60]).decode(), "truncated or corrupt"),
    ],
)
def test_img2img_rejects_bad_images(client, init_image, says):
    response = client.post("/img2img", json={"prompt": "x", "init_image": init_image})
    assert response.status_code == 422 and response.json()["error"]["field"] == "init_image"
    assert says in response.json()["error"]["message"]


def test_img2img_rejects_a_decompression_bomb_before_decoding(client):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # 25 megapixels in ~25 kB
    response = client.post(
        "/img2img", files={"init_image": ("bomb.png", buffer.getvalue(), "image/png")}, data={"prompt": "x"}
    )
    assert response.status_code == 422 and "pixels" in response.json()["error"]["message"]


def test_img2img_multipart_without_a_file_names_the_field(client):
    response = client.post("/img2img", data={"prompt": "x"}, files={"other": ("a.txt", b"hi", "text/plain")})
    assert response.status_code == 422 and response.json()["error"]["field"] == "init_image"


def test_a_mixed_burst_of_txt2img_img2img_and_sizes_shares_model_calls_by_size(demo_server):
    init = base64.b64encode(png_bytes((64, 64), seed=3)).decode()
    kinds = [
        ("/generate", {"prompt": "t", "width": 64, "height": 64}),
        ("/generate", {"prompt": "t", "width": 128, "height": 64}),
        ("/img2img", {"prompt": "i", "init_image": init, "strength": 0.5, "num_inference_steps": 4}),
        ("/img2img", {"prompt": "i", "init_image": init, "strength": 0.8, "num_inference_steps": 4}),
    ]
    requests = [(path, {**body, "seed": i}) for i, (path, body) in enumerate(kinds * 4)]
    responses = burst(demo_server, requests)
    sizes = [png(r).size for r in responses]
    assert sizes == [(64, 64), (128, 64), (64, 64), (64, 64)] * 4
    batch_sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    # Text-to-image and image-to-image at any strength share UNet calls; another size never does
    # (only 4 images are 128x64), and no call exceeds max_batch_size.
    assert max(batch_sizes[1::4]) <= 4 and max(batch_sizes) <= 8, batch_sizes
