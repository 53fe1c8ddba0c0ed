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


# -- flow-matching transformers: SD3 / SD3.5 and FLUX.1 ---------------------------------

FLOW_PRESETS = ["tiny-sd3", "tiny-flux-schnell", "tiny-flux-dev", "sd3.5-large", "sd3.5-medium", "flux.1-schnell"]


def test_flow_presets_are_listed():
    assert set(FLOW_PRESETS) <= set(preset_names())


def test_t5_tokenizer_is_built_offline_with_its_full_vocabulary():
    from serve_app.pipeline.synthetic import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    assert len(tokenizer) == 192  # pad, end, unknown, word start; 94 printable characters bare and word-initial
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat"


@pytest.mark.parametrize("preset", FLOW_PRESETS)
def test_flow_preset_configs_fit_together(preset):
    """What the pipelines assume of their modules, checked on the configs (no weights built)."""
    spec = load_preset(preset)
    transformer, encoders = spec["transformer"], spec["text_encoders"]
    t5 = encoders[-1]
    assert t5["class"] == "T5EncoderModel" and t5["dropout_rate"] == 0.0
    assert transformer["joint_attention_dim"] == t5["d_model"]
    assert spec["vae"]["latent_channels"] == 16 and len(spec["vae"]["block_out_channels"]) == 4  # scale factor 8
    assert spec["max_sequence_length"] <= (77 if preset.startswith("tiny") else 512)
    if spec["pipeline"] == "StableDiffusion3Pipeline":
        clips = encoders[:2]
        assert [c["class"] for c in clips] == ["CLIPTextModelWithProjection"] * 2
        assert transformer["pooled_projection_dim"] == sum(c["projection_dim"] for c in clips)
        assert sum(c["hidden_size"] for c in clips) <= t5["d_model"]  # CLIP states are padded to T5's width
        assert (
            transformer["caption_projection_dim"]
            == transformer["num_attention_heads"] * transformer["attention_head_dim"]
        )
        assert transformer["qk_norm"] == "rms_norm"  # SD3.5
        assert (spec["vae"]["scaling_factor"], spec["vae"]["shift_factor"]) == (1.5305, 0.0609)
    else:
        assert spec["pipeline"] == "FluxPipeline"
        assert transformer["in_channels"] == 4 * spec["vae"]["latent_channels"]  # 2x2 packed latents
        assert transformer["pooled_projection_dim"] == encoders[0]["hidden_size"]
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
        assert transformer["guidance_embeds"] == (preset == "tiny-flux-dev")
        assert spec["scheduler"]["use_dynamic_shifting"] == transformer["guidance_embeds"]  # dev shifts by size
        assert (spec["vae"]["scaling_factor"], spec["vae"]["shift_factor"]) == (0.3611, 0.1159)


@pytest.mark.slow  # builds three full-size architectures on the meta device: a few seconds
@pytest.mark.parametrize(
    ("preset", "published"),
    [
        # Billions of parameters as published (model cards; T5-XXL's encoder 4.7B, OpenCLIP bigG's text tower 0.69B).
        ("sd3.5-large", {"transformer": 8.1, "text_encoder": 0.12, "text_encoder_2": 0.69, "text_encoder_3": 4.7}),
        ("sd3.5-medium", {"transformer": 2.2, "text_encoder": 0.12, "text_encoder_2": 0.69, "text_encoder_3": 4.7}),
        ("flux.1-schnell", {"transformer": 11.9, "text_encoder": 0.12, "text_encoder_2": 4.7}),
    ],
)
def test_full_size_flow_presets_have_the_published_parameter_counts(preset, published):
    from serve_app.pipeline.synthetic import parameter_counts

    counts = parameter_counts(preset)
    for name, billions in published.items():
        assert counts[name] / 1e9 == pytest.approx(billions, rel=0.05), name
    assert counts["vae"] / 1e6 == pytest.approx(83.7, rel=0.01)  # the 16-channel VAE of SD3 and Flux


def test_flow_presets_build_in_eval_mode_and_encode_prompts_the_same_every_time():
    pipe = build_pipeline("tiny-flux-dev")
    assert not any(module.training for module in pipe.components.values() if isinstance(module, torch.nn.Module))
    with torch.inference_mode():
        first, second = (pipe.encode_prompt("a cat", max_sequence_length=16)[0] for _ in range(2))
    assert torch.equal(first, second)


def _flow_image(pipe, seed=3):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        "a cat",
        num_inference_steps=2,
        generator=generator,
        output_type="np",
        max_sequence_length=16,
        width=64,
        height=64,
    ).images[0]


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux-schnell"])
def test_saved_flow_model_loads_with_plain_diffusers_and_makes_the_same_image(tmp_path, preset):
    from diffusers import DiffusionPipeline

    from serve_app.synthetic import main

    assert main([preset, str(tmp_path / preset)]) == 0
    loaded = DiffusionPipeline.from_pretrained(tmp_path / preset)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == load_preset(preset)["pipeline"]
    assert (
        len(loaded.tokenizer) == 514 and len(loaded.tokenizer_2 if preset != "tiny-sd3" else loaded.tokenizer_3) == 192
    )
    assert np.abs(_flow_image(loaded) - _flow_image(build_pipeline(preset))).max() < 1e-5
