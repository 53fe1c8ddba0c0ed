import numpy as np

from serve_app.pipeline.params import GenerationDefaults, ImageParams
from serve_app.pipeline.tasks import ImageTask, call_key, group_by_call_key

DEFAULTS = GenerationDefaults(width=64, height=64, num_inference_steps=2, guidance_scale=7.5, strength=0.6)


def job(init_image=None, **kw):
    params = ImageParams(prompt=kw.pop("prompt", "p"), seed=kw.pop("seed", 0), **kw)
    return ImageTask(params, init_image=init_image).with_defaults(DEFAULTS)


def test_defaults_fill_only_unset_parameters():
    filled = job(width=128, num_inference_steps=5).params
    assert (filled.width, filled.height, filled.num_inference_steps, filled.guidance_scale) == (128, 64, 5, 7.5)
    assert filled.strength is None  # text-to-image has no strength


def test_img2img_takes_its_size_from_the_init_image_and_default_strength():
    filled = job(init_image=np.zeros((48, 80, 3), np.uint8))
    assert (filled.params.width, filled.params.height, filled.params.strength, filled.kind) == (80, 48, 0.6, "img2img")
    assert job(init_image=np.zeros((48, 80, 3), np.uint8), strength=0.3).params.strength == 0.3


def test_prompt_negative_prompt_and_seed_do_not_split_a_batch():
    assert call_key(job(prompt="a", seed=1)) == call_key(job(prompt="b", seed=2, negative_prompt="x"))


def test_every_call_level_parameter_splits_a_batch():
    base = call_key(job())
    for variant in (
        job(width=128),
        job(height=128),
        job(num_inference_steps=3),
        job(guidance_scale=1.0),
        job(scheduler="euler"),
        job(init_image=np.zeros((64, 64, 3), np.uint8)),
    ):
        assert call_key(variant) != base


def test_guidance_given_as_int_or_float_shares_a_batch():
    assert call_key(job(guidance_scale=7)) == call_key(job(guidance_scale=7.0))


def test_groups_keep_arrival_order():
    jobs = [job(width=64), job(width=128), job(width=64), job(width=128), job(width=256)]
    assert group_by_call_key(jobs) == [[0, 2], [1, 3], [4]]


def test_empty_negative_prompts_split_only_when_the_model_needs_it():
    jobs = [job(negative_prompt=""), job(negative_prompt="blurry"), job(negative_prompt="")]
    assert group_by_call_key(jobs) == [[0, 1, 2]]
    assert group_by_call_key(jobs, split_empty_negative=True) == [[0, 2], [1]]


def test_config_defaults_fall_back_to_the_models():
    model = GenerationDefaults(width=512, height=512, num_inference_steps=25, guidance_scale=7.5, strength=0.75)
    merged = GenerationDefaults(num_inference_steps=4).over(model)
    assert (merged.width, merged.num_inference_steps, merged.guidance_scale) == (512, 4, 7.5)
