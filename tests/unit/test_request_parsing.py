"""Request-side helpers: limits, batch expansion, init image decoding, auth key sources."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.api.errors import ApiError
from serve_app.api.native.protocol import GenerateRequest, MultiPromptRequest
from serve_app.config import AuthConfig, RequestLimits
from serve_app.pipeline.params import ImageParams
from serve_app.service.encoding import decode_init_image, output_size
from serve_app.service.generation import check_limits, image_tasks, is_ready

LIMITS = RequestLimits(min_size=64, max_width=512, max_height=512, max_pixels=512 * 384, max_steps=20, max_num_images=4)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 32}, "width"),
        ({"height": 1024}, "height"),
        ({"width": 512, "height": 512}, "width"),  # over max_pixels
        ({"num_inference_steps": 21}, "num_inference_steps"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"num_images": 5}, "num_images"),
        ({"prompt": "x" * 2001}, "prompt"),
    ],
)
def test_limits_name_the_field(fields, field):
    request = GenerateRequest(**{"prompt": "p", **fields})
    with pytest.raises(ApiError) as info:
        check_limits(request.image_params(), request.num_images, LIMITS)
    assert info.value.status == 422 and info.value.field == field


def test_limit_errors_use_the_callers_names():
    with pytest.raises(ApiError) as info:
        check_limits(ImageParams(prompt="p", num_inference_steps=50), 1, LIMITS, {"num_inference_steps": "steps"})
    assert info.value.field == "steps" and info.value.message.startswith("steps: must be between 1 and 20")


def test_jobs_get_consecutive_seeds_that_wrap():
    jobs = image_tasks(ImageParams(prompt="p", seed=2**32 - 2), 3, LIMITS, "rid")
    assert [j.seed for j in jobs] == [2**32 - 2, 2**32 - 1, 0]
    assert {j.request_id for j in jobs} == {"rid"}
    assert {j.params.model_copy(update={"seed": None}) for j in jobs} == {ImageParams(prompt="p")}
    drawn = image_tasks(ImageParams(prompt="p"), 2, LIMITS, "rid")
    assert drawn[1].seed == (drawn[0].seed + 1) % 2**32


def test_batch_shorthand_and_full_entries():
    shorthand = MultiPromptRequest(prompts=["a", "b"], seed=10, num_images=2, width=128).entries()
    assert [(i.prompt, i.seed, i.width, i.num_images) for i in shorthand] == [("a", 10, 128, 2), ("b", 12, 128, 2)]
    full = MultiPromptRequest.model_validate(
        {
            "requests": [{"prompt": "a"}, {"prompt": "b", "width": 64, "scheduler": "default"}],
            "width": 128,
            "scheduler": "euler",
        }
    ).entries()
    # An entry's own value wins, even when it equals the field's default.
    assert [(i.width, i.scheduler) for i in full] == [(128, "euler"), (64, "default")]


def _png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_init_image_fits_inside_the_limits_in_multiples_of_8():
    assert output_size(1000, 500, None, None, LIMITS) == (512, 256)
    assert output_size(300, 200, None, None, LIMITS) == (296, 200)
    assert output_size(300, 200, 128, None, LIMITS) == (128, 80)
    assert output_size(300, 200, 128, 256, LIMITS) == (128, 256)
    pixels = decode_init_image(_png(1000, 500), LIMITS, None, None)
    assert pixels.shape == (256, 512, 3) and pixels.dtype == np.uint8


def test_init_image_rejects_other_formats_and_bombs():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="GIF")
    with pytest.raises(ApiError, match="format GIF"):
        decode_init_image(buffer.getvalue(), LIMITS, None, None)
    with pytest.raises(ApiError, match="at most"):
        decode_init_image(_png(5000, 4000), LIMITS, None, None)


def test_api_keys_come_from_env_or_file_and_an_empty_source_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_KEYS", " k1 , k2 ")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops team\nk3\n\nk4  # ci\n")
    assert AuthConfig(api_keys_env="SD_KEYS", api_keys_file=str(keys_file)).load_keys() == ["k1", "k2", "k3", "k4"]
    monkeypatch.setenv("SD_KEYS", "")
    with pytest.raises(ValueError, match="unset or empty"):
        AuthConfig(api_keys_env="SD_KEYS").load_keys()
    with pytest.raises(ValueError, match="does not exist"):
        AuthConfig(api_keys_file=str(tmp_path / "missing")).load_keys()
    assert not AuthConfig().enabled


def test_readiness():
    assert is_ready({"status": "UPDATING", "running_replicas": 1})
    assert is_ready({"status": "HEALTHY", "running_replicas": 0})  # scaled to zero, healthy
    assert not is_ready({"status": "UPDATING", "running_replicas": 0})
    assert not is_ready({"status": "MISSING", "running_replicas": 0})


def test_batch_nulls_mean_not_given_and_lone_surrogates_are_rejected():
    """Both were 500s found by the fuzzer (the surrogates through the batch merge)."""
    entries = MultiPromptRequest.model_validate(
        {"requests": [{"prompt": "a", "negative_prompt": None, "num_images": None}], "negative_prompt": "fog"}
    ).entries()
    assert entries[0].negative_prompt == "fog" and entries[0].num_images == 1
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unicode"):
        ImageParams(prompt="bad \ud800 text")
    with pytest.raises(ValidationError, match="prompts.1\n.*unicode"):
        MultiPromptRequest(prompts=["fine", "bad \udfff"])
    with pytest.raises(ValidationError, match="entry 1 must not be empty"):
        MultiPromptRequest(prompts=["fine", "  "])


def test_strength_belongs_to_image_to_image_only():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="image-to-image only"):
        GenerateRequest(prompt="p", strength=0.5)
