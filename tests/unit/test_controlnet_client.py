"""ControlNet units in the Python client's request builders and `sd-serve generate --control NAME=IMAGE[:SCALE]`:
the bodies they build are what the server's request models accept (no server)."""

from __future__ import annotations

import argparse
import base64
import io

import pytest
from PIL import Image

from serve_app.api.jobs.protocol import JobRequest
from serve_app.api.native.protocol import GenerateRequest, Img2ImgRequest
from serve_app.cli import _params, build_parser, parse_control
from serve_app.client import requests


@pytest.fixture
def control_png(tmp_path):
    path = tmp_path / "map.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(path)
    return path


def test_builders_send_each_units_image_as_base64(control_png):
    units = [
        {"name": "edges", "image": control_png, "scale": 0.6, "preprocess": "canny"},
        {"name": "scribble", "image": Image.new("RGB", (32, 32)), "end": 0.5},
    ]
    body = requests.generate("a house", {"controlnet": units, "width": 64, "height": 64}).options["json"]
    first, second = body["controlnet"]
    assert first["name"] == "edges" and first["scale"] == 0.6 and first["preprocess"] == "canny"
    assert Image.open(io.BytesIO(base64.b64decode(first["image"]))).size == (64, 64)
    assert Image.open(io.BytesIO(base64.b64decode(second["image"]))).size == (32, 32)
    GenerateRequest.model_validate(body)
    img2img = requests.img2img("x", control_png, {"controlnet": units[:1]}).options["json"]
    Img2ImgRequest.model_validate(img2img)
    JobRequest.model_validate(requests.submit("x", {"controlnet": units[:1]}).options["json"])


def test_cli_control_option(control_png):
    args = build_parser().parse_args(
        ["generate", "x", "--control", f"edges={control_png}:0.8", "--control", f"scribble={control_png}"]
        + ["--control-preprocess", "invert"]
    )
    assert _params(args)["controlnet"] == [
        {"name": "edges", "image": control_png, "scale": 0.8, "preprocess": "invert"},
        {"name": "scribble", "image": control_png, "preprocess": "invert"},
    ]
    assert _params(build_parser().parse_args(["generate", "x"]))["controlnet"] is None


@pytest.mark.parametrize("text", ["edges", "=map.png", "edges=missing.png", "edges=missing.png:0.5"])
def test_cli_control_option_refusals(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_control(text)
