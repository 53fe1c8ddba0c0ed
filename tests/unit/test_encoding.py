import io

import numpy as np
import pytest
from PIL import Image

from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageResult
from serve_app.service.encoding import encode_image, parameters_text

PARAMS = ImageParams(
    prompt="a cat",
    negative_prompt="blurry",
    width=48,
    height=32,
    num_inference_steps=20,
    guidance_scale=7.5,
    scheduler="euler_a",
    seed=7,
)


def generated() -> ImageResult:
    pixels = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    return ImageResult(pixels, PARAMS, batch_size=4, generation_time_s=0.1)


def test_parameters_text_follows_the_sd_tools_convention():
    text = parameters_text(PARAMS, "synthetic:tiny")
    assert text.splitlines() == [
        "a cat",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 48x32, Model: synthetic:tiny",
    ]


def test_png_is_lossless_and_carries_parameters():
    image = generated()
    data = encode_image(image.pixels, "png", parameters=parameters_text(image.params, "m"))
    decoded = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(decoded), image.pixels)
    assert decoded.info["parameters"].startswith("a cat\n")


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_decode_to_the_same_size(fmt):
    data = encode_image(generated().pixels, fmt, quality=80)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format.lower() == fmt and decoded.size == (48, 32)


def test_parameters_text_names_img2img_strength():
    text = parameters_text(PARAMS.model_copy(update={"strength": 0.6}), "m")
    assert text.endswith("Model: m, Denoising strength: 0.6")
