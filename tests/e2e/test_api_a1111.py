"""AUTOMATIC1111 API through real Serve: the real model's images. Field names, samplers, the response
shape and errors: tests/unit/test_routes_a1111.py."""

from __future__ import annotations

import base64
import json

from helpers import decode, max_diff, png_bytes


def test_txt2img_makes_batch_size_times_n_iter_distinct_images(client):
    body = {"prompt": "a castle", "steps": 3, "width": 128, "height": 64, "seed": 500, "batch_size": 2, "n_iter": 2}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    pictures = [decode(i) for i in response.json()["images"]]
    assert len(pictures) == 4 and all(p.size == (128, 64) for p in pictures)
    assert all(max_diff(pictures[0], other) > 10 for other in pictures[1:])
    assert json.loads(response.json()["info"])["all_seeds"] == [500, 501, 502, 503]


def test_img2img_with_denoising_strength(client):
    init = base64.b64encode(png_bytes((64, 64), seed=5)).decode()
    base = {"prompt": "x", "seed": 3, "steps": 10, "init_images": [init]}
    weak, strong = (
        decode(client.post("/sdapi/v1/img2img", json={**base, "denoising_strength": s}).json()["images"][0])
        for s in (0.3, 0.9)
    )
    assert max_diff(weak, strong) > 10
