"""Native API beyond the basics, with the real model: several images, samplers, image-to-image, mixed
bursts. Formats, zip, batches and errors: tests/unit/test_routes_native.py."""

from __future__ import annotations

import base64

from helpers import burst, decode, max_diff, png, png_bytes


def test_num_images_gives_distinct_reproducible_seeds_batched_together(client):
    body = {"prompt": "four foxes", "seed": 10, "num_images": 4}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    first = response.json()
    assert [i["seed"] for i in first["images"]] == [10, 11, 12, 13] == first["metadata"]["seeds"]
    assert first["metadata"]["batch_size"] >= 2  # the request's own images share calls
    pictures = [decode(i["b64"]) for i in first["images"]]
    assert all(max_diff(pictures[0], other) > 10 for other in pictures[1:])
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    again = response.json()
    assert all(max_diff(decode(a["b64"]), decode(b["b64"])) <= 1 for a, b in zip(first["images"], again["images"]))
    # Image 2 of seed 10 is image 1 of seed 12.
    alone = png(client.post("/generate", json={"prompt": "four foxes", "seed": 12}))
    assert max_diff(alone, pictures[2]) <= 1


def test_scheduler_is_per_request_and_changes_the_image(client):
    base = {"prompt": "x", "seed": 5, "num_inference_steps": 4}
    default, euler_a, default_again = (
        png(client.post("/generate", json={**base, **extra})) for extra in ({}, {"scheduler": "euler_a"}, {})
    )
    assert max_diff(default, euler_a) > 10
    assert max_diff(default, default_again) <= 1


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
