import subprocess
import sys

import numpy as np
import pytest
import torch

from serve_app.pipeline.synthetic import build_pipeline, build_tokenizer, load_preset, preset_names


def test_presets_cover_the_documented_architectures():
    assert {"tiny", "tiny-xl", "sd15", "sd-turbo", "sdxl"} <= set(preset_names())
    with pytest.raises(ValueError, match="choose one of"):
        load_preset("nope")


def test_tokenizer_is_byte_level_with_full_vocabulary():
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 514
    ids = tokenizer("héllo wörld").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "héllowörld"


def _image(pipe, seed=3):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt="a cat", num_inference_steps=2, generator=generator, output_type="np").images[0]


def test_same_seed_builds_the_same_weights():
    a, b = build_pipeline("tiny", seed=0), build_pipeline("tiny", seed=0)
    assert np.array_equal(_image(a), _image(b))
    assert not torch.equal(next(a.unet.parameters()), next(build_pipeline("tiny", seed=1).unet.parameters()))


@pytest.mark.slow  # a subprocess that imports torch and diffusers: seconds
def test_saved_model_loads_with_plain_diffusers_and_makes_the_same_image(tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "tiny"
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.synthetic", "tiny", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (out / "model_index.json").is_file()
    loaded = DiffusionPipeline.from_pretrained(out)
    assert len(loaded.tokenizer) == 514
    assert np.abs(_image(loaded) - _image(build_pipeline("tiny"))).max() < 1e-5


def test_sdxl_architecture_builds_with_two_text_encoders():
    pipe = build_pipeline("tiny-xl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.text_encoder_2 is not None
    assert _image(pipe).shape == (64, 64, 3)


def test_in_memory_and_saved_models_make_the_same_images(tmp_path):
    """A scheduler config that leaves keys to defaults (`_use_default_values`) makes samplers built from it
    take their own defaults in memory but the model's once saved (63/255 apart for 4-step Euler)."""
    from diffusers import DiffusionPipeline

    from serve_app.pipeline.schedulers import make_scheduler

    in_memory = build_pipeline("tiny")
    assert not in_memory.scheduler.config.get("_use_default_values")
    in_memory.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert dict(loaded.scheduler.config) == dict(in_memory.scheduler.config)
    model_schedulers = {id(in_memory): in_memory.scheduler, id(loaded): loaded.scheduler}

    def image(pipe, sampler):
        pipe.scheduler = make_scheduler(sampler, model_schedulers[id(pipe)])
        generator = torch.Generator("cpu").manual_seed(3)
        return pipe("a cat", num_inference_steps=4, width=32, height=32, generator=generator, output_type="np").images[
            0
        ]

    # Before: euler, euler_a, heun, dpm2, dpm2_a, dpmpp_2m and unipc differed; the model's own (PNDM) did not.
    for sampler in ("default", "euler", "dpmpp_2m", "unipc"):
        assert np.array_equal(image(in_memory, sampler), image(loaded, sampler)), sampler
